"""The local CA's CRL makes a strict node-opcua client accept the server certificate.

node-opcua checks revocation for every CA in the server's chain and refuses a CA-signed
certificate whose issuer has no CRL (Bad_CertificateRevocationUnknown). The client here trusts
only ``ca.pem`` (no automatic acceptance): without ``ca.crl`` it is refused, with it it reads.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from test_opcua_harness import aio, free_port, make_config, start
from test_opcua_nodeopcua import NODE_DIR, _available

from iotserver.security import pki, pki_crl

NODE_MISSING = not _available() and os.environ.get("CI") != "true"  # CI: a missing peer fails

STRICT_CLIENT = r"""
const { OPCUAClient, MessageSecurityMode, SecurityPolicy, AttributeIds, UserTokenType } =
  require("node-opcua-client");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");
(async () => {
  const [url, user, password, nsUri, pkiDir, certFile, keyFile] = process.argv.slice(2);
  const out = {};
  // strict: only what is in trusted/ (our ca.pem, and ca.crl when the test put it there)
  const cm = new OPCUACertificateManager({
    rootFolder: pkiDir, automaticallyAcceptUnknownCertificate: false });
  await cm.initialize();
  const client = OPCUAClient.create({
    applicationName: "nodeopcua-crl", applicationUri: "urn:test:nodeopcua",
    securityMode: MessageSecurityMode.SignAndEncrypt,
    securityPolicy: SecurityPolicy.Basic256Sha256,
    endpointMustExist: false, connectionStrategy: { maxRetry: 0 },
    clientCertificateManager: cm, certificateFile: certFile, privateKeyFile: keyFile,
  });
  try {
    await client.connect(url);
    const session = await client.createSession(
      { type: UserTokenType.UserName, userName: user, password });
    const nsArray = (await session.read(
      { nodeId: "ns=0;i=2255", attributeId: AttributeIds.Value })).value.value;
    const ns = nsArray.indexOf(nsUri);
    const dv = await session.read(
      { nodeId: `ns=${ns};s=Line1/Setpoint`, attributeId: AttributeIds.Value });
    out.read = dv.value.value;
    await session.close();
  } catch (e) {
    out.error = String(e.message || e);
  } finally {
    await client.disconnect();
    await cm.dispose();
  }
  console.log(JSON.stringify(out));
})();
"""


def node_client_pki(tmp_path: Path, tls: Path, *, with_crl: bool) -> list[str]:
    """A node-opcua PKI that trusts our ca.pem (and ca.crl), and a client certificate from
    our CA, which the server trusts: [pki folder, certificate file, key file]."""
    ca_cert, ca_key = pki.load_cert(tls / "ca.pem"), pki.load_key(tls / "ca.key")
    cert, key = pki.issue_opcua_app_cert(ca_cert, ca_key, "urn:test:nodeopcua",  # type: ignore[arg-type]
                                         common_name="nodeopcua-test", dns_names=["localhost"],
                                         ip_addresses=[])
    pki.write_cert_pem(cert, tmp_path / "client.pem", force=True)
    pki.write_key_pem(key, tmp_path / "client.key", force=True)
    node_pki = tmp_path / "node-pki"
    (node_pki / "trusted" / "certs").mkdir(parents=True, exist_ok=True)
    (node_pki / "trusted" / "crl").mkdir(parents=True, exist_ok=True)
    shutil.copy(tls / "ca.pem", node_pki / "trusted" / "certs" / "ca.pem")  # as docs/opcua.md
    if with_crl:
        shutil.copy(tls / "ca.crl", node_pki / "trusted" / "crl" / "ca.crl")
    return [str(node_pki), str(tmp_path / "client.pem"), str(tmp_path / "client.key")]


async def run_node(script: Path, args: list[str]) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        "node", "--security-revert=CVE-2023-46809", str(script), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "NODE_PATH": str(NODE_DIR / "node_modules")})
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    assert lines, out.decode()[-2000:]
    result: dict[str, Any] = json.loads(lines[-1])
    return result


@pytest_twisted.ensureDeferred
async def test_server_start_publishes_the_crl_beside_ca_pem_and_in_the_issuers_folder(
        tmp_path: Path) -> None:
    running = await start(make_config(tmp_path / "data", free_port()))
    try:
        tls = tmp_path / "data" / "tls"
        ca = pki.load_cert(tls / "ca.pem")
        crl = pki_crl.load_crl(tls / "ca.crl")
        assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
        copy = running.pki / "issuers" / "crl" / pki_crl.OPCUA_CRL_NAME
        assert x509.load_der_x509_crl(copy.read_bytes()) == crl
        assert pki_crl.renewal_reason(crl, ca) is None
    finally:
        await running.root.stopService()


@pytest.mark.interop
@pytest.mark.skipif(NODE_MISSING, reason="node-opcua-client not installed (see "
                    "test_opcua_nodeopcua.py)")
@pytest_twisted.ensureDeferred
async def test_strict_node_opcua_client_needs_and_accepts_our_crl(tmp_path: Path) -> None:
    running = await start(make_config(tmp_path / "data", free_port(),
                                      policies='["Basic256Sha256"]'))
    tls = tmp_path / "data" / "tls"
    script = tmp_path / "strict.js"
    script.write_text(STRICT_CLIENT)
    # the client's own certificate comes from our CA, which the server trusts: the test is
    # about the client's view of the server certificate only
    base = [running.url, "alice", "alice-secret", running.namespace]

    async def body() -> None:
        without = await run_node(script, base + node_client_pki(tmp_path, tls, with_crl=False))
        assert "BadCertificateRevocationUnknown" in without.get("error", ""), without
        with_crl = await run_node(script, base + node_client_pki(tmp_path, tls, with_crl=True))
        assert with_crl == {"read": 10}, with_crl

    try:
        await aio(body())
    finally:
        await running.root.stopService()
