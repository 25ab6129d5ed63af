"""Modbus TCP server: a thin Twisted protocol over the sans-I/O codec and the register image.

Per connection, requests are answered strictly in order (MB TCP 4.2: a client may pipeline
several transactions; we keep its order). Reads are answered at once from the image. A write
waits for the tag store (the owner may be a PLC behind us); while it is pending, later requests
of that connection wait in a queue bounded by ``max_requests_in_flight``; when the queue is
full the connection stops reading (``pauseProducing``), so a client cannot make us buffer more.

Modbus/TCP Security (MB TCP Security spec): on ``tls:`` listeners a client certificate is
required; its role extension (OID 1.3.6.1.4.1.50316.802.1) maps to an access level. A request
the role may not make is answered with exception 01, Illegal Function, as the Modbus/TCP
Security spec's authorization section prescribes for a request the role is not allowed.
"""

from __future__ import annotations

import contextlib
import struct
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.tcp import Connection
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from iotserver import compat_twisted
from iotserver.modbus.codec import (
    ExceptionCode,
    ExceptionResponse,
    Frame,
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
from iotserver.modbus.config import ServerConfig
from iotserver.modbus.encoding import Kind
from iotserver.modbus.image import Binding, Image
from iotserver.ratelog import RateLimitedLog
from iotserver.modbus.writeplan import refused_read_after_write
from iotserver.tags.model import Quality
from iotserver.tags.store import TagStore
from iotserver.tags.writer import Writer

__all__ = ["ModbusServer", "ModbusServerFactory", "ModbusServerProtocol", "ServerStats",
           "quality_exception"]

log = Logger(namespace="iotserver.modbus")

# Final quality of a store write -> Modbus exception code (see docs/modbus.md).
_QUALITY_EXCEPTION: dict[Quality, ExceptionCode] = {
    Quality.BAD_NODE_ID_UNKNOWN: ExceptionCode.ILLEGAL_DATA_ADDRESS,
    Quality.BAD_NOT_WRITABLE: ExceptionCode.ILLEGAL_DATA_ADDRESS,
    Quality.BAD_USER_ACCESS_DENIED: ExceptionCode.ILLEGAL_FUNCTION,
    Quality.BAD_OUT_OF_RANGE: ExceptionCode.ILLEGAL_DATA_VALUE,
    Quality.BAD_TYPE_MISMATCH: ExceptionCode.ILLEGAL_DATA_VALUE,
    Quality.BAD_INVALID_ARGUMENT: ExceptionCode.ILLEGAL_DATA_VALUE,
    Quality.BAD_TIMEOUT: ExceptionCode.GATEWAY_TARGET_DEVICE_FAILED_TO_RESPOND,
    Quality.BAD_COMMUNICATION_ERROR: ExceptionCode.GATEWAY_TARGET_DEVICE_FAILED_TO_RESPOND,
    Quality.BAD_NOT_CONNECTED: ExceptionCode.GATEWAY_TARGET_DEVICE_FAILED_TO_RESPOND,
    Quality.BAD_NO_COMMUNICATION: ExceptionCode.GATEWAY_TARGET_DEVICE_FAILED_TO_RESPOND,
    Quality.BAD_RESOURCE_UNAVAILABLE: ExceptionCode.SERVER_DEVICE_BUSY,
}


def quality_exception(quality: Quality) -> ExceptionCode | None:
    """None for a successful write (Good or Uncertain), else the exception to answer."""
    if not quality.is_bad:
        return None
    return _QUALITY_EXCEPTION.get(quality, ExceptionCode.SERVER_DEVICE_FAILURE)


@dataclass
class ServerStats:
    """Counters for the console and metrics."""

    requests: Counter[int] = field(default_factory=Counter)  # by function code
    exceptions: Counter[tuple[int, int]] = field(default_factory=Counter)  # (fc, code)
    connections_total: int = 0
    denied: int = 0  # TLS client without an allowed role
    framing_errors: int = 0
    ignored: int = 0  # requests for unknown unit ids, unanswered


class ModbusServer:
    """What every connection of every listener shares: the image, the limits, the counters."""

    def __init__(self, cfg: ServerConfig, store: TagStore, clock: IReactorTime) -> None:
        self.cfg = cfg
        self.store = store
        self.clock = clock
        self.image = Image(cfg.map, store, bad_quality=cfg.bad_quality,
                           unmapped_reads=cfg.unmapped_reads)
        self.units = cfg.unit_ids
        self.ignore_unknown_unit = cfg.unknown_unit == "ignore"
        self.objects = cfg.identity.objects()
        self.server_id = cfg.identity.server_id.encode("utf-8")
        self.connections: set[ModbusServerProtocol] = set()
        self.stats = ServerStats()
        # what peers do wrong (framing, certificates, roles): rate-limited, with a count
        self.ratelog = RateLimitedLog(cast(Any, clock), logger=log)
        # the shortcuts through Twisted's internals and the FC06 short way (docs/modbus.md)
        self.fast = cfg.fast_paths and compat_twisted.AVAILABLE
        if cfg.fast_paths and not compat_twisted.AVAILABLE:
            log.warn("modbus: {problem}", problem=compat_twisted.PROBLEM)

    def start(self) -> None:
        self.image.start()

    def stop(self) -> None:
        self.image.stop()

    def factory(self, secure: bool = False) -> ModbusServerFactory:
        return ModbusServerFactory(self, secure)

    def disconnect_all(self) -> None:
        for proto in list(self.connections):
            if proto.transport is not None:
                proto.transport.abortConnection()


class ModbusServerFactory(Factory):
    """One per listener; ``secure`` listeners authorise clients by certificate role."""

    noisy = False  # we log the listener ourselves (core.listening)

    def __init__(self, server: ModbusServer, secure: bool) -> None:
        self.server = server
        self.secure = secure

    def buildProtocol(self, addr: Any) -> ModbusServerProtocol:
        proto = ModbusServerProtocol(self.server, self.secure)
        proto.factory = self
        return proto


_U16 = struct.Struct(">H")
_U16x2 = struct.Struct(">HH")
_FC06_REQ = struct.Struct(">HHHBBHH")  # MBAP + function 06, address, value


@implementer(IHandshakeListener)
class ModbusServerProtocol(Protocol):
    """One client connection. Connection limits and timeouts are the listener's
    (``iotserver.edge``): the guard in front of this protocol enforces them."""

    def __init__(self, server: ModbusServer, secure: bool) -> None:
        self.server = server
        self.secure = secure
        self.decoder = FrameDecoder()
        self.authorized = not secure
        self.can_write = not secure
        self.principal = "modbus"
        self.writer = Writer("", "modbus", "?")  # who the store and the audit trail see
        self.peer = "?"
        self._backlog: deque[Frame] = deque()
        self._busy = False  # a write is waiting for the store
        self._paused = False
        self._closing = False
        self._lost = False
        self._counted = False
        self._eager = False
        self._short = False
        self._recv: Any = None  # the socket's recv, once _read_directly has hooked it
        self._deliver = self.dataReceived  # the transport's protocol (the edge guard, if any)
        self._reader: compat_twisted.DirectReader | None = None

    # -- connection -----------------------------------------------------------------------
    def connectionMade(self) -> None:
        srv = self.server
        transport: Any = self.transport
        assert transport is not None
        peer = transport.getPeer()
        self.peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        self.principal = f"modbus:{getattr(peer, 'host', '?')}"
        self.writer = Writer("", "modbus", self.peer)
        srv.connections.add(self)
        self._counted = True
        self._eager = srv.fast and isinstance(self.transport, Connection)
        self._short = srv.fast  # FC06's short way (_write_register_fast)
        # Replies are small and each goes out in one write: do not let Nagle hold one back
        # behind an unacknowledged earlier reply (pipelining clients).
        set_nodelay = getattr(transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            with contextlib.suppress(OSError):  # not a TCP socket after all
                set_nodelay(True)
        srv.stats.connections_total += 1
        if self._eager:
            self._read_directly()

    def _read_directly(self) -> None:
        """Have the asyncio loop call :meth:`_readable` itself when the socket is readable
        (``compat_twisted.hook_reader``: plain TCP under the asyncio reactor only).

        Each readable event of a Twisted connection otherwise goes through a log context,
        the reactor's ``_readOrWrite`` and ``doRead`` before ``dataReceived``: per request
        about as much CPU as answering it (benchmarks/modbus). Pausing, closing and
        connection loss still go through Twisted; ``_write_finished`` hooks the reader
        again after a resume.
        """
        reader = compat_twisted.hook_reader(self.transport, self._readable)
        if reader is not None:
            self._reader = reader
            self._recv = reader.recv
            # data goes to whatever the transport delivers to: the edge guard sees it first
            self._deliver = getattr(reader.transport.protocol, "dataReceived", self.dataReceived)

    def _readable(self) -> None:
        """The socket is readable: ``_readOrWrite`` + ``doRead`` for this connection."""
        t: Any = self.transport
        reader = self._reader
        assert reader is not None
        if self._lost or t is None or not t.connected:  # not expected: the normal way
            if t is not None:
                reader.normal_read()
            return
        why: Any
        try:
            data = self._recv(65536)  # tcp.Connection.bufferSize
        except BlockingIOError:
            return
        except OSError:
            why = CONNECTION_LOST
        else:
            if data:
                try:
                    self._deliver(data)
                    return
                except Exception as exc:  # as the reactor would: log, then drop the connection
                    log.failure("modbus: handling data from {peer} failed", peer=self.peer)
                    why = exc
            else:
                why = CONNECTION_DONE
        reader.lost(why)

    def handshakeCompleted(self) -> None:
        """TLS is up: authorise by the client certificate's Modbus role."""
        from iotserver.security.pki import read_modbus_role
        from iotserver.security.tls import cert_identity, peer_certificate

        cfg = self.server.cfg
        cert = peer_certificate(self.transport)
        role: str | None = None
        who = "?"
        if cert is not None:
            try:
                who = cert_identity(cert)
            except ValueError:
                who = cert.subject.rfc4514_string()
            try:
                role = read_modbus_role(cert)
            except ValueError as exc:
                self.server.ratelog.warn("role", "modbus: {who} ({peer}): {exc}", who=who,
                                         peer=self.peer, exc=str(exc))
        access = cfg.roles.get(role.lower(), cfg.no_role) if role is not None else cfg.no_role
        if access == "none":
            self.server.stats.denied += 1
            self.server.ratelog.warn("no_access", "modbus: {who} ({peer}) has role {role!r}, "
                                     "which has no access; closing", who=who, peer=self.peer,
                                     role=role)
            self._closing = True
            transport: Any = self.transport
            transport.loseConnection()
            return
        self.authorized = True
        self.can_write = access == "readwrite"
        self.principal = f"modbus:{who}"
        self.writer = Writer(who, "modbus", self.peer)
        log.info("modbus: {who} ({peer}) connected with role {role!r}: {access}", who=who,
                 peer=self.peer, role=role, access=access)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._lost = True
        self._backlog.clear()
        if self._counted:
            self.server.connections.discard(self)
            self._counted = False

    # -- input ----------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if not self.authorized:  # TLS delivers data only after the handshake; be safe anyway
            assert self.transport is not None
            self.transport.abortConnection()
            return
        if len(data) == 12 and data[7] == 6 and self._short and self.can_write \
                and not self._busy and not self.decoder.buffered:
            # One whole FC06 request and nothing buffered: the most common write, short way
            out = self._write_register_fast(data)
            if out is not None:
                if type(out) is bytes:
                    self._send(out)
                else:
                    self._busy = True
                    out.addCallback(self._write_finished)  # type: ignore[union-attr]
                return
        try:
            frames = self.decoder.feed(data)
        except ModbusFramingError as exc:
            # MB TCP 4.4.1.2: nothing valid to resynchronise on; answer what came before, close
            frames = list(exc.frames)
            self._closing = True
            self.server.stats.framing_errors += 1
            self.server.ratelog.info("framing", "modbus: {peer} broke MBAP framing ({msg}); "
                                     "closing", peer=self.peer, msg=str(exc))
        if self._busy:
            self._backlog.extend(frames)
            self._check_pause()
        else:
            self._run(frames)
        if self._closing and not self._busy and not self._lost:
            transport: Any = self.transport
            transport.loseConnection()

    def _run(self, frames: list[Frame]) -> None:
        """Answer frames in order until one has to wait for the store."""
        i = 0
        n = len(frames)
        while i < n:
            out = self._handle(frames[i])
            i += 1
            if out is None:
                continue
            if type(out) is bytes:
                self._send(out)
                continue
            self._busy = True
            if i < n:  # queue the rest first: the answer may come at once
                self._backlog.extend(frames[i:])
                self._check_pause()
            out.addCallback(self._write_finished)  # type: ignore[union-attr]
            return

    def _send(self, data: bytes) -> None:
        """Write a response; on plain TCP straight to the socket when nothing is queued
        (``compat_twisted.send_now``: about half of the server's CPU time per request was
        Twisted's buffering until the next reactor turn, benchmarks/modbus)."""
        if self._eager:
            compat_twisted.send_now(self.transport, data)
        else:
            transport: Any = self.transport
            transport.write(data)

    def _write_finished(self, response: bytes) -> None:
        self._busy = False
        if self._lost:
            return
        transport: Any = self.transport
        self._send(response)
        backlog, self._backlog = self._backlog, deque()
        self._run(list(backlog))
        if self._paused and len(self._backlog) < self.server.cfg.max_requests_in_flight - 1:
            self._paused = False
            transport.resumeProducing()
            if self._recv is not None:
                self._read_directly()
        if self._closing and not self._busy:
            transport.loseConnection()

    def _check_pause(self) -> None:
        if not self._paused and len(self._backlog) + 1 >= self.server.cfg.max_requests_in_flight:
            self._paused = True
            assert self.transport is not None
            self.transport.pauseProducing()

    # -- requests -------------------------------------------------------------------------
    def _exc(self, tid: int, unit: int, fc: int, code: int) -> bytes:
        self.server.stats.exceptions[(fc, code)] += 1
        return encode_exception(tid, unit, fc, code)

    def _handle(self, frame: Frame) -> bytes | Deferred[bytes] | None:
        srv = self.server
        tid, unit, pdu = frame
        fc = pdu[0]
        srv.stats.requests[fc] += 1
        if srv.units is not None and unit not in srv.units:
            if srv.ignore_unknown_unit:
                srv.stats.ignored += 1
                return None
            # MB TCP 4.4.2.1 / MB AP 7: as a gateway whose target did not answer
            return self._exc(tid, unit, fc, ExceptionCode.GATEWAY_TARGET_DEVICE_FAILED_TO_RESPOND)
        req = parse_request(pdu)
        kind = type(req)
        try:
            if kind is ReadRegisters:
                data = srv.image.read_registers(req.table, req.address, req.count)  # type: ignore[union-attr]
                if type(data) is bytes:
                    return encode_read_registers_response(tid, unit, fc, data)
                return self._exc(tid, unit, fc, data)  # type: ignore[arg-type]
            if kind is ReadBits:
                data = srv.image.read_bits(req.table, req.address, req.count)  # type: ignore[union-attr]
                if type(data) is bytes:
                    return encode_read_bits_response(tid, unit, fc, data)
                return self._exc(tid, unit, fc, data)  # type: ignore[arg-type]
            if kind is ExceptionResponse:
                return self._exc(tid, unit, req.function, req.code)  # type: ignore[union-attr]
            if kind is ReportServerId:
                return encode_report_server_id_response(tid, unit, srv.server_id)
            if kind is ReadDeviceId:
                return device_id_response(tid, unit, req, srv.objects)  # type: ignore[arg-type]
            if not self.can_write:
                self._audit_refused(req)
                return self._exc(tid, unit, fc, ExceptionCode.ILLEGAL_FUNCTION)
            return self._write(tid, unit, req)
        except Exception:
            log.failure("modbus: request {fc:#04x} from {peer} failed", fc=fc, peer=self.peer)
            return self._exc(tid, unit, fc, ExceptionCode.SERVER_DEVICE_FAILURE)

    def _write_register_fast(self, data: bytes) -> bytes | Deferred[bytes] | None:
        """FC06 on a register of a single one-register integer tag (``Image.single_registers``)
        whose value needs no coercion: what ``_handle`` and ``_write_register`` would do, in
        fewer steps. ``data`` is exactly one request frame with function code 06. None (and
        nothing done) when the request is not such a write: the caller takes the normal way.

        The reply (an echo of the request, MB AP 6.6) follows the owner's answer, as always;
        a memory tag's new value is put into the image right here.
        """
        tid, pid, length, unit, _fc, address, value = _FC06_REQ.unpack(data)
        srv = self.server
        if pid or length != 6 or (srv.units is not None and unit not in srv.units):
            return None
        image = srv.image
        b = image.single_registers.get(address)
        if b is None or not b.exact:
            return None
        tag: Any = b.tag  # exact: bound to a tag
        if not tag.writable:
            return None
        srv.stats.requests[6] += 1
        try:
            v = value - 0x10000 if value & 0x8000 and b.kind is Kind.INT16 else value
            store = srv.store
            path = b.path
            result = store.write_now(path, v, writer=self.writer, checked=tag,
                                     origin=image._sub)
            if type(result) is not Quality:
                d: Deferred[Quality] = result  # type: ignore[assignment]
                return d.addCallback(self._single_outcome, path).addCallback(
                    self._answer, tid, unit, WriteRegister(address, value)).addErrback(
                    self._write_error, tid, unit, 0x06)
            tv = store.read(path)
            if tv.value is v and not b.bad and not tv.quality & 0x80000000:
                # the store holds our value (a memory tag): Image._put, for this binding
                if v is not b.last:
                    b.last = v
                    b.table.raw[b.start:b.stop] = data[10:12]  # type: ignore[union-attr,index]
            else:
                image.refresh((path,))
        except Exception:
            log.failure("modbus: request {fc:#04x} from {peer} failed", fc=6, peer=self.peer)
            return self._exc(tid, unit, 0x06, ExceptionCode.SERVER_DEVICE_FAILURE)
        if result & 0x80000000:  # Bad
            return self._exc(tid, unit, 0x06, quality_exception(result))  # type: ignore[arg-type]
        return data if type(data) is bytes else bytes(data)

    def _single_outcome(self, quality: Quality, path: str) -> ExceptionCode | None:
        return self._outcome((path,), (quality,))

    def _audit_refused(self, req: Any) -> None:
        """A write by a read-only client (its TLS role): into the audit trail, per tag."""
        srv = self.server
        if srv.store.audit is None:
            return
        image = srv.image
        kind = type(req)
        if kind is WriteRegister:
            plan: Any = image.plan_register_write(req.address, _U16.pack(req.value))
        elif kind is WriteRegisters:
            plan = image.plan_register_write(req.address, req.values)
        elif kind is WriteCoil:
            plan = image.plan_bit_write(req.address, (req.value,))
        elif kind is WriteCoils:
            plan = image.plan_bit_write(req.address, req.values)
        else:
            return
        if type(plan) is list:
            for b, value in plan:
                srv.store.audit_refusal(self.writer, b.path, value,
                                        Quality.BAD_USER_ACCESS_DENIED)

    def _write(self, tid: int, unit: int, req: Any) -> bytes | Deferred[bytes]:
        image = self.server.image
        kind = type(req)
        fc = req.function
        if kind is WriteRegister:
            plan = image.plan_register_write(req.address, _U16.pack(req.value))
        elif kind is WriteRegisters:
            plan = image.plan_register_write(req.address, req.values)
        elif kind is WriteCoil:
            plan = image.plan_bit_write(req.address, (req.value,))
        elif kind is WriteCoils:
            plan = image.plan_bit_write(req.address, req.values)
        elif kind is MaskWrite:
            if image.tables[Table.HOLDING_REGISTERS].run_end[req.address] <= req.address:
                return self._exc(tid, unit, fc, ExceptionCode.ILLEGAL_DATA_ADDRESS)
            current = image.register(Table.HOLDING_REGISTERS, req.address)
            plan = image.plan_register_write(req.address, _U16.pack(req.apply(current)))
        elif kind is ReadWriteRegisters:
            # MB AP 6.17: the write precedes the read; both are checked before anything is
            # written, so a request refused (its read part too) changes nothing
            plan = image.plan_register_write(req.write_address, req.values)
            if type(plan) is list:
                refused = refused_read_after_write(image, req.read_address, req.read_count,
                                                   plan)
                if refused is not None:
                    return self._exc(tid, unit, fc, refused)
        else:  # pragma: no cover - parse_request returns nothing else
            return self._exc(tid, unit, fc, ExceptionCode.ILLEGAL_FUNCTION)
        if type(plan) is not list:  # an ExceptionCode: refused before anything was written
            return self._exc(tid, unit, fc, plan)  # type: ignore[arg-type]
        outcome = self._execute(plan)
        if outcome is None:
            return self._respond(tid, unit, req)
        if type(outcome) is ExceptionCode:
            return self._exc(tid, unit, fc, outcome)
        d: Deferred[ExceptionCode | None] = outcome  # type: ignore[assignment]
        return d.addCallback(self._answer, tid, unit, req).addErrback(self._write_error, tid,
                                                                       unit, fc)

    def _respond(self, tid: int, unit: int, req: Any) -> bytes:
        """The normal answer to a write that succeeded (FC17 reads after its write)."""
        if type(req) is ReadWriteRegisters:
            data = self.server.image.read_registers(Table.HOLDING_REGISTERS, req.read_address,
                                                    req.read_count)
            if type(data) is not bytes:
                return self._exc(tid, unit, req.function, data)  # type: ignore[arg-type]
            return encode_read_registers_response(tid, unit, req.function, data)
        return encode_write_response(tid, unit, req)

    def _answer(self, code: ExceptionCode | None, tid: int, unit: int, req: Any) -> bytes:
        if code is None:
            return self._respond(tid, unit, req)
        return self._exc(tid, unit, req.function, code)

    def _write_error(self, failure: Failure, tid: int, unit: int, fc: int) -> bytes:
        log.failure("modbus: write from {peer} failed", failure, peer=self.peer)
        return self._exc(tid, unit, fc, ExceptionCode.SERVER_DEVICE_FAILURE)

    def _execute(
        self, plan: list[tuple[Binding, Any]]
    ) -> ExceptionCode | Deferred[ExceptionCode | None] | None:
        """Write every planned tag through the store; the exception to answer, None for OK.

        The values were validated (coerced) by the plan, so the store does not coerce them
        again. Memory tags answer at once: their image registers are updated right here from
        the store (the image's own subscription is not notified of its writes, so no extra
        reactor turn is needed) and the result comes back without a Deferred. When an owner
        answers later (a PLC behind us), a Deferred fires once every owner has answered.
        """
        if not plan:
            return None
        srv = self.server
        store = srv.store
        origin = srv.image.subscription
        if len(plan) == 1:  # the common case (FC05, FC06, one tag of FC10): no containers
            b, value = plan[0]
            path = b.path
            result = store.write_now(path, value, writer=self.writer, checked=b.tag,
                                     origin=origin)
            if type(result) is Quality:
                return self._outcome((path,), (result,))
            writes: dict[str, tuple[Binding, Any]] = {path: (b, value)}
            qualities: list[Quality] = []
            pending: list[Deferred[Quality]] = [result]  # type: ignore[list-item]
        else:
            writes = {}
            for b, value in plan:
                writes[b.path] = (b, value)  # a tag mapped twice in one range: written once
            qualities = []
            pending = []
            for path, (b, value) in writes.items():
                result = store.write_now(path, value, writer=self.writer, checked=b.tag,
                                         origin=origin)
                if type(result) is Quality:
                    qualities.append(result)
                else:
                    pending.append(result)  # type: ignore[arg-type]
            if not pending:
                return self._outcome(writes, qualities)
            # Show what was written already; the rest once its owner has answered.
            try:
                srv.image.refresh(writes)
            except Exception:
                log.failure("modbus: refreshing the image after a write failed")

        def finish(results: list[tuple[bool, Any]]) -> ExceptionCode | None:
            for ok, q in results:
                if not ok:  # pragma: no cover - store write Deferreds never errback
                    return ExceptionCode.SERVER_DEVICE_FAILURE
                qualities.append(q)
            return self._outcome(writes, qualities)

        return DeferredList(pending, consumeErrors=True).addCallback(finish)

    def _outcome(self, paths: Iterable[str], qualities: Iterable[Quality]) -> ExceptionCode | None:
        """After the owners answered: refresh the image from the store, map the qualities."""
        try:
            self.server.image.refresh(paths)
        except Exception:
            log.failure("modbus: refreshing the image after a write failed")
            return ExceptionCode.SERVER_DEVICE_FAILURE
        for q in qualities:
            if q & 0x80000000:  # Bad
                return quality_exception(Quality(q))
        return None
