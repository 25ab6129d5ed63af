"""The local CA's CRL makes a strict node-opcua client accept the server certificate.

node-opcua checks revocation for every CA in the server's chain and refuses a CA-signed
certificate whose issuer has no CRL (Bad_CertificateRevocationUnknown). The client here trusts
only ``ca.pem`` (no automatic acceptance): without ``ca.crl`` it is refused, with it it reads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from helpers import free_port
from helpers.nodeopcua import NODE_MISSING, node_client_pki, run_node
from helpers.opcua import aio, make_config, start

from iotserver.security import pki, pki_crl

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
