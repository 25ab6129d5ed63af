"""Interop with node-opcua, another stack: secure channel, login, browse, read, write, subscribe,
history.

Needs ``node`` and the npm package ``node-opcua-client`` installed outside the repository:
``mkdir /tmp/nodeopcua && cd /tmp/nodeopcua && npm install node-opcua-client@2``
(or set ``IOTSERVER_NODE_OPCUA_DIR`` to a folder holding ``node_modules``). Skipped otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from helpers import free_port
from helpers.nodeopcua import NODE_DIR, available
from helpers.opcua import aio, make_config, start

from iotserver import cli
from iotserver.tags.model import Update

pytestmark = pytest.mark.interop

SCRIPT = r"""
const {
  OPCUAClient, MessageSecurityMode, SecurityPolicy, AttributeIds, DataType, UserTokenType,
  TimestampsToReturn, ClientSubscription, ClientMonitoredItem, StatusCodes,
} = require("node-opcua-client");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");

(async () => {
  const [url, user, password, mode, policy, nsUri, pkiDir] = process.argv.slice(2);
  const out = {};
  const certificateManager = new OPCUACertificateManager({
    rootFolder: pkiDir, automaticallyAcceptUnknownCertificate: true });
  const client = OPCUAClient.create({
    applicationName: "nodeopcua-test", applicationUri: "urn:test:nodeopcua",
    securityMode: MessageSecurityMode[mode], securityPolicy: SecurityPolicy[policy],
    endpointMustExist: false, connectionStrategy: { maxRetry: 0 },
    clientCertificateManager: certificateManager,
  });
  try {
    await client.connect(url);
    const session = await client.createSession(
      { type: UserTokenType.UserName, userName: user, password });
    const nsArray = (await session.read(
      { nodeId: "ns=0;i=2255", attributeId: AttributeIds.Value })).value.value;
    const ns = nsArray.indexOf(nsUri);
    const sp = `ns=${ns};s=Line1/Setpoint`;
    const dv = await session.read({ nodeId: sp, attributeId: AttributeIds.Value });
    out.read = dv.value.value;
    out.readType = DataType[dv.value.dataType];
    const br = await session.browse(`ns=${ns};s=Line1`);
    out.browse = br.references.map((r) => r.browseName.name).sort();
    // paged: two references per call, the rest through BrowseNext (Part 4 5.8.3)
    session.requestedMaxReferencesPerNode = 2;
    let page = await session.browse(`ns=${ns};s=Line1`);
    out.pagedFirst = page.references.length;
    out.paged = page.references.map((r) => r.browseName.name);
    out.pages = 1;
    while (page.continuationPoint && page.continuationPoint.length) {
      page = await session.browseNext(page.continuationPoint, false);
      out.paged.push(...page.references.map((r) => r.browseName.name));
      out.pages += 1;
    }
    out.paged.sort();
    session.requestedMaxReferencesPerNode = 0;
    const w1 = await session.write({ nodeId: sp, attributeId: AttributeIds.Value,
      value: { value: { dataType: DataType.Float, value: 77 } } });
    const w2 = await session.write({ nodeId: sp, attributeId: AttributeIds.Value,
      value: { value: { dataType: DataType.Double, value: 78 } } });
    out.writes = [w1.name, w2.name];
    const sub = ClientSubscription.create(session, { requestedPublishingInterval: 50,
      requestedLifetimeCount: 100, requestedMaxKeepAliveCount: 10, publishingEnabled: true });
    const item = ClientMonitoredItem.create(sub,
      { nodeId: `ns=${ns};s=Line1/Temp`, attributeId: AttributeIds.Value },
      { samplingInterval: 0, queueSize: 10, discardOldest: true }, TimestampsToReturn.Both);
    out.notifications = [];
    // wait for the last value the test sends (64), at most 20 s
    let timer;
    const last = new Promise((resolve) => {
      timer = setTimeout(resolve, 20000);
      item.on("changed", (v) => {
        out.notifications.push(v.value.value);
        if (out.notifications.length === 1) console.log("SUBSCRIBED");  // the initial value
        if (v.value.value === 64) resolve();
      });
    });
    await last;
    clearTimeout(timer);
    await sub.terminate();
    const end = new Date(); const start = new Date(end.getTime() - 3600 * 1000);
    const hist = await session.readHistoryValue(`ns=${ns};s=Line1/Temp`, start, end);
    out.history = hist.historyData ? hist.historyData.dataValues.length : -1;
    out.historyStatus = hist.statusCode.name;
    await session.close();
  } catch (e) {
    out.error = String(e.message || e);
  } finally {
    await client.disconnect();
  }
  console.log(JSON.stringify(out));
})();
"""


async def _run_node(script: Path, args: list[str], on_subscribed: Any) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        "node", "--security-revert=CVE-2023-46809", str(script), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "NODE_PATH": str(NODE_DIR / "node_modules")})
    assert proc.stdout is not None
    result: dict[str, Any] = {}
    try:
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if not line:
                break
            text = line.decode().strip()
            if text == "SUBSCRIBED":
                await on_subscribed()
            elif text.startswith("{"):
                result = json.loads(text)
    finally:
        await proc.wait()
    return result


@pytest.mark.skipif(not available(), reason="node-opcua-client not installed (see docstring)")
@pytest_twisted.ensureDeferred
async def test_node_opcua_client_sign_and_encrypt(tmp_path: Path) -> None:
    running = await start(make_config(tmp_path / "data", free_port(),
                                      policies='["Basic256Sha256"]'))
    script = tmp_path / "client.js"
    script.write_text(SCRIPT)
    for k in range(5):
        running.store.apply([Update("Line1/Temp", 50.0 + k,
                                    source_ns=running.store.now_ns() - (10 - k) * 10**9)])
    args = [running.url, "alice", "alice-secret", "SignAndEncrypt", "Basic256Sha256",
            running.namespace, str(tmp_path / "node-pki")]

    async def changes() -> None:
        for k in range(5):
            running.store.apply([Update("Line1/Temp", 60.0 + k)])
            running.store.flush()  # each its own change

    async def body() -> None:
        first = await _run_node(script, args, changes)  # its certificate is not trusted yet
        assert "BadCertificateUntrusted" in first.get("error", ""), first
        rejected = list((running.pki / "rejected" / "certs").iterdir())
        assert len(rejected) == 1
        # the operator's way: list, then trust by thumbprint (iotserver certs list / trust)
        from iotserver.security.trustcli import entries

        (entry,) = [e for e in entries(running.pki) if e.state == "rejected"]
        assert entry.application_uri == "urn:test:nodeopcua"
        assert cli.main(["certs", "trust", entry.thumbprint[:10],
                         "--opcua-pki", str(running.pki)]) == 0
        assert (running.pki / "trusted" / "certs" / rejected[0].name).is_file()
        out = await _run_node(script, args, changes)
        assert "error" not in out, out
        assert out["read"] == 10 and out["readType"] == "Float"
        assert out["browse"] == ["Count", "Name", "Profile", "Running", "Setpoint", "Temp"]
        assert out["pagedFirst"] == 2 and out["pages"] == 3  # BrowseNext, two per page
        assert out["paged"] == out["browse"]
        assert out["writes"] == ["Good", "BadTypeMismatch"]
        assert running.store.read("Line1/Setpoint").value == 77
        assert out["notifications"][-1] == 64.0 and len(out["notifications"]) >= 5
        assert out["history"] >= 10 and out["historyStatus"] == "Good"

    try:
        await aio(body())
    finally:
        await running.root.stopService()
