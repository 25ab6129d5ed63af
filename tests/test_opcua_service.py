"""Service lifecycle: startup failures, idempotent stop, certificates, built-in default."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from helpers import free_port
from helpers.opcua import aio, client, make_config, start

from iotserver import config
from iotserver.lifecycle import StartupError
from iotserver.security import pki


@pytest_twisted.ensureDeferred
async def test_port_in_use_fails_start_and_stop_cleans_up(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(StartupError, match="cannot listen"):
            await start(make_config(tmp_path / "data", port))


@pytest_twisted.ensureDeferred
async def test_application_certificate_names_uri_and_is_signed_by_local_ca(
        tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "data", free_port(),
                      extra='application_uri = "urn:plant7:iotserver"')
    running = await start(cfg)
    await running.root.stopService()
    cert = pki.load_cert(running.pki / "own" / "certs" / "iotserver.der")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:plant7:iotserver"]
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    ca = pki.load_cert(tmp_path / "data" / "tls" / "ca.pem")
    cert.verify_directly_issued_by(ca)
    for sub in ("trusted/certs", "trusted/crl", "issuers/certs", "issuers/crl",
                "rejected/certs", "own/private"):
        assert (running.pki / sub).is_dir()
    # a second start keeps the certificate
    running = await start(cfg)
    await running.root.stopService()
    again = pki.load_cert(running.pki / "own" / "certs" / "iotserver.der")
    assert again == cert


def test_builtin_default_offers_loopback_only_with_warnings() -> None:
    cfg = config.load(None)
    opcua = cfg.sections["opcua"]
    assert opcua.loopback and opcua.host == "127.0.0.1"
    assert "None" in opcua.security_policies and opcua.allow_anonymous
    assert len(opcua.warnings()) == 2


@pytest_twisted.ensureDeferred
async def test_harness_starts_and_stops_cleanly(tmp_path: Path) -> None:
    running = await start(make_config(tmp_path / "data", free_port(), anonymous=True))
    try:
        async def body() -> None:
            async with client(running) as c:
                assert await c.nodes.server_state.read_value() == 0  # Running
        await aio(body())
    finally:
        await running.root.stopService()
    await running.root.stopService()  # idempotent
