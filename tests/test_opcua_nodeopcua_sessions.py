"""Sessions and subscriptions with node-opcua, a second stack (Part 4 5.6, 5.13).

Session isolation on one channel, a made-up token, a take-over from another channel, Republish
status codes, TransferSubscriptions, SecurityPolicy None with node-opcua's (untrusted) client
certificate, and a server restart during which a subscribed client resumes receiving data
without a Republish storm. Needs node-opcua (see test_opcua_nodeopcua.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from helpers import free_port
from helpers.nodeopcua import NODE_DIR, NODE_MISSING
from helpers.opcua import aio, make_config, start

from iotserver.tags.model import Update

pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(NODE_MISSING, reason="node-opcua-client not installed")]

COMMON = r"""
const opcua = require("node-opcua-client");
const { OPCUAClient, MessageSecurityMode, SecurityPolicy, AttributeIds, DataType,
  UserTokenType, TimestampsToReturn, ClientSubscription, ClientMonitoredItem } = opcua;
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");
const [url, nsUri, pkiDir, scenario] = process.argv.slice(2);
const out = {};
function client(extra) {
  return OPCUAClient.create(Object.assign({
    applicationName: "nodeopcua-sessions", applicationUri: "urn:test:nodeopcua",
    securityMode: MessageSecurityMode.None, securityPolicy: SecurityPolicy.None,
    endpointMustExist: false, connectionStrategy: { maxRetry: 0 },
    clientCertificateManager: new OPCUACertificateManager({
      rootFolder: pkiDir, automaticallyAcceptUnknownCertificate: true }),
  }, extra || {}));
}
const user = (name, pw) => ({ type: UserTokenType.UserName, userName: name, password: pw });
async function nsOf(session) {
  const arr = (await session.read({ nodeId: "ns=0;i=2255", attributeId: AttributeIds.Value }))
    .value.value;
  return arr.indexOf(nsUri);
}
async function write(session, ns, value) {
  const sc = await session.write({ nodeId: `ns=${ns};s=Line1/Setpoint`,
    attributeId: AttributeIds.Value, value: { value: { dataType: DataType.Float, value } } });
  return sc.name;
}
// the session's own transaction path, without node-opcua's "recreate the session and try
// again" on Bad_SessionIdInvalid, so that the server's answer is what we see
async function raw(session, request) {
  return new Promise((resolve) => session._performMessageTransaction(request, (err, res) =>
    resolve(err ? String(err.message || err) : res.responseHeader.serviceResult.name)));
}
"""

ISOLATION = COMMON + r"""
(async () => {
  const c = client();
  try {
    await c.connect(url);
    const op = await c.createSession(user("bob", "bob-secret"));
    const eng = await c.createSession(user("alice", "alice-secret"));
    const ns = await nsOf(eng);
    out.sameChannel = op._client === eng._client;
    out.operator = await write(op, ns, 11);
    out.engineer = await write(eng, ns, 12);
    await op.close();
    out.afterClose = (await eng.read({ nodeId: `ns=${ns};s=Line1/Setpoint`,
      attributeId: AttributeIds.Value })).statusCode.name;
    // a made-up AuthenticationToken
    const req = new opcua.ReadRequest({ nodesToRead: [
      { nodeId: `ns=${ns};s=Line1/Setpoint`, attributeId: AttributeIds.Value }] });
    const saved = eng.authenticationToken;
    eng.authenticationToken = new opcua.NodeId(opcua.NodeId.NodeIdType.BYTESTRING,
      Buffer.alloc(32, 7));
    out.madeUp = await raw(eng, req);
    eng.authenticationToken = saved;
    out.stillWorks = (await eng.read({ nodeId: `ns=${ns};s=Line1/Setpoint`,
      attributeId: AttributeIds.Value })).statusCode.name;
    await eng.close();
  } catch (e) { out.error = String(e.message || e); }
  finally { await c.disconnect(); }
  console.log(JSON.stringify(out));
})();
"""

TAKEOVER_AND_REPUBLISH = COMMON + r"""
(async () => {
  const victimClient = client();
  const thiefClient = client();
  try {
    await victimClient.connect(url);
    const victim = await victimClient.createSession(user("bob", "bob-secret"));
    const ns = await nsOf(victim);
    const sub = ClientSubscription.create(victim, { requestedPublishingInterval: 100,
      requestedLifetimeCount: 100, requestedMaxKeepAliveCount: 10, publishingEnabled: true });
    await new Promise((r) => sub.once("started", r));
    out.subscriptionId = sub.subscriptionId;
    out.unknownSub = await raw(victim, new opcua.RepublishRequest({
      subscriptionId: (sub.subscriptionId ^ 0x5a5a) >>> 0, retransmitSequenceNumber: 1 }));
    out.unknownSeq = await raw(victim, new opcua.RepublishRequest({
      subscriptionId: sub.subscriptionId, retransmitSequenceNumber: 123456 }));
    console.log("TOKEN " + JSON.stringify({ token: victim.authenticationToken.toString() }));
    // another channel presents the victim's token with an anonymous identity
    await thiefClient.connect(url);
    victim.userIdentityInfo = { type: UserTokenType.Anonymous };
    try {
      await thiefClient.reactivateSession(victim);
      out.takeover = "Good";
    } catch (e) { out.takeover = String(e.message || e); }
  } catch (e) { out.error = String(e.message || e); }
  finally {
    await thiefClient.disconnect();
    await victimClient.disconnect();
  }
  console.log(JSON.stringify(out));
})();
"""

TRANSFER = COMMON + r"""
(async () => {
  const a = client(); const b = client();
  try {
    await a.connect(url);
    const old = await a.createSession(user("alice", "alice-secret"));
    const ns = await nsOf(old);
    const sub = ClientSubscription.create(old, { requestedPublishingInterval: 100,
      requestedLifetimeCount: 100, requestedMaxKeepAliveCount: 5, publishingEnabled: true });
    await new Promise((r) => sub.once("started", r));
    const item = ClientMonitoredItem.create(sub,
      { nodeId: `ns=${ns};s=Line1/Temp`, attributeId: AttributeIds.Value },
      { samplingInterval: 0, queueSize: 10, discardOldest: true }, TimestampsToReturn.Both);
    await new Promise((r) => item.once("changed", r));
    out.status = [];
    sub.on("status_changed", (sc) => out.status.push(sc.name));
    await b.connect(url);
    const bob = await b.createSession(user("bob", "bob-secret"));
    const refused = await bob.transferSubscriptions({ subscriptionIds: [sub.subscriptionId],
      sendInitialValues: true });
    out.otherUser = refused.results.map((r) => r.statusCode.name);
    const mine = await b.createSession(user("alice", "alice-secret"));
    const moved = await mine.transferSubscriptions({ subscriptionIds: [sub.subscriptionId],
      sendInitialValues: true });
    out.sameUser = moved.results.map((r) => r.statusCode.name);
    console.log("TRANSFERRED " + sub.subscriptionId);
    await new Promise((r) => setTimeout(r, 1500));
  } catch (e) { out.error = String(e.message || e); }
  finally { await b.disconnect(); await a.disconnect(); }
  console.log(JSON.stringify(out));
})();
"""

RESUME = COMMON + r"""
(async () => {
  const c = client({ connectionStrategy: { maxRetry: 100, initialDelay: 200, maxDelay: 500 },
    requestedSessionTimeout: 60000 });
  c.on("connection_reestablished", () => console.log("REESTABLISHED"));
  try {
    await c.connect(url);
    const session = await c.createSession(user("alice", "alice-secret"));
    const ns = await nsOf(session);
    const sub = ClientSubscription.create(session, { requestedPublishingInterval: 100,
      requestedLifetimeCount: 100, requestedMaxKeepAliveCount: 10, publishingEnabled: true });
    const item = ClientMonitoredItem.create(sub,
      { nodeId: `ns=${ns};s=Line1/Temp`, attributeId: AttributeIds.Value },
      { samplingInterval: 0, queueSize: 10, discardOldest: true }, TimestampsToReturn.Both);
    item.on("changed", (v) => console.log("VALUE " + v.value.value));
    console.log("SUBSCRIBED");
    await new Promise((resolve) => process.stdin.on("data", resolve));  // told to stop
  } catch (e) { out.error = String(e.message || e); }
  finally { await c.disconnect(); }
  console.log(JSON.stringify(out));
})();
"""


class Node:
    """A node-opcua script as a child process, read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.result: dict[str, Any] = {}

    @classmethod
    async def start(cls, tmp: Path, script: str, *args: str) -> Node:
        path = tmp / f"s{abs(hash(script))}.js"
        path.write_text(script)
        proc = await asyncio.create_subprocess_exec(
            "node", "--security-revert=CVE-2023-46809", str(path), *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "NODE_PATH": str(NODE_DIR / "node_modules")})
        return cls(proc)

    async def until(self, predicate: Any, timeout: float = 60.0) -> str:
        """Read lines until one satisfies ``predicate`` (bounded)."""
        assert self.proc.stdout is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(),
                                          max(0.1, deadline - loop.time()))
            if not line:
                raise AssertionError(f"node exited; output so far: {self.lines[-20:]}")
            text = line.decode().strip()
            self.lines.append(text)
            if text.startswith("{"):
                self.result = json.loads(text)
            if predicate(text):
                return text

    async def finish(self) -> dict[str, Any]:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.write(b"stop\n")
            self.proc.stdin.close()
        with contextlib.suppress(AssertionError):
            await self.until(lambda t: t.startswith("{"), 30)
        await asyncio.wait_for(self.proc.wait(), 30)
        return self.result


