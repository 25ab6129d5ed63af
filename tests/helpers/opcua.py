"""Shared helpers for the OPC UA tests.

The server runs in-process through ``app.build`` on the asyncio reactor; asyncua clients are
asyncio code, awaited from Twisted-style tests through :func:`aio`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from helpers import aio as aio  # re-exported: the OPC UA tests await clients through it
from helpers import free_port, wait_for_aio
from twisted.internet import reactor

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

    def channels(self) -> int:
        layer = self.service.layer
        return 0 if layer is None else len(layer.listener.channels)

    async def wait_idle(self, at_most: int = 0) -> None:
        """Wait (asyncio) until the server holds at most ``at_most`` client connections (the
        ones of enclosing clients: a leak check for the client that just left)."""
        await wait_for_aio(lambda: self.channels() <= at_most,
                           what="the server to close its client connections")
        for _ in range(3):  # let the closed connections' callbacks run
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

    before = running.channels()
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
        await running.wait_idle(before)
        raise
    try:
        yield c
    finally:
        with contextlib.suppress(Exception):
            await c.disconnect()
        await running.wait_idle(before)


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


#: An OPC UA client source (a PLC that is never reachable): its reconnect method is callable.
OPCUA_CLIENT_SOURCE = f"""
[[opcua.clients]]
name = "plc1"
endpoint = "opc.tcp://127.0.0.1:{free_port()}/plc"
reconnect_min_s = 5
reconnect_max_s = 10

[[opcua.clients.nodes]]
node_id = "nsu=urn:test:plc;s=Temp"
path = "PLC1/Temp"
type = "float64"
"""
