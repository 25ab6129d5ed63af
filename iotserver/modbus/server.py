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

import struct
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

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
from iotserver.modbus.image import Binding, Image
from iotserver.tags.model import Quality
from iotserver.tags.store import TagStore

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
    refused: int = 0  # over max_connections
    denied: int = 0  # TLS client without an allowed role
    framing_errors: int = 0
    idle_closed: int = 0
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


@implementer(IHandshakeListener)
class ModbusServerProtocol(Protocol, TimeoutMixin):
    """One client connection."""

    def __init__(self, server: ModbusServer, secure: bool) -> None:
        self.server = server
        self.secure = secure
        self.decoder = FrameDecoder()
        self.authorized = not secure
        self.can_write = not secure
        self.principal = "modbus"
        self.peer = "?"
        self._backlog: deque[Frame] = deque()
        self._busy = False  # a write is waiting for the store
        self._paused = False
        self._closing = False
        self._lost = False
        self._counted = False
        self._eager = False

    # -- connection -----------------------------------------------------------------------
    def connectionMade(self) -> None:
        srv = self.server
        transport: Any = self.transport
        assert transport is not None
        peer = transport.getPeer()
        self.peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        self.principal = f"modbus:{getattr(peer, 'host', '?')}"
        if len(srv.connections) >= srv.cfg.max_connections:
            srv.stats.refused += 1
            log.warn("modbus: refusing {peer}: max_connections ({n}) reached", peer=self.peer,
                     n=srv.cfg.max_connections)
            self._closing = True
            transport.abortConnection()
            return
        srv.connections.add(self)
        self._counted = True
        from twisted.internet.tcp import Connection

        self._eager = isinstance(self.transport, Connection)
        srv.stats.connections_total += 1
        # TimeoutMixin on the injected clock
        self.callLater = srv.clock.callLater  # type: ignore[method-assign,assignment]
        if srv.cfg.idle_timeout:
            self.setTimeout(srv.cfg.idle_timeout)

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
                log.warn("modbus: {who} ({peer}): {exc}", who=who, peer=self.peer, exc=str(exc))
        access = cfg.roles.get(role.lower(), cfg.no_role) if role is not None else cfg.no_role
        if access == "none":
            self.server.stats.denied += 1
            log.warn("modbus: {who} ({peer}) has role {role!r}, which has no access; closing",
                     who=who, peer=self.peer, role=role)
            self._closing = True
            transport: Any = self.transport
            transport.loseConnection()
            return
        self.authorized = True
        self.can_write = access == "readwrite"
        self.principal = f"modbus:{who}"
        log.info("modbus: {who} ({peer}) connected with role {role!r}: {access}", who=who,
                 peer=self.peer, role=role, access=access)

    def timeoutConnection(self) -> None:
        self.server.stats.idle_closed += 1
        log.info("modbus: closing idle connection from {peer}", peer=self.peer)
        assert self.transport is not None
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._lost = True
        self._backlog.clear()
        self.setTimeout(None)
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
        self.resetTimeout()
        try:
            frames = self.decoder.feed(data)
        except ModbusFramingError as exc:
            # MB TCP 4.4.1.2: nothing valid to resynchronise on; answer what came before, close
            frames = list(exc.frames)
            self._closing = True
            self.server.stats.framing_errors += 1
            log.info("modbus: {peer} broke MBAP framing ({msg}); closing", peer=self.peer,
                     msg=str(exc))
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
        """Write a response, on plain TCP straight to the socket when nothing is queued.

        Twisted's ``write`` only buffers and sends on the next reactor turn (an epoll_ctl pair
        and a loop iteration per response); for one-request-one-response traffic that was
        about half of the server's CPU time per request (benchmarks/modbus). Order is kept:
        the shortcut is taken only while the transport's buffers are empty.
        """
        t: Any = self.transport
        if self._eager and not t.dataBuffer and not t._tempDataBuffer and t.connected \
                and not t.disconnecting:
            sent = t.writeSomeData(data)
            if type(sent) is int:
                if sent == len(data):
                    return
                data = data[sent:]
        t.write(data)

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
        tid, unit, pdu = frame.transaction_id, frame.unit_id, frame.pdu
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
                return self._exc(tid, unit, fc, ExceptionCode.ILLEGAL_FUNCTION)
            return self._write(tid, unit, req)
        except Exception:
            log.failure("modbus: request {fc:#04x} from {peer} failed", fc=fc, peer=self.peer)
            return self._exc(tid, unit, fc, ExceptionCode.SERVER_DEVICE_FAILURE)

    def _write(self, tid: int, unit: int, req: Any) -> bytes | Deferred[bytes]:
        image = self.server.image
        fc = req.function
        if isinstance(req, WriteCoil):
            plan = image.plan_bit_write(req.address, [req.value])
        elif isinstance(req, WriteCoils):
            plan = image.plan_bit_write(req.address, req.values)
        elif isinstance(req, WriteRegister):
            plan = image.plan_register_write(req.address, _U16.pack(req.value))
        elif isinstance(req, WriteRegisters):
            plan = image.plan_register_write(req.address, req.values)
        elif isinstance(req, MaskWrite):
            if image.tables[Table.HOLDING_REGISTERS].run_end[req.address] <= req.address:
                return self._exc(tid, unit, fc, ExceptionCode.ILLEGAL_DATA_ADDRESS)
            current = image.register(Table.HOLDING_REGISTERS, req.address)
            plan = image.plan_register_write(req.address, _U16.pack(req.apply(current)))
        elif isinstance(req, ReadWriteRegisters):
            # MB AP 6.17: both ranges are checked before the write, which precedes the read
            check = image.read_registers(Table.HOLDING_REGISTERS, req.read_address, req.read_count)
            if isinstance(check, ExceptionCode) and check is ExceptionCode.ILLEGAL_DATA_ADDRESS:
                return self._exc(tid, unit, fc, check)
            plan = image.plan_register_write(req.write_address, req.values)
        else:  # pragma: no cover - parse_request returns nothing else
            return self._exc(tid, unit, fc, ExceptionCode.ILLEGAL_FUNCTION)
        if isinstance(plan, ExceptionCode):
            return self._exc(tid, unit, fc, plan)

        def respond() -> bytes:
            if isinstance(req, ReadWriteRegisters):
                data = image.read_registers(Table.HOLDING_REGISTERS, req.read_address,
                                            req.read_count)
                if isinstance(data, ExceptionCode):
                    return self._exc(tid, unit, fc, data)
                return encode_read_registers_response(tid, unit, fc, data)
            return encode_write_response(tid, unit, req)

        return self._execute(tid, unit, fc, plan, respond)

    def _execute(self, tid: int, unit: int, fc: int, plan: list[tuple[Binding, Any]],
                 respond: Callable[[], bytes]) -> bytes | Deferred[bytes]:
        """Write every planned tag through the store; answer once all owners have answered."""
        if not plan:
            return respond()
        writes: dict[str, Any] = {}
        for b, value in plan:
            writes[b.entry.path] = value  # a tag mapped twice in one range: written once
        store = self.server.store
        qualities: list[Quality] = []
        pending = [store.write(path, value, principal=self.principal)
                   for path, value in writes.items()]
        for d in pending:
            d.addCallback(qualities.append)

        def finish(_: object = None) -> bytes:
            try:
                self.server.image.refresh(writes)
            except Exception:
                log.failure("modbus: refreshing the image after a write failed")
                return self._exc(tid, unit, fc, ExceptionCode.SERVER_DEVICE_FAILURE)
            for q in qualities:
                code = quality_exception(Quality(q))
                if code is not None:
                    return self._exc(tid, unit, fc, code)
            return respond()

        if len(qualities) == len(pending):  # every owner answered synchronously (memory tags)
            return finish()

        def failed(failure: Failure) -> bytes:
            log.failure("modbus: write from {peer} failed", failure, peer=self.peer)
            return self._exc(tid, unit, fc, ExceptionCode.SERVER_DEVICE_FAILURE)

        done: Deferred[Any] = DeferredList(pending)
        return done.addCallback(finish).addErrback(failed)
