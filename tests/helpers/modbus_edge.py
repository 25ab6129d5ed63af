"""Modbus listeners for the edge tests: a server with a plain and a Modbus/TCP Security
endpoint on port 0, a client certificate from its CA, pymodbus reads, idle sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor

from iotserver import app, config

TIMEOUT = 10.0

CONFIG = """
[server]
data_dir = "{data}"

[[tags]]
path = "T/Count"
type = "int32"
access = "readwrite"
initial = 7

[modbus.server]
endpoints = ["tcp:0:interface=127.0.0.1", "tls:0:interface=127.0.0.1"]
max_connections = {max_connections}
max_connections_per_peer = {max_connections}
{extra}

[[modbus.server.map]]
path = "T/Count"
table = "holding"
address = 0
type = "int32"
"""


class Modbus:
    def __init__(self, root: Any, core: Any, data: Path) -> None:
        self.root, self.core, self.data = root, core, data
        self.service = core.services["modbus"]
        plain, secure = self.service.listeners.listeners
        self.plain, self.secure = plain, secure
        self.plain_port = plain.port.getHost().port
        self.tls_port = secure.port.getHost().port


async def start(tmp_path: Path, max_connections: int = 64, extra: str = "") -> Modbus:
    text = CONFIG.format(data=tmp_path / "data", max_connections=max_connections, extra=extra)
    root, core = app.build(config.parse(text, source="test.toml"), reactor)
    root.startService()
    await core.services["modbus"].started
    return Modbus(root, core, tmp_path / "data")


def client_tls(tmp_path: Path, m: Modbus) -> ssl.SSLContext:
    """A client certificate with the Engineer role, issued by the server's local CA."""
    from iotserver.security import pki

    tls_dir = m.data / "tls"
    ca_cert, ca_key = pki.load_cert(tls_dir / "ca.pem"), pki.load_key(tls_dir / "ca.key")
    cert, key = pki.issue_client_cert(ca_cert, ca_key, "eng", role="Engineer")  # type: ignore[arg-type]
    pki.write_cert_pem(cert, tmp_path / "eng.pem")
    pki.write_key_pem(key, tmp_path / "eng.key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(tls_dir / "ca.pem")
    ctx.check_hostname = False  # the server certificate is checked against the CA
    ctx.load_cert_chain(tmp_path / "eng.pem", tmp_path / "eng.key")
    return ctx


async def pymodbus_read(port: int, sslctx: ssl.SSLContext | None = None) -> list[int]:
    """Read holding registers 0-1 with pymodbus (over TLS when sslctx: its TLS framer keeps
    the MBAP header, as Modbus/TCP Security does)."""
    from pymodbus.client import AsyncModbusTcpClient, AsyncModbusTlsClient

    client: Any
    if sslctx is None:
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=3, retries=0)
    else:
        client = AsyncModbusTlsClient("127.0.0.1", port=port, sslctx=sslctx, timeout=3,
                                      retries=0)
    sock: Any = None
    try:
        assert await client.connect(), "pymodbus could not connect"
        sock = client.ctx.transport.get_extra_info("socket")
        rr = await client.read_holding_registers(0, count=2, device_id=1)
        assert not rr.isError(), rr
        return list(rr.registers)
    finally:
        client.close()
        # asyncio closes the socket once the TLS close_notify exchange is over: wait for it
        deadline = time.monotonic() + TIMEOUT
        while sock is not None and sock.fileno() != -1 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


def idle_sockets(port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        out.append(s)
    return out


def closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


async def stop(m: Modbus, sockets: list[socket.socket]) -> None:
    for s in sockets:
        s.close()
    await m.root.stopService()