def args_for(running: Any, tmp: Path, name: str) -> list[str]:
    return [running.url, running.namespace, str(tmp / "node-pki"), name]


@pytest_twisted.ensureDeferred
async def test_two_users_on_one_channel_are_isolated(tmp_path: Path) -> None:
    running = await start(make_config(tmp_path / "data", free_port()))

    async def body() -> None:
        node = await Node.start(tmp_path, ISOLATION, *args_for(running, tmp_path, "iso"))
        out = await node.finish()
        assert "error" not in out, (out, node.lines[-10:])
        assert out["sameChannel"] is True
        assert out["operator"] == "BadUserAccessDenied"
        assert out["engineer"] == "Good"
        assert running.store.read("Line1/Setpoint").value == 12
        assert out["afterClose"] == "Good"
        assert "BadSessionIdInvalid" in out["madeUp"]
        assert out["stillWorks"] == "Good"
        # SecurityPolicy None: node-opcua's untrusted certificate was ignored, not rejected
        assert not list((running.pki / "rejected" / "certs").iterdir())

    try:
        await aio(body())
    finally:
        await running.root.stopService()


@pytest_twisted.ensureDeferred
async def test_take_over_refused_and_republish_codes(tmp_path: Path) -> None:
    running = await start(make_config(tmp_path / "data", free_port(), anonymous=True))

    async def body() -> None:
        node = await Node.start(tmp_path, TAKEOVER_AND_REPUBLISH,
                                *args_for(running, tmp_path, "take"))
        await node.until(lambda t: t.startswith("TOKEN"))
        out = await node.finish()
        assert "error" not in out, (out, node.lines[-10:])
        assert "BadSubscriptionIdInvalid" in out["unknownSub"]
        assert "BadMessageNotAvailable" in out["unknownSeq"]
        assert "BadIdentityChangeNotSupported" in out["takeover"], out
        stats = running.service.layer.table.stats
        assert stats.takeover_refused == 1

    try:
        await aio(body())
    finally:
        await running.root.stopService()


