"""Shared helpers for the OPC UA tests (a module so the other test modules can import it).

The server runs in-process through ``app.build`` on the asyncio reactor; asyncua clients are
asyncio code, awaited from Twisted-style tests through :func:`aio`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from iotserver import app, config
from iotserver.security.users import Role, User, hash_password, save_users

PASSWORDS = {"alice": "alice-secret", "bob": "bob-secret", "carol": "carol-secret"}
ROLES = {"alice": Role.ENGINEER, "bob": Role.OPERATOR, "carol": Role.ADMIN}

TAGS = """
[[tags]]
path = "Line1/Temp"
type = "float64"
unit = "degC"
range = [0, 100]
description = "Oven temperature"
history = 5000

[[tags]]
path = "Line1/Setpoint"
type = "float32"
access = "readwrite"
range = [0, 200]
initial = 10

[[tags]]
path = "Line1/Count"
type = "int32"
access = "readwrite"
initial = 0
history = 100

[[tags]]
path = "Line1/Running"
type = "boolean"
access = "readwrite"
initial = false

[[tags]]
path = "Line1/Name"
type = "string"
access = "readwrite"
initial = "press"

[[tags]]
path = "Line1/Profile"
type = "int16"
shape = [4]
access = "readwrite"
initial = [1, 2, 3, 4]

[[tags]]
path = "Line2/Oven/Zone1/Temp"
type = "float32"
range = [0, 400]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def aio(coro: Coroutine[Any, Any, Any]) -> Deferred[Any]:
    """Await asyncio code from a Twisted-style test (facts.md bridging rule)."""
    return Deferred.fromFuture(asyncio.ensure_future(coro))


def write_users(path: Path) -> None:
    users = [User(name, ROLES[name], hash_password(pw, n=2**10)) for name, pw in PASSWORDS.items()]
    users.append(User("dave", Role.ENGINEER, None, ("dave-cert",)))
    save_users(path, users)


def make_config(data_dir: Path, port: int, *, anonymous: bool = False,
                policies: str = '["None", "Basic256Sha256"]', extra: str = "",
                simulator: bool = False, tags: str = TAGS) -> config.Config:
    text = f"""
[server]
data_dir = "{data_dir}"

[simulator]
enabled = {str(simulator).lower()}

{tags}

[opcua]
endpoint = "opc.tcp://127.0.0.1:{port}/iotserver"
security_policies = {policies}
allow_anonymous = {str(anonymous).lower()}
{extra}
"""
    return config.parse(text, source="test.toml")


class Running:
    def __init__(self, root: Any, core: Any, cfg: config.Config) -> None:
        self.root = root
        self.core = core
        self.cfg = cfg
        self.service = core.services["opcua"]
        self.url = cfg.sections["opcua"].endpoint
        self.namespace = cfg.sections["opcua"].namespace
        self.pki = cfg.sections["opcua"].pki_path(cfg.server.data_dir)

    @property
    def store(self) -> Any:
        return self.core.store

    async def wait_idle(self) -> None:
        """Wait (asyncio) until the server holds no client connection (leak check)."""
        layer = self.service.layer
        for _ in range(200):
            if layer is None or not layer.listener.channels:
                break
            await asyncio.sleep(0.01)
        for _ in range(3):
            await asyncio.sleep(0)


async def start(cfg: config.Config) -> Running:
    """Build and start the server (Twisted-style coroutine)."""
    cfg.server.data_dir.mkdir(parents=True, exist_ok=True)
    write_users(cfg.server.users_file)
    root, core = app.build(cfg, reactor)
    root.startService()
    service = core.services["opcua"]
    await service.started
    if service.failure is not None:
        await root.stopService()
        service.failure.raiseException()
    return Running(root, core, cfg)


@contextlib.asynccontextmanager
async def client(running: Running, *, user: str | None = None, password: str | None = None,
                 security: str | None = None, app_uri: str = "urn:test:client",
                 cert: Path | None = None, key: Path | None = None,
                 user_cert: Path | None = None, user_key: Path | None = None,
                 ) -> AsyncIterator[Any]:
    """An asyncua client session (asyncio context manager)."""
    from asyncua import Client

    c = Client(running.url, timeout=10)
    c.application_uri = app_uri
    if user is not None:
        c.set_user(user)
        c.set_password(password if password is not None else PASSWORDS[user])
    if user_cert is not None:
        await c.load_client_certificate(str(user_cert))
        await c.load_private_key(str(user_key))
    if security is not None:
        await c.set_security_string(f"{security},{cert},{key}")
    try:
        await c.connect()
    except BaseException:
        with contextlib.suppress(Exception):
            await c.disconnect()
        await running.wait_idle()
        raise
    try:
        yield c
    finally:
        with contextlib.suppress(Exception):
            await c.disconnect()
        await running.wait_idle()


def make_client_cert(folder: Path, name: str, app_uri: str = "urn:test:client"
                     ) -> tuple[Path, Path]:
    """A self-signed client application certificate (DER) and key (PEM)."""
    from iotserver.opcua.security import _self_signed_app_cert
    from iotserver.security import pki

    cert, key = _self_signed_app_cert(app_uri, name, ["localhost"], ["127.0.0.1"])
    folder.mkdir(parents=True, exist_ok=True)
    cert_path = pki.write_cert_der(cert, folder / f"{name}.der", force=True)
    key_path = pki.write_key_pem(key, folder / f"{name}.pem", force=True)
    return cert_path, key_path


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


@pytest.fixture
def port() -> int:
    return free_port()
