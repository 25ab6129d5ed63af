"""A simulated Modbus TCP PLC with changing values and fault injection, on our own codec.

For trying the poller (``iotserver sim-plc --port 5021``) and for tests and benchmarks, which
use :class:`SimPLC` directly. Every address of the four tables exists (65536 each). Holding
registers ``0..registers-1`` count up (register i = tick + i), input registers hold float32
sine waves (ABCD, two registers each), coils and discrete inputs toggle. Clients may write
coils and holding registers (a written register keeps its value until the next tick only for
addresses ``>= registers``, so writes to the upper range stick).

Faults: :meth:`stop` / :meth:`start` (the same port again), ``delay`` (seconds before each
answer), ``silent`` (never answer), :meth:`fail` (exception code for an address range),
``drop_next`` (close the connection on the next N requests, before answering).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from iotserver.modbus.codec import (
    ExceptionCode,
    ExceptionResponse,
    FrameDecoder,
    MaskWrite,
    ModbusFramingError,
    ReadBits,
    ReadDeviceId,
    ReadRegisters,
    ReadWriteRegisters,
    ReportServerId,
    Table,
    WriteCoil,
    WriteCoils,
    WriteRegister,
    WriteRegisters,
    device_id_response,
    encode_exception,
    encode_read_bits_response,
    encode_read_registers_response,
    encode_report_server_id_response,
    encode_write_response,
    parse_request,
)
from iotserver.modbus.encoding import pack_bits

__all__ = ["Fault", "SimPLC", "setup"]

log = Logger(namespace="iotserver.sim.plc")

_TABLES = {"coil": Table.COILS, "discrete": Table.DISCRETE_INPUTS,
           "holding": Table.HOLDING_REGISTERS, "input": Table.INPUT_REGISTERS}


@dataclass(frozen=True)
class Fault:
    """Answer requests touching ``table`` addresses ``start..end-1`` with exception ``code``."""

    table: Table
    start: int
    end: int
    code: int = ExceptionCode.ILLEGAL_DATA_ADDRESS


class _PLCProtocol(Protocol):
    def __init__(self, plc: SimPLC) -> None:
        self.plc = plc
        self.decoder = FrameDecoder()

    def connectionMade(self) -> None:
        self.plc.connections.add(self)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.plc.connections.discard(self)

    def dataReceived(self, data: bytes) -> None:
        plc = self.plc
        transport: Any = self.transport
        assert transport is not None
        try:
            frames = self.decoder.feed(data)
        except ModbusFramingError:
            transport.abortConnection()
            return
        for frame in frames:
            plc.requests += 1
            if plc.drop_next > 0:
                plc.drop_next -= 1
                transport.abortConnection()
                return
            if plc.silent:
                continue
            out = plc.answer(frame.transaction_id, frame.unit_id, frame.pdu)
            if out is None:
                continue
            if plc.delay > 0:
                plc.clock.callLater(plc.delay, self._late, out)
            else:
                transport.write(out)

    def _late(self, out: bytes) -> None:
        transport: Any = self.transport
        if transport is not None and self in self.plc.connections:
            transport.write(out)


class SimPLC:
    """A Modbus TCP server with a plain register image, changing values and faults."""

    def __init__(self, port: int = 0, *, interface: str = "127.0.0.1", registers: int = 1000,
                 interval: float = 0.1, unit_ids: frozenset[int] | None = None,
                 clock: IReactorTime | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        assert clock is not None
        self.clock: Any = clock
        self.port = port
        self.interface = interface
        self.registers = registers
        self.interval = interval
        self.unit_ids = unit_ids
        self.holding = np.zeros(65536, dtype=">u2")
        self.input = np.zeros(65536, dtype=">u2")
        self.coils = np.zeros(65536, dtype=np.uint8)
        self.discrete = np.zeros(65536, dtype=np.uint8)
        self.tick_count = 0
        self.delay = 0.0
        self.silent = False
        self.drop_next = 0
        self.faults: list[Fault] = []
        self.requests = 0
        self.connections: set[_PLCProtocol] = set()
        self._listening: Any = None
        self._loop: LoopingCall | None = None
        self.on_write: Callable[[Table, int, int], None] | None = None
        self.tick()

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> int:
        """Listen (on the same port as before after a stop); returns the port."""
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ServerEndpoint

        factory = Factory.forProtocol(lambda: _PLCProtocol(self))
        factory.noisy = False
        endpoint = TCP4ServerEndpoint(reactor, self.port, interface=self.interface)
        self._listening = await endpoint.listen(factory)
        self.port = self._listening.getHost().port
        if self.interval > 0 and self._loop is None:
            self._loop = LoopingCall(self.tick)
            self._loop.clock = self.clock
            self._loop.start(self.interval, now=False)
        return self.port

    async def stop(self) -> None:
        """Stop listening and drop every connection (a PLC switched off)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        listening, self._listening = self._listening, None
        if listening is not None:
            await listening.stopListening()
        for proto in list(self.connections):
            if proto.transport is not None:
                proto.transport.abortConnection()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def fail(self, table: str | Table, start: int, end: int,
             code: int = ExceptionCode.ILLEGAL_DATA_ADDRESS) -> None:
        """Answer requests touching ``start..end-1`` of ``table`` with exception ``code``."""
        t = _TABLES[table] if isinstance(table, str) else table
        self.faults.append(Fault(t, start, end, code))

    def clear_faults(self) -> None:
        self.faults.clear()
        self.delay = 0.0
        self.silent = False
        self.drop_next = 0

    # -- values ---------------------------------------------------------------------------
    def tick(self) -> None:
        """Advance the simulated process one step."""
        self.tick_count += 1
        n = self.registers
        t = self.tick_count
        self.holding[:n] = (np.arange(n, dtype=np.int64) + t) & 0xFFFF
        floats = (100.0 * np.sin(np.arange(n // 2) * 0.1 + t * 0.05)).astype(">f4")
        self.input[: 2 * (n // 2)] = floats.view(">u2")
        self.coils[:n] = (np.arange(n) + t) % 2
        self.discrete[:n] = (np.arange(n) // 2 + t) % 2

    def _table(self, table: Table) -> np.ndarray[Any, Any]:
        return {Table.HOLDING_REGISTERS: self.holding, Table.INPUT_REGISTERS: self.input,
                Table.COILS: self.coils, Table.DISCRETE_INPUTS: self.discrete}[table]

    def _fault(self, req: Any) -> int | None:
        for acc in req.accesses:
            for f in self.faults:
                end = acc.address + acc.count
                if f.table is acc.table and acc.address < f.end and f.start < end:
                    return f.code
        return None

    def answer(self, tid: int, unit: int, pdu: bytes) -> bytes | None:
        """The response to one request PDU (None: no answer)."""
        if self.unit_ids is not None and unit not in self.unit_ids:
            return None  # like a gateway whose device does not answer
        req = parse_request(pdu)
        if isinstance(req, ExceptionResponse):
            return encode_exception(tid, unit, req.function, req.code)
        fc = req.function
        code = self._fault(req) if self.faults else None
        if code is not None:
            return encode_exception(tid, unit, fc, code)
        if isinstance(req, ReadRegisters):
            data = self._table(req.table)[req.address:req.address + req.count].tobytes()
            return encode_read_registers_response(tid, unit, fc, data)
        if isinstance(req, ReadBits):
            bits = self._table(req.table)[req.address:req.address + req.count]
            return encode_read_bits_response(tid, unit, fc, pack_bits(bits))
        if isinstance(req, WriteCoil):
            self.coils[req.address] = 1 if req.value else 0
        elif isinstance(req, WriteCoils):
            self.coils[req.address:req.address + req.count] = np.array(req.values, dtype=np.uint8)
        elif isinstance(req, WriteRegister):
            self.holding[req.address] = req.value
        elif isinstance(req, WriteRegisters):
            self.holding[req.address:req.address + req.count] = req.registers
        elif isinstance(req, MaskWrite):
            self.holding[req.address] = req.apply(int(self.holding[req.address]))
        elif isinstance(req, ReadWriteRegisters):
            self.holding[req.write_address:req.write_address + req.write_count] = req.registers
            data = self.holding[req.read_address:req.read_address + req.read_count].tobytes()
            return encode_read_registers_response(tid, unit, fc, data)
        elif isinstance(req, ReportServerId):
            return encode_report_server_id_response(tid, unit, b"iotserver-sim-plc")
        elif isinstance(req, ReadDeviceId):
            return device_id_response(tid, unit, req, {0: b"iotserver", 1: b"SIMPLC", 2: b"1.0"})
        if self.on_write is not None:
            self.on_write(req.table, req.address, getattr(req, "count", 1))
        return encode_write_response(tid, unit, req)


# ------------------------------------------------------------------------------- CLI


def setup(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """``iotserver sim-plc``: run a simulated PLC in the foreground until SIGTERM / Ctrl-C."""
    parser.add_argument("--port", type=int, default=5021, help="TCP port (default 5021)")
    parser.add_argument("--interface", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--registers", type=int, default=1000,
                        help="how many registers/bits of each table change (default 1000)")
    parser.add_argument("--interval", type=float, default=0.1,
                        help="seconds between value changes (default 0.1)")
    parser.add_argument("--delay", type=float, default=0.0,
                        help="fault: seconds before each answer")
    parser.add_argument("--fail", action="append", default=[], metavar="TABLE:START-END[:CODE]",
                        help="fault: answer this range with an exception (e.g. holding:100-199:2)")
    return _run


def _parse_fault(text: str) -> tuple[str, int, int, int]:
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in _TABLES or "-" not in parts[1]:
        raise ValueError(f"expected TABLE:START-END[:CODE], e.g. holding:100-199:2, got {text!r}")
    start, end = (int(x) for x in parts[1].split("-"))
    return parts[0], start, end + 1, int(parts[2], 0) if len(parts) == 3 else 2


def _run(args: argparse.Namespace) -> int:
    import sys

    from twisted.internet import defer
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    try:
        faults = [_parse_fault(f) for f in args.fail]
    except ValueError as exc:
        print(f"iotserver sim-plc: {exc}", file=sys.stderr)
        return 2
    if not 1 <= args.registers <= 65536 or args.interval < 0:
        print("iotserver sim-plc: --registers 1..65536, --interval >= 0", file=sys.stderr)
        return 2
    plc = SimPLC(args.port, interface=args.interface, registers=args.registers,
                 interval=args.interval)
    plc.delay = args.delay
    for f in faults:
        plc.fail(*f)
    status = {"code": 0}

    async def main() -> None:
        try:
            port = await plc.start()
        except Exception as exc:
            print(f"iotserver sim-plc: cannot listen on {args.interface}:{args.port}: {exc}",
                  file=sys.stderr)
            status["code"] = 1
            reactor.stop()
            return
        print(f"simulated PLC on {args.interface}:{port}: holding 0..{args.registers - 1} count "
              f"up, input registers float32 sines, every {args.interval:g} s", flush=True)

    reactor.callWhenRunning(lambda: defer.ensureDeferred(main()))
    reactor.run()
    return status["code"]