@pytest_twisted.ensureDeferred
async def test_transfer_subscriptions_between_sessions(tmp_path: Path) -> None:
    running = await start(make_config(tmp_path / "data", free_port()))

    async def body() -> None:
        node = await Node.start(tmp_path, TRANSFER, *args_for(running, tmp_path, "transfer"))
        line = await node.until(lambda t: t.startswith("TRANSFERRED"))
        sub_id = int(line.split()[1])
        layer = running.service.layer
        sub = layer.registry.by_id[sub_id]
        assert sub.session is not None and sub.session.user.name == "alice"
        assert sub.session.name != ""  # the new session, which has the subscription now
        out = await node.finish()
        assert "error" not in out, (out, node.lines[-10:])
        assert out["otherUser"] == ["BadUserAccessDenied"]
        assert out["sameUser"] == ["Good"]
        assert "GoodSubscriptionTransferred" in out["status"], out

    try:
        await aio(body())
    finally:
        await running.root.stopService()


@pytest_twisted.ensureDeferred
async def test_client_resumes_after_server_restart_without_republish_storm(
        tmp_path: Path) -> None:
    port = free_port()
    cfg = make_config(tmp_path / "data", port)
    running = await start(cfg)
    restarted: list[Any] = []

    async def body() -> None:
        node = await Node.start(tmp_path, RESUME, *args_for(running, tmp_path, "resume"))
        await node.until(lambda t: t == "SUBSCRIBED")
        running.store.apply([Update("Line1/Temp", 41.0)])
        await node.until(lambda t: t == "VALUE 41")
        return_node.append(node)

    return_node: list[Node] = []
    try:
        await aio(body())
        await running.root.stopService()
        again = await start(make_config(tmp_path / "data", port))
        restarted.append(again)

        async def after() -> None:
            node = return_node[0]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            value = 42.0
            # keep changing the value until the client shows one from after the restart
            while loop.time() < deadline:
                again.store.apply([Update("Line1/Temp", value)])
                try:
                    await node.until(lambda t: t.startswith("VALUE ") and
                                     float(t.split()[1]) >= 42, timeout=1.0)
                    break
                except TimeoutError:
                    value += 1
            else:
                raise AssertionError(f"no value after the restart: {node.lines[-20:]}")
            subs = again.service.layer.subs
            assert subs.republish_requests < 20, subs.republish_requests
            out = await node.finish()
            assert "error" not in out, out

        await aio(after())
    finally:
        for r in restarted:
            await r.root.stopService()
        await running.root.stopService()


