"""Re-activating another client's session from a signed and encrypted channel (Part 4 5.6.3):
asyncua clients with real certificates."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import pytest_twisted
from asyncua import ua
from asyncua.ua.uaerrors import UaStatusCodeError
from helpers import free_port
from helpers.opcua import PASSWORDS, aio, client, make_client_cert, make_config, start


@pytest_twisted.ensureDeferred
async def test_another_certificate_cannot_take_over_a_session(tmp_path: Path) -> None:
    running = await start(make_config(tmp_path / "data", free_port()))
    policy = "Basic256Sha256,SignAndEncrypt"
    cert_a, key_a = make_client_cert(tmp_path, "station-a")
    cert_b, key_b = make_client_cert(tmp_path, "station-b")
    for cert in (cert_a, cert_b):
        shutil.copy(cert, running.pki / "trusted" / "certs" / cert.name)
    layer = running.service.layer

    async def body() -> None:
        async with client(running, user="alice", security=policy, cert=cert_a, key=key_a) as a, \
                client(running, user="alice", security=policy, cert=cert_b, key=key_b) as b:
            victim = a.uaclient.session.authentication_token
            own = b.uaclient.session.authentication_token
            b.uaclient.session.restore_authentication_token(victim)
            with pytest.raises(UaStatusCodeError) as info:
                await b.activate_session(username="alice", password=PASSWORDS["alice"])
            assert info.value.code == ua.StatusCodes.BadSecurityChecksFailed
            assert layer.table.stats.takeover_refused == 1
            b.uaclient.session.restore_authentication_token(own)
            # both sessions carry on, each on its own channel
            assert await a.nodes.server_state.read_value() == 0
            assert await b.nodes.server_state.read_value() == 0

    try:
        await aio(body())
    finally:
        await running.root.stopService()
