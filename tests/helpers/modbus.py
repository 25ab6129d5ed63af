"""Modbus/TCP as a test client speaks it: :class:`Raw` (raw frames over a Twisted TCP
connection), the frame builders (:func:`adu`, :func:`read_hr`, :func:`write_hr`, :func:`exc`,
:func:`f32`), :func:`mbpoll`, the libmodbus command-line client, and :func:`device_config`,
a poller device with fast timings for the tests that poll a PLC."""

from __future__ import annotations

import shutil
import struct

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure

from iotserver import config
from iotserver.modbus.config import DeviceConfig
from iotserver.modbus.encoding import FLOAT32, Order, encode_value

TIMEOUT = 5.0


class Raw(Protocol):
    """A raw TCP client: send bytes, wait for a number of bytes back."""

    def __init__(self) -> None:
        self.buf = b""
        self.lost: Deferred[None] = Deferred()
        self._want: tuple[int, Deferred[bytes]] | None = None

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        self._check()

    def _check(self) -> None:
        if self._want and len(self.buf) >= self._want[0]:
            n, d = self._want
            self._want = None
            out, self.buf = self.buf[:n], self.buf[n:]
            d.callback(out)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def read(self, n: int) -> bytes:
        d: Deferred[bytes] = Deferred()
        self._want = (n, d)
        self._check()
        return await d.addTimeout(TIMEOUT, reactor)

    async def close(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()
        await self.lost.addTimeout(TIMEOUT, reactor)


async def raw(port: int) -> Raw:
    ep = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    return await connectProtocol(ep, Raw())


def adu(tid: int, pdu: bytes, unit: int = 1) -> bytes:
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


def read_hr(tid: int, address: int, count: int, unit: int = 1) -> bytes:
    return adu(tid, struct.pack(">BHH", 3, address, count), unit)


def write_hr(tid: int, address: int, regs: list[int]) -> bytes:
    body = struct.pack(">BHHB", 0x10, address, len(regs), 2 * len(regs))
    return adu(tid, body + struct.pack(f">{len(regs)}H", *regs))


def f32(value: float) -> list[int]:
    return [int(r) for r in encode_value(FLOAT32, Order.ABCD, value)]


def exc(tid: int, fc: int, code: int, unit: int = 1) -> bytes:
    return adu(tid, bytes((fc | 0x80, code)), unit)


def _mbpoll() -> str:
    path = shutil.which("mbpoll")
    if path is None:
        pytest.skip("mbpoll not installed (apt install mbpoll)")
    return path


async def mbpoll(*args: str) -> tuple[str, int]:
    out, err, code = await getProcessOutputAndValue(_mbpoll(), args, env={})
    return out.decode() + err.decode(), code


def device_config(port: int, tags: str, extra: str = "", name: str = "plc1") -> DeviceConfig:
    text = f"""
[[modbus.devices]]
name = "{name}"
endpoint = "127.0.0.1:{port}"
interval = 0.05
timeout = 0.25
backoff = {{ initial = 0.05, max = 0.2, jitter = 0.1 }}
{extra}
{tags}
"""
    cfg = config.parse(text, source="test.toml")
    return cfg.sections["modbus"].devices[0]  # type: ignore[no-any-return]