@pytest_twisted.ensureDeferred
async def test_client_reactivates_its_session_after_a_dropped_connection(
        tmp_path: Path) -> None:
    running = await start(make_config(tmp_path / "data", free_port()))
    layer = running.service.layer

    async def body() -> None:
        node = await Node.start(tmp_path, RESUME, *args_for(running, tmp_path, "drop"))
        await node.until(lambda t: t == "SUBSCRIBED")
        running.store.apply([Update("Line1/Temp", 41.0)])
        await node.until(lambda t: t == "VALUE 41")
        (session,) = list(layer.table)
        (sub_id,) = list(layer.registry.by_id)
        for channel in list(layer.listener.channels):
            assert channel.transport is not None
            channel.transport.abort()  # the network drops the connection
        await node.until(lambda t: t == "REESTABLISHED", 30)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        value = 50.0
        while True:
            assert loop.time() < deadline, node.lines[-20:]
            running.store.apply([Update("Line1/Temp", value)])
            with contextlib.suppress(TimeoutError):
                await node.until(lambda t: t.startswith("VALUE ") and
                                 float(t.split()[1]) >= 50, timeout=1.0)
                break
            value += 1
        # the same session and subscription, now on the new channel
        assert list(layer.table) == [session] and list(layer.registry.by_id) == [sub_id]
        assert session.channel is not None and session.channel.is_open
        assert layer.table.stats.takeover_refused == 0
        assert layer.subs.republish_requests < 20
        out = await node.finish()
        assert "error" not in out, out

    try:
        await aio(body())
    finally:
        await running.root.stopService()
