"""The TLS policy of every TLS listener, checked with ``openssl s_client`` as the peer: TLS 1.3
preferred, TLS 1.2 only with ECDHE key exchange and AEAD suites."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.utils import getProcessOutputAndValue

from helpers.modbus_edge import client_tls, start, stop

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl s_client"),
]


async def s_client(port: int, tmp_path: Path, *args: str) -> tuple[str, int]:
    """A handshake (with the client certificate Modbus/TCP Security requires); stdin is empty,
    so s_client closes right after it. Its exit status then depends on how the close went, so
    the tests read what it printed about the handshake."""
    out, err, code = await getProcessOutputAndValue(
        shutil.which("openssl"),  # type: ignore[arg-type]
        ["s_client", "-connect", f"127.0.0.1:{port}", "-cert", str(tmp_path / "eng.pem"),
         "-key", str(tmp_path / "eng.key"), "-brief", *args])
    return (out + err).decode("utf-8", "replace"), code


@pytest_twisted.ensureDeferred
async def test_tls_policy_with_openssl_s_client(tmp_path: Path) -> None:
    m = await start(tmp_path)
    client_tls(tmp_path, m)
    port = m.tls_port
    try:
        # TLS 1.3 is what a client that offers it gets
        out, _ = await s_client(port, tmp_path)
        assert "CONNECTION ESTABLISHED" in out and "Protocol version: TLSv1.3" in out, out
        # TLS 1.2 with ECDHE and AES-GCM is accepted
        out, _ = await s_client(port, tmp_path, "-tls1_2", "-cipher", "ECDHE+AESGCM")
        assert "Protocol version: TLSv1.2" in out, out
        assert "Ciphersuite: ECDHE-RSA-AES256-GCM-SHA384" in out, out
        # static RSA key exchange (no forward secrecy) and CBC-SHA1 suites are refused
        for cipher in ("AES128-SHA", "AES256-GCM-SHA384", "ECDHE-RSA-AES128-SHA",
                       "AES128-SHA256", "ECDHE-RSA-AES256-SHA384"):
            out, code = await s_client(port, tmp_path, "-tls1_2", "-cipher", cipher)
            assert "CONNECTION ESTABLISHED" not in out and "handshake failure" in out, (
                cipher, out)
            assert code != 0
        # and nothing older than TLS 1.2
        out, code = await s_client(port, tmp_path, "-tls1_1")
        assert "CONNECTION ESTABLISHED" not in out and code != 0, out
    finally:
        await stop(m, [])
