"""The simulated PLC: answers, changing values, fault injection, the sim-plc command."""

from __future__ import annotations

import argparse
import os
import signal
import struct
import sys
from typing import Any

import pytest
import pytest_twisted
from helpers import wait_for
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.python.failure import Failure

from iotserver.sim.plc import SimPLC, _parse_fault, setup


@pytest.fixture(scope="module", autouse=True)
def _listener_reservation() -> None:
    """Twisted keeps one /dev/null fd reserved once any port listens: not a test's leak."""
    from twisted.internet.tcp import _reservedFD

    _reservedFD.reserve()


def adu(tid: int, pdu: bytes, unit: int = 1) -> bytes:
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


def test_answers_and_values() -> None:
    plc = SimPLC(registers=10, interval=0)
    t = plc.tick_count
    out = plc.answer(1, 1, struct.pack(">BHH", 3, 0, 3))
    assert out == adu(1, bytes((3, 6)) + struct.pack(">HHH", t, t + 1, t + 2))
    plc.tick()
    out = plc.answer(2, 1, struct.pack(">BHH", 3, 0, 1))
    assert out == adu(2, bytes((3, 2)) + struct.pack(">H", t + 1))
    sine = plc.answer(3, 1, struct.pack(">BHH", 4, 0, 2))
    assert sine is not None and abs(struct.unpack(">f", sine[9:13])[0]) <= 100
    # writes stick above the simulated range
    assert plc.answer(4, 1, struct.pack(">BHHBHH", 0x10, 100, 2, 4, 1, 2)) == adu(
        4, struct.pack(">BHH", 0x10, 100, 2))
    assert list(plc.holding[100:102]) == [1, 2]
    assert plc.answer(5, 1, struct.pack(">BHH", 5, 50, 0xFF00)) is not None and plc.coils[50] == 1
    # protocol errors come from the codec: quantity 0 -> 03
    assert plc.answer(6, 1, struct.pack(">BHH", 3, 0, 0)) == adu(6, bytes((0x83, 3)))


def test_fault_ranges_and_units() -> None:
    plc = SimPLC(registers=10, interval=0, unit_ids=frozenset({1}))
    plc.fail("holding", 5, 8, 4)
    assert plc.answer(1, 1, struct.pack(">BHH", 3, 0, 5)) is not None
    assert plc.answer(2, 1, struct.pack(">BHH", 3, 4, 2)) == adu(2, bytes((0x83, 4)))
    assert plc.answer(3, 1, struct.pack(">BHH", 4, 5, 1))[7] == 4  # type: ignore[index]
    assert plc.answer(4, 2, struct.pack(">BHH", 3, 0, 1)) is None  # unknown unit: silence
    plc.clear_faults()
    assert plc.answer(5, 1, struct.pack(">BHH", 3, 5, 1))[7] == 3  # type: ignore[index]


class Client(Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buf += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_network_faults_and_restart() -> None:
    clock = task.Clock()  # the PLC's delays run on it; its sockets on the reactor
    plc = SimPLC(interval=0.01, clock=clock)
    port = await plc.start()
    try:
        c = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Client())
        assert c.transport is not None
        plc.delay = 0.2
        c.transport.write(adu(1, struct.pack(">BHH", 3, 0, 1)))
        pending = len(clock.getDelayedCalls())
        await wait_for(lambda: len(clock.getDelayedCalls()) > pending, what="the delayed answer")
        clock.advance(0.1)
        assert c.buf == b""
        clock.advance(0.1)
        await wait_for(lambda: len(c.buf) == 11, what="the answer after the delay")
        plc.delay = 0
        plc.drop_next = 1
        c.transport.write(adu(2, struct.pack(">BHH", 3, 0, 1)))
        await c.lost.addTimeout(5, reactor)
        await plc.restart()
        assert plc.port == port
        c = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Client())
        assert c.transport is not None
        c.transport.write(adu(3, struct.pack(">BHH", 3, 0, 1)))
        await wait_for(lambda: len(c.buf) == 11, what="the answer after the restart")
        assert c.buf[:2] == b"\x00\x03"
        c.transport.loseConnection()
        await c.lost
    finally:
        await plc.stop()


def test_cli_options() -> None:
    parser = argparse.ArgumentParser()
    handler = setup(parser)
    args = parser.parse_args(["--port", "1502", "--registers", "50", "--fail", "holding:10-19:4"])
    assert callable(handler) and args.port == 1502 and args.registers == 50
    assert _parse_fault("holding:10-19:4") == ("holding", 10, 20, 4)
    assert _parse_fault("coil:0-0") == ("coil", 0, 1, 2)
    with pytest.raises(ValueError):
        _parse_fault("registers:1")


class _Proc(ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[Any] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if b"simulated PLC on" in self.out and not self.ready.called:
            self.ready.callback(None)

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(reason.value)


@pytest_twisted.ensureDeferred
async def test_sim_plc_command(free_port: int) -> None:
    proto = _Proc()
    env = dict(os.environ)
    proc = reactor.spawnProcess(  # type: ignore[attr-defined]
        proto, sys.executable,
        [sys.executable, "-m", "iotserver.cli", "sim-plc", "--port", str(free_port)], env=env)
    try:
        await proto.ready.addTimeout(20, reactor)
        c = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", free_port), Client())
        assert c.transport is not None
        c.transport.write(adu(1, struct.pack(">BHH", 3, 0, 2)))
        await wait_for(lambda: len(c.buf) >= 13, what="the answer")
        assert len(c.buf) == 13
        c.transport.loseConnection()
        await c.lost
    finally:
        proc.signalProcess(signal.SIGTERM)
        await proto.ended.addTimeout(10, reactor)
