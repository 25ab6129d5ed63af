"""Call status codes, UserExecutable, GetMonitoredItems and ServerCapabilities seen by
node-opcua, another stack (Part 4 5.11.2, Part 5 6.3.2 and 9.1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_twisted
from asyncua import ua
from helpers import free_port
from helpers.nodeopcua import NODE_MISSING, node_client_pki, run_node
from helpers.opcua import OPCUA_CLIENT_SOURCE as SOURCE
from helpers.opcua import aio, make_config, start

from iotserver.opcua import capabilities as caps

pytestmark = pytest.mark.interop

SCRIPT = r"""
const { OPCUAClient, MessageSecurityMode, SecurityPolicy, AttributeIds, UserTokenType, DataType,
        ClientSubscription, ClientMonitoredItem, TimestampsToReturn } =
  require("node-opcua-client");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");
(async () => {
  const [url, nsUri, capIds, pkiDir, certFile, keyFile] = process.argv.slice(2);
  const out = {};
  const cm = new OPCUACertificateManager({
    rootFolder: pkiDir, automaticallyAcceptUnknownCertificate: false });
  await cm.initialize();
  // one connection per user: asyncua's channel layer serves one session per channel
  const clients = [];
  const login = async (userName, password) => {
    const client = OPCUAClient.create({
      applicationName: "nodeopcua-methods", applicationUri: "urn:test:nodeopcua",
      securityMode: MessageSecurityMode.SignAndEncrypt,
      securityPolicy: SecurityPolicy.Basic256Sha256,
      endpointMustExist: false, connectionStrategy: { maxRetry: 0 },
      clientCertificateManager: cm, certificateFile: certFile, privateKeyFile: keyFile,
    });
    clients.push(client);
    await client.connect(url);
    return client.createSession({ type: UserTokenType.UserName, userName, password });
  };
  const code = (r) => r.statusCode.name;
  try {
    const alice = await login("alice", "alice-secret");
    const bob = await login("bob", "bob-secret");
    const nsArray = (await alice.read(
      { nodeId: "ns=0;i=2255", attributeId: AttributeIds.Value })).value.value;
    const ns = nsArray.indexOf(nsUri);
    const folder = `ns=${ns};s=PLC1`, method = `ns=${ns};s=PLC1#Reconnect`;
    const args = await alice.getArgumentDefinition(method);
    out.reconnectArgs = [args.inputArguments.length, args.outputArguments.length];
    const one = { dataType: DataType.Int32, value: 1 };
    const calls = await alice.call([
      { objectId: folder, methodId: method, inputArguments: [] },
      { objectId: folder, methodId: method, inputArguments: [one] },
      { objectId: `ns=${ns};s=Line1`, methodId: method, inputArguments: [] },
      { objectId: `ns=${ns};s=Nope`, methodId: method, inputArguments: [] },
      { objectId: "ns=0;i=2253", methodId: "ns=0;i=11492", inputArguments: [] },
      { objectId: "ns=0;i=2253", methodId: "ns=0;i=11492",
        inputArguments: [{ dataType: DataType.String, value: "1" }] },
    ]);
    out.calls = calls.map(code);
    out.argResults = calls[5].inputArgumentResults.map((s) => s.name);
    out.bobCall = code(await bob.call({ objectId: folder, methodId: method, inputArguments: [] }));
    const ue = { nodeId: method, attributeId: AttributeIds.UserExecutable };
    out.userExecutable = [(await alice.read(ue)).value.value, (await bob.read(ue)).value.value];

    const sub = ClientSubscription.create(alice, { requestedPublishingInterval: 100,
      requestedLifetimeCount: 100, requestedMaxKeepAliveCount: 10, publishingEnabled: true });
    await new Promise((resolve) => sub.on("started", resolve));
    const items = [];
    for (const path of ["Line1/Temp", "Line1/Setpoint"]) {
      const item = ClientMonitoredItem.create(sub,
        { nodeId: `ns=${ns};s=${path}`, attributeId: AttributeIds.Value },
        { samplingInterval: 0, queueSize: 1 }, TimestampsToReturn.Both);
      await new Promise((resolve) => item.on("initialized", resolve));
      items.push(item);
    }
    const got = await alice.getMonitoredItems(sub.subscriptionId);
    out.handles = { server: Array.from(got.serverHandles), client: Array.from(got.clientHandles) };
    out.expected = { server: items.map((i) => i.monitoredItemId),
                     client: items.map((i) => i.monitoringParameters.clientHandle) };
    try {
      await bob.getMonitoredItems(sub.subscriptionId);
      out.bobGetMonitoredItems = "Good";
    } catch (e) {
      out.bobGetMonitoredItems = String(e.message || e);
    }
    await sub.terminate();

    const caps = {};
    for (const [name, id] of Object.entries(JSON.parse(capIds))) {
      const dv = await bob.read({ nodeId: `ns=0;i=${id}`, attributeId: AttributeIds.Value });
      caps[name] = [dv.statusCode.name, DataType[dv.value.dataType], dv.value.value];
    }
    out.caps = caps;
    await bob.close();
    await alice.close();
  } catch (e) {
    out.error = String(e.message || e);
  } finally {
    for (const client of clients) await client.disconnect();
    await cm.dispose();
  }
  console.log(JSON.stringify(out));
})();
"""


@pytest.mark.skipif(NODE_MISSING, reason="node-opcua-client not installed (see "
                    "test_opcua_nodeopcua.py)")
@pytest_twisted.ensureDeferred
async def test_node_opcua_sees_call_codes_get_monitored_items_and_capabilities(
        tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "data", free_port(), policies='["Basic256Sha256"]',
                      extra="max_sessions = 17\n" + SOURCE)
    running = await start(cfg)
    script = tmp_path / "methods.js"
    script.write_text(SCRIPT)
    tls = tmp_path / "data" / "tls"

    async def body() -> None:
        cap_ids = {name: getattr(ua.ObjectIds, "Server_ServerCapabilities_" + name) for name in (
            "MaxSessions", "MaxSubscriptionsPerSession", "MaxMonitoredItemsPerSubscription",
            "MaxBrowseContinuationPoints", "MaxStringLength", "OperationLimits_MaxNodesPerRead",
            "ServerProfileArray")}
        out = await run_node(script, [running.url, running.namespace, json.dumps(cap_ids),
                                      *node_client_pki(tmp_path, tls, with_crl=True)])
        assert "error" not in out, out
        assert out["reconnectArgs"] == [0, 0]
        assert out["calls"] == ["Good", "BadTooManyArguments", "BadMethodInvalid",
                                "BadNodeIdUnknown", "BadArgumentsMissing", "BadInvalidArgument"]
        assert out["argResults"] == ["BadTypeMismatch"]
        assert out["bobCall"] == "BadUserAccessDenied"
        assert out["userExecutable"] == [True, False]
        assert out["handles"] == out["expected"] and len(out["handles"]["server"]) == 2
        assert "BadSubscriptionIdInvalid" in out["bobGetMonitoredItems"]
        c = out["caps"]
        assert c["MaxSessions"] == ["Good", "UInt32", 17]
        assert c["MaxSubscriptionsPerSession"] == ["Good", "UInt32", 200]
        assert c["MaxMonitoredItemsPerSubscription"] == ["Good", "UInt32", 200_000]
        assert c["MaxBrowseContinuationPoints"] == ["Good", "UInt16", 10]
        assert c["MaxStringLength"] == ["Good", "UInt32",
                                        running.service.server.limits.max_message_size]
        assert c["OperationLimits_MaxNodesPerRead"] == ["Good", "UInt32", 0]
        assert c["ServerProfileArray"] == [
            "Good", "String", [caps.TRANSPORT_PROFILE, caps.SECURITY_POLICY_URI + "Basic256Sha256",
                               *caps.FACETS]]

    try:
        await aio(body())
    finally:
        await running.root.stopService()
