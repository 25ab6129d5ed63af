"""One OPC UA TCP connection: framing, HEL/ACK, the secure channel, bounded input (Part 6 7.1).

:class:`UaChannel` is the asyncio protocol of a client connection. It

* reads the 8-byte message header first and refuses, before buffering any of the body, a
  message type it does not know (Bad_TcpMessageTypeInvalid) or a chunk larger than negotiated
  (Bad_TcpMessageTooLarge): an ERR message, then the connection is closed (Part 6 7.1.5);
* expects a HEL and an OpenSecureChannel within ``hello_timeout_s`` (otherwise it closes the
  connection), closes a channel whose security token is not renewed within 125 % of its
  lifetime (revised to at most an hour), refuses connections beyond ``max_connections``, and
  answers a HEL
  with an ACK carrying our limits (Part 6 7.1.2.3/7.1.2.4): a chunk is at most the smaller of
  the client's SendBufferSize and our ``max_chunk_size``; a message at most
  ``max_message_size`` bytes in at most ``max_chunk_count`` chunks; the secure-channel layer
  (asyncua's ``SecureConnection``: chunk crypto and reassembly) checks those sums per chunk;
* hands each complete request to the :class:`~iotserver.opcua.dispatch.Dispatcher`, in order,
  through a bounded queue (``max_pending_requests``; past it the connection is closed);
* logs malformed input at warning level, at most once per 10 s with the count since.

:class:`UaListener` accepts connections and tracks them for shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from asyncua import ua
from asyncua.common.utils import Buffer
from asyncua.crypto.security_policies import SecurityPolicyNone
from asyncua.ua.ua_binary import (
    header_from_binary,
    nodeid_from_binary,
    struct_from_binary,
    struct_to_binary,
    uatcp_to_binary,
)

from twisted.logger import Logger

from iotserver.opcua.compat import SecureConnection, TransportLimits
from iotserver.ratelog import RateLimitedLog

if TYPE_CHECKING:
    from iotserver.opcua.dispatch import Dispatcher
    from iotserver.opcua.sessions import SessionTable

log = logging.getLogger("iotserver.opcua")
_tlog = Logger(namespace="iotserver.opcua")

_KNOWN = {b"HEL", b"OPN", b"MSG", b"CLO"}
_SECURE = {b"OPN", b"MSG", b"CLO"}
HELLO_MAX = 8192  # a HEL is 32 bytes plus an EndpointUrl of at most 4096 (Part 6 7.1.2.3)
MIN_BUFFER = 8192  # Part 6 7.1.2.3: buffers of fewer than 8192 bytes are refused
MIN_TOKEN_LIFETIME_MS = 1_000
MAX_TOKEN_LIFETIME_MS = 3_600_000  # RequestedLifetime is revised to at most one hour


@dataclass
class ChannelLimits:
    max_message_size: int = 16 * 1024 * 1024
    max_chunk_count: int = 512
    max_chunk_size: int = 65535
    hello_timeout_s: float = 10.0
    max_pending_requests: int = 100
    max_connections: int = 500
    max_connections_per_address: int = 50


@dataclass
class ChannelStats:
    connections: int = 0
    hello_timeouts: int = 0
    too_large: int = 0
    malformed: int = 0
    queue_full: int = 0
    renewals: int = 0
    response_too_large: int = 0
    token_expired: int = 0
    refused: int = 0
    refused_per_address: int = 0


def _too_large_fault(body: bytes) -> bytes:
    """A ServiceFault Bad_ResponseTooLarge for the response encoded in ``body``."""
    buf = Buffer(body)
    nodeid_from_binary(buf)  # the response's type id
    header = struct_from_binary(ua.ResponseHeader, buf)
    fault = ua.ServiceFault()
    fault.ResponseHeader.RequestHandle = header.RequestHandle
    fault.ResponseHeader.Timestamp = header.Timestamp
    fault.ResponseHeader.ServiceResult = ua.StatusCode(ua.StatusCodes.BadResponseTooLarge)
    return bytes(struct_to_binary(fault))


class ProtocolViolation(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class UaChannel(asyncio.Protocol):
    """See the module docstring."""

    def __init__(self, listener: UaListener) -> None:
        self.listener = listener
        self.limits = listener.limits
        self.transport: asyncio.Transport | None = None
        self.address = "?"
        self.peer = "?"
        self.sockname: Any = None
        self.channel_id = 0
        self._buf = bytearray()
        self._hello = False
        self._hello_timer: asyncio.TimerHandle | None = None
        self._lifetime_timer: asyncio.TimerHandle | None = None
        self._transport_limits = TransportLimits(max_recv_buffer=self.limits.max_chunk_size,
                                                 max_send_buffer=self.limits.max_chunk_size,
                                                 max_chunk_count=self.limits.max_chunk_count,
                                                 max_message_size=self.limits.max_message_size)
        self.conn = SecureConnection(SecurityPolicyNone(), self._transport_limits)
        self.conn.set_policy_factories(listener.policies)
        self._chunk_limit = HELLO_MAX
        self.peer_max_message = 0
        self._queue: asyncio.Queue[tuple[int, Any] | None] = asyncio.Queue(
            maxsize=self.limits.max_pending_requests)
        self._worker: asyncio.Task[None] | None = None
        self.is_open = False

    # -- what the session layer reads ----------------------------------------------------------
    @property
    def policy(self) -> Any:
        return self.conn.security_policy

    @property
    def policy_uri(self) -> str:
        return str(self.conn.security_policy.URI)

    @property
    def peer_certificate(self) -> bytes | None:
        cert = self.conn.security_policy.peer_certificate
        return bytes(cert) if cert else None

    def __repr__(self) -> str:
        return f"<UaChannel {self.channel_id} {self.address}>"

    # -- connection ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if peer else "?"
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"  # host:port (the audit trail)
        self.sockname = transport.get_extra_info("sockname")
        if len(self.listener.channels) >= self.limits.max_connections:
            self.listener.stats.refused += 1
            self.listener.ratelog.warn("refused", "OPC UA: connection from {peer} refused: "
                                       "max_connections ({n}) reached", peer=self.address,
                                       n=self.limits.max_connections)
            transport.close()
            self.transport = None
            return
        # one address cannot take every slot (a channel can be held open for its lifetime)
        if sum(1 for c in self.listener.channels if c.address == self.address) >= \
                self.limits.max_connections_per_address:
            self.listener.stats.refused_per_address += 1
            self.listener.ratelog.warn("refused_per_address", "OPC UA: connection from {peer} "
                                       "refused: max_connections_per_address ({n}) reached",
                                       peer=self.address,
                                       n=self.limits.max_connections_per_address)
            transport.close()
            self.transport = None
            return
        self.listener.channels.add(self)
        self.listener.stats.connections += 1
        loop = asyncio.get_running_loop()
        self._hello_timer = loop.call_later(self.limits.hello_timeout_s, self._hello_timeout)
        self._worker = loop.create_task(self._work())

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_open = False
        for timer in (self._hello_timer, self._lifetime_timer):
            if timer is not None:
                timer.cancel()
        self._hello_timer = self._lifetime_timer = None
        self.listener.channels.discard(self)
        self.listener.table.channel_lost(self)
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
        self.transport = None

    def _hello_timeout(self) -> None:
        self._hello_timer = None
        if not self.is_open and self.transport is not None:
            self.listener.stats.hello_timeouts += 1
            self.listener.ratelog.warn("hello_timeout", "OPC UA: {peer} opened no secure channel "
                                       "(HEL, OPN) within {s:.0f} s: connection closed",
                                       peer=self.address, s=self.limits.hello_timeout_s)
            self.transport.abort()

    def _token_expired(self) -> None:
        """Part 4 5.5.2: a channel whose security token was not renewed in time is closed."""
        self._lifetime_timer = None
        if self.transport is not None:
            self.listener.stats.token_expired += 1
            log.info("OPC UA: secure channel %d of %s not renewed in time: closed",
                     self.channel_id, self.address)
            self.transport.abort()

    def _refuse(self, code: int, reason: str) -> None:
        """Part 6 7.1.5: an ERR message, then close."""
        self.is_open = False
        transport = self.transport
        if transport is None:
            return
        with contextlib.suppress(Exception):
            transport.write(uatcp_to_binary(ua.MessageType.Error,
                                            ua.ErrorMessage(ua.StatusCode(code), reason)))
        transport.close()
        self._buf.clear()

    # -- input -------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        try:
            while len(buf) >= 8 and self.transport is not None:
                kind = bytes(buf[:3])
                size = struct.unpack_from("<I", buf, 4)[0]
                if kind not in _KNOWN or (kind == b"HEL") == self._hello:
                    raise ProtocolViolation(ua.StatusCodes.BadTcpMessageTypeInvalid,
                                            f"unexpected message type {kind!r}")
                if size > self._chunk_limit:
                    self.listener.stats.too_large += 1
                    raise ProtocolViolation(ua.StatusCodes.BadTcpMessageTooLarge,
                                            f"chunk of {size} bytes, limit {self._chunk_limit}")
                if size < (12 if kind in _SECURE else 8):
                    raise ProtocolViolation(ua.StatusCodes.BadTcpMessageTypeInvalid,
                                            f"message size {size}")
                if len(buf) < size:
                    return
                chunk = bytes(buf[:size])
                del buf[:size]
                self._chunk(chunk)
        except ProtocolViolation as exc:
            self.listener.stats.malformed += 1
            self.listener.ratelog.warn("malformed", "OPC UA: malformed input from {peer}: "
                                       "{reason} ({code}): connection closed", peer=self.address,
                                       reason=exc.reason, code=ua.StatusCode(exc.code).name)
            self._refuse(exc.code, exc.reason)

    def _chunk(self, chunk: bytes) -> None:
        body = Buffer(chunk)
        header = header_from_binary(body)
        if header.MessageType == ua.MessageType.Hello:
            self._on_hello(body)
            return
        try:
            msg = self.conn.receive_from_header_and_body(header, body)
        except ua.UaStatusCodeError as exc:
            if exc.code == ua.StatusCodes.BadRequestTooLarge:
                self.listener.stats.too_large += 1
                raise ProtocolViolation(ua.StatusCodes.BadTcpMessageTooLarge,
                                        "message larger than negotiated") from None
            raise ProtocolViolation(exc.code, str(exc)) from None
        except ua.UaError as exc:
            raise ProtocolViolation(ua.StatusCodes.BadSecurityChecksFailed, str(exc)) from None
        except Exception as exc:  # decoding errors, bad signatures and padding
            raise ProtocolViolation(ua.StatusCodes.BadDecodingError,
                                    f"{type(exc).__name__}: {exc}") from None
        if msg is None:
            return  # an intermediate (or aborted) chunk
        if header.MessageType == ua.MessageType.SecureOpen:
            self._open(msg)
        elif header.MessageType == ua.MessageType.SecureClose:
            self.is_open = False
            self.conn.close()
            if self.transport is not None:
                self.transport.close()
        else:
            if not self.is_open:
                raise ProtocolViolation(ua.StatusCodes.BadSecureChannelIdInvalid,
                                        "MSG before OPN")
            try:
                self._queue.put_nowait((msg.SequenceHeader().RequestId, msg.body()))
            except asyncio.QueueFull:
                self.listener.stats.queue_full += 1
                raise ProtocolViolation(ua.StatusCodes.BadTcpNotEnoughResources,
                                        "too many pending requests") from None

    def _on_hello(self, body: Buffer) -> None:
        try:
            hello = struct_from_binary(ua.Hello, body)
        except Exception:
            raise ProtocolViolation(ua.StatusCodes.BadDecodingError, "bad HEL") from None
        if hello.ReceiveBufferSize < MIN_BUFFER or hello.SendBufferSize < MIN_BUFFER:
            raise ProtocolViolation(ua.StatusCodes.BadTcpInternalError, "buffers below 8192")
        self._hello = True
        lim = self.limits
        ack = ua.Acknowledge()
        ack.ProtocolVersion = 0
        ack.ReceiveBufferSize = min(hello.SendBufferSize, lim.max_chunk_size)
        ack.SendBufferSize = min(hello.ReceiveBufferSize, lim.max_chunk_size)
        ack.MaxMessageSize = lim.max_message_size
        ack.MaxChunkCount = lim.max_chunk_count
        tl = self._transport_limits
        tl.max_recv_buffer = ack.ReceiveBufferSize
        tl.max_send_buffer = ack.SendBufferSize
        self._chunk_limit = ack.ReceiveBufferSize
        self.peer_max_message = hello.MaxMessageSize
        if self.transport is not None:
            self.transport.write(uatcp_to_binary(ua.MessageType.Acknowledge, ack))

    def _open(self, msg: Any) -> None:
        """OpenSecureChannel, Issue or Renew (Part 4 5.5.2)."""
        algo, seq = msg.SecurityHeader(), msg.SequenceHeader()
        request = struct_from_binary(ua.OpenSecureChannelRequest, msg.body())
        params = request.Parameters
        if self.is_open and params.RequestType == ua.SecurityTokenRequestType.Issue:
            raise ProtocolViolation(ua.StatusCodes.BadSecureChannelIdInvalid, "second Issue")
        if not self.is_open:
            try:
                self.conn.select_policy(algo.SecurityPolicyURI, algo.SenderCertificate,
                                        params.SecurityMode)
            except ua.UaError:
                raise ProtocolViolation(ua.StatusCodes.BadSecurityPolicyRejected,
                                        f"policy {algo.SecurityPolicyURI} not offered") from None
        if self.is_open:
            self.listener.stats.renewals += 1
        result = self.conn.open(params, self.listener.iserver)
        token = result.SecurityToken
        requested = int(token.RevisedLifetime) or MAX_TOKEN_LIFETIME_MS  # 0: our choice
        token.RevisedLifetime = min(max(requested, MIN_TOKEN_LIFETIME_MS), MAX_TOKEN_LIFETIME_MS)
        self.channel_id = int(token.ChannelId)
        self.is_open = True
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        if self._lifetime_timer is not None:
            self._lifetime_timer.cancel()
        # the client renews at 75 % of the lifetime; the token stays valid until 125 %
        self._lifetime_timer = asyncio.get_running_loop().call_later(
            token.RevisedLifetime * 1.25 / 1000.0, self._token_expired)
        response = ua.OpenSecureChannelResponse()
        response.Parameters = result
        response.ResponseHeader.RequestHandle = request.RequestHeader.RequestHandle
        self._write(self.conn.message_to_binary(struct_to_binary(response),
                                                message_type=ua.MessageType.SecureOpen,
                                                request_id=seq.RequestId))

    # -- output --------------------------------------------------------------------------------
    def send(self, request_id: int, body: bytes) -> None:
        """Send one response (an encoded ``...Response`` with its type id)."""
        if not self.is_open or self.transport is None:
            return
        limit = self.peer_max_message
        if limit and len(body) > limit:
            # Part 6 7.1.2.3: the client takes no larger message; Bad_ResponseTooLarge instead
            self.listener.stats.response_too_large += 1
            body = _too_large_fault(body)
        self._write(self.conn.message_to_binary(body, message_type=ua.MessageType.SecureMessage,
                                                request_id=request_id))

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    async def _work(self) -> None:
        dispatcher = self.listener.dispatcher
        while True:
            item = await self._queue.get()
            if item is None:
                return
            request_id, body = item
            try:
                await dispatcher.dispatch(self, request_id, body)
            except Exception:  # a request that cannot even be decoded
                self.listener.stats.malformed += 1
                self.listener.ratelog.warn("undecodable", "OPC UA: undecodable request from "
                                           "{peer}: connection closed", peer=self.address)
                self._refuse(ua.StatusCodes.BadDecodingError, "undecodable request")
                return


class UaListener:
    """The OPC UA TCP server: accepts :class:`UaChannel` connections."""

    def __init__(self, dispatcher: Dispatcher, table: SessionTable, iserver: Any,
                 policies: list[Any], limits: ChannelLimits) -> None:
        self.dispatcher = dispatcher
        self.table = table
        self.iserver = iserver
        self.policies = policies
        self.limits = limits
        self.stats = ChannelStats()
        # what peers do wrong: at most one line per kind every 10 s, with a count of the rest
        self.ratelog = RateLimitedLog(table.clock, logger=_tlog)
        self.channels: set[UaChannel] = set()
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: UaChannel(self), host or None, port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        workers = []
        for channel in list(self.channels):
            if channel.transport is not None:
                channel.transport.abort()
            if channel._worker is not None:
                channel._worker.cancel()
                workers.append(channel._worker)
        for _ in range(3):
            await asyncio.sleep(0)  # connection_lost runs a loop turn after abort
        if workers:
            await asyncio.gather(*workers, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
