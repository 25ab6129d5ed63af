"""The broker's Twisted protocol: one per TCP/TLS connection, over the sans-I/O codec.

It owns what the codec and the broker do not: the transport (TCP_NODELAY, one write per
reactor turn, producer/consumer flow control), the keepalive timer, the
CONNECT flow (checks and grants in ``connect.py``, authentication), per-connection topic
aliases and packet size limits, and the acknowledgement queue (``acks.py``). The time a
connection may take to send CONNECT and log in is the listener's ``login_timeout``, enforced
in front of this protocol by the edge guard (``iotserver.edge.guard``), like every listener's.

A peer that breaks the protocol gets a DISCONNECT with the codec's reason code (v5, or a
CONNACK while connecting) and is closed; it costs one rate-limited log line, never a
traceback, and never touches another client.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from iotserver.mqtt import connect
from iotserver.mqtt.acks import PUBACK, PUBCOMP, PUBREC, InboundAcks, after_commit
from iotserver.mqtt.codec import (
    Decoder,
    MqttProtocolError,
    UnsupportedProtocolVersion,
    encode,
    with_packet_id,
)
from iotserver.mqtt.config import ListenerConfig
from iotserver.mqtt.packets import (
    CONNACK_CODES,
    MQTT_3_1_1,
    MQTT_5,
    NO_PROPERTIES,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Pingreq,
    Properties,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
)
from iotserver.mqtt.session import Message, Session
from iotserver.security.login import certificate_identities
from iotserver.security.tls import peer_certificate

log = Logger(namespace="iotserver.mqtt")

NEW, AUTHENTICATING, OPEN, CLOSED = range(4)
RC = ReasonCode
_PINGRESP = b"\xd0\x00"
_CLOSE_GRACE = 5.0  # seconds a closing connection may take to drain before it is aborted


class MqttServerFactory(Factory):
    """One per listener: the broker, the listener's settings and its authenticator."""

    noisy = False

    def __init__(self, broker: Any, listener: ListenerConfig, authenticator: Any) -> None:
        self.broker = broker
        self.listener = listener
        self.authenticator = authenticator

    def buildProtocol(self, addr: Any) -> MqttServerProtocol:
        proto = MqttServerProtocol(self)
        proto.factory = self
        return proto


@implementer(IHandshakeListener, IPushProducer)
class MqttServerProtocol(Protocol):
    """One client connection (see module docstring)."""

    # A TCP or TLS transport, set before connectionMade (Protocol declares ITransport | None,
    # whose zope interface methods mypy cannot call).
    transport: Any

    def __init__(self, factory: MqttServerFactory) -> None:
        broker = factory.broker
        self.broker = broker
        self.limits = broker.limits
        self.clock = broker.clock
        self.stats = broker.stats
        self.authenticator = factory.authenticator
        self.listener = factory.listener
        self.version = MQTT_3_1_1
        self.state = NEW
        self.session: Session | None = None
        self.client_id: str | None = None
        self.user: str | None = None
        self.paused = False
        self._tx_paused = False  # the transport asked us to pause (IPushProducer)
        self._connack_pending = False
        self.send_window = self.limits.max_inflight
        self.peer = "?"
        self._decoder = Decoder(self.limits.max_packet_size, role="server")
        self._out: list[bytes] = []
        self._outbytes = 0
        self._dirty = False
        self.acks = InboundAcks(self, self.limits.receive_maximum)
        self._aliases_in: dict[int, str] = {}
        self._aliases_out: dict[str, int] = {}
        self._alias_out_max = 0
        self._max_out = 0  # client's Maximum Packet Size (0: none)
        self._problem_info = True
        self._keepalive = 0.0
        self._last_rx = 0.0
        self._ka_call: Any = None
        self._abort_call: Any = None
        self._held: list[Any] | None = None
        self._max_qos = self.limits.maximum_qos
        self._retain_ok = self.limits.retain_available
        self._pub_ok: dict[str, bool] = {}
        self._acl_generation = 0
        self._cert_identity: tuple[str, ...] | None = None
        self._will_on_close = True
        self._dispatch: dict[type, Callable[[Any], None]] = {
            Connect: self._on_connect, Puback: self._on_puback, Pubrec: self._on_pubrec,
            Pubrel: self._on_pubrel, Pubcomp: self._on_pubcomp, Subscribe: self._on_subscribe,
            Unsubscribe: self._on_unsubscribe, Pingreq: self._on_pingreq,
            Disconnect: self._on_disconnect, Auth: self._on_auth,
        }

    def __repr__(self) -> str:
        return f"<MqttServerProtocol {self.client_id!r} from {self.peer} v{self.version}>"

    # -- connection lifecycle ----------------------------------------------------------------
    def connectionMade(self) -> None:
        broker = self.broker
        broker.connections.add(self)
        try:
            peer = self.transport.getPeer()
            self.peer = f"{peer.host}:{peer.port}"
        except Exception:
            pass
        if len(broker.connections) > self.limits.max_connections + 64:
            # far over the limit: not even worth reading a CONNECT to refuse it properly
            self.stats.connections_refused += 1
            broker.ratelog.warn("conn_flood", "MQTT: connection limit exceeded, dropping {peer}",
                                peer=self.peer)
            self.state = CLOSED
            self.transport.abortConnection()
            return
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            with contextlib.suppress(Exception):
                set_nodelay(True)  # Nagle delays QoS 1 acknowledgements: tail latency
        self.transport.registerProducer(self, True)
        _set_write_buffer(self.transport, self.limits.write_buffer_bytes)
        self._last_rx = self.clock.seconds()

    def handshakeCompleted(self) -> None:
        """TLS: the verified client certificate's identities (the login module's rule)."""
        cert = peer_certificate(self.transport)
        if cert is not None:
            self._cert_identity = certificate_identities(cert) or None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.broker.connections.discard(self)
        for name in ("_ka_call", "_abort_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        self.paused = True
        if self.state != CLOSED:
            self.state = CLOSED
            self._out = []
            self._detach(self._will_on_close)

    def _detach(self, publish_will: bool) -> None:
        session, self.session = self.session, None
        if session is not None:
            self.broker.closed(self, session, publish_will)

    def _close(self, publish_will: bool = True) -> None:
        """Flush what is buffered and close; the session is let go at once."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self._flush_now()
        self._detach(publish_will)
        self.transport.loseConnection()
        if self._abort_call is None:
            self._abort_call = self.clock.callLater(_CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        self.transport.abortConnection()

    def _keepalive_check(self) -> None:
        self._ka_call = None
        if self.state != OPEN:
            return
        idle = self.clock.seconds() - self._last_rx
        if idle < self._keepalive:
            self._ka_call = self.clock.callLater(self._keepalive - idle, self._keepalive_check)
            return
        # MQTT-3.1.2-22: no packet within 1.5 x keepalive: close as a network failure (will)
        self._send_disconnect(RC.KEEP_ALIVE_TIMEOUT)
        self._close(publish_will=True)

    # -- input -------------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        self.stats.bytes_received += len(data)
        if self.state == CLOSED:
            return
        self._last_rx = self.clock.seconds()
        try:
            packets = self._decoder.feed(data)
        except MqttProtocolError as exc:
            self._handle(exc.packets)
            if self.state != CLOSED:
                self._protocol_error(exc)
            return
        self._handle(packets)

    def _handle(self, packets: list[Any]) -> None:
        self.stats.messages_received += len(packets)
        if self._held is not None:
            self._held.extend(packets)
            return
        try:
            for i, p in enumerate(packets):
                if self.state == CLOSED:
                    return
                if type(p) is Publish:
                    self._on_publish(p)
                else:
                    self._dispatch[type(p)](p)
                if self._held is not None:  # CONNECT is being authenticated: hold the rest
                    self._held.extend(packets[i + 1:])
                    return
        except Exception:
            log.failure("MQTT: internal error handling a packet from {peer}", peer=self.peer)
            self._send_disconnect(RC.IMPLEMENTATION_SPECIFIC_ERROR)
            self._close(publish_will=True)

    def _protocol_error(self, exc: MqttProtocolError) -> None:
        self.stats.protocol_errors += 1
        self.broker.ratelog.warn("protocol_error", "MQTT: closing {peer} ({cid}): {msg}",
                                 peer=self.peer, cid=self.client_id, msg=exc.message)
        if isinstance(exc, UnsupportedProtocolVersion):
            # 3.1.1 return code 1 (MQTT-3.1.2-2); a 5.0 server answers unknown levels the same
            self.write(encode(Connack(reason_code=RC.UNSUPPORTED_PROTOCOL_VERSION),
                               MQTT_3_1_1))
            self._close(publish_will=False)
        elif self.state == NEW:
            if exc.protocol_level == MQTT_5 and exc.reason_code in CONNACK_CODES:
                self.version = MQTT_5
                self.write(encode(Connack(reason_code=exc.reason_code,
                                           properties=self._reason(exc.message)), MQTT_5))
            self._close(publish_will=False)  # 3.1.1: just close (MQTT-3.1.4-1)
        else:
            self._send_disconnect(exc.reason_code, exc.message)  # MQTT-4.13.1-1
            self._close(publish_will=True)

    # -- CONNECT -----------------------------------------------------------------------------
    def _on_connect(self, p: Connect) -> None:
        self.version = p.protocol_level
        refused = connect.refusal(p, self.limits, self.broker)
        if refused is not None:
            if refused[0] == RC.SERVER_BUSY:
                self.broker.ratelog.warn("max_connections", "MQTT: {n} connections, refusing "
                                         "{peer}", n=self.limits.max_connections, peer=self.peer)
            return self._refuse(*refused)
        if self.version == MQTT_5:
            props = p.properties
            self.send_window = min(self.limits.max_inflight, props.receive_maximum or 65535)
            self._max_out = props.maximum_packet_size or 0
            if self.limits.outbound_topic_aliases:
                self._alias_out_max = props.topic_alias_maximum or 0
            self._problem_info = props.request_problem_information is not False
        self.client_id, assigned = connect.client_id_for(p)
        self.state = AUTHENTICATING
        self._held = []
        self.transport.pauseProducing()
        d = maybeDeferred(self.authenticator.authenticate, self.client_id, p.username,
                          p.password, self._cert_identity, self.peer.rpartition(":")[0] or None)
        d.addCallback(self._authenticated, p, assigned)
        d.addErrback(self._auth_error)

    def _auth_error(self, failure: Failure) -> None:
        log.failure("MQTT: authentication of {cid!r} failed", failure, cid=self.client_id)
        if self.state == AUTHENTICATING:
            self._refuse(RC.SERVER_UNAVAILABLE, "authentication failed")

    def _authenticated(self, result: Any, p: Connect, assigned: str | None) -> None:
        if self.state != AUTHENTICATING:
            return
        if not result.ok:
            code = connect.auth_refusal_code(result)
            self.broker.ratelog.warn("auth_refused", "MQTT: {peer} client {cid!r} user {user!r} "
                                     "refused: {code}", peer=self.peer, cid=self.client_id,
                                     user=p.username, code=RC(code).name)
            return self._refuse(code, None)
        self.user = result.user
        g = connect.grant(p, self.limits)
        opened = self.broker.open_session(self, self.client_id, clean_start=p.clean_start,
                                          expiry=g.expiry, user=self.user, will=p.will)
        if not isinstance(opened, tuple):
            return self._refuse(opened, "session quota exceeded")
        session, present = opened
        self.session = session
        # A persistent session (new, resumed, or its expiry changed) is acknowledged once it
        # is on disk; until then deliveries queue (paused) and later packets stay held.
        self._connack_pending = True
        self.paused = True
        after_commit(self, lambda ok: self._session_stored(ok, session, present, g, assigned))

    def _session_stored(self, ok: bool, session: Session, present: bool, g: Any,
                        assigned: str | None) -> None:
        if self.state != AUTHENTICATING or self.session is not session:
            return  # closed or taken over meanwhile
        self._connack_pending = False
        self.paused = self._tx_paused
        if not ok:
            return self._refuse(RC.SERVER_UNAVAILABLE, "the session could not be stored")
        self.state = OPEN
        stats = self.stats
        stats.clients_total += 1
        stats.clients_maximum = max(stats.clients_maximum, len(self.broker.connections))
        self.write(encode(connect.connack(self.version, present, g, self.limits, assigned),
                          self.version))
        if g.keepalive:
            self._keepalive = g.keepalive * 1.5  # MQTT-3.1.2-24
            self._ka_call = self.clock.callLater(self._keepalive, self._keepalive_check)
        session.resend()
        held, self._held = self._held, None
        self.transport.resumeProducing()
        if held:
            self.stats.messages_received -= len(held)  # counted when they arrived
            self._handle(held)

    def _refuse(self, code: int, reason: str | None) -> None:
        """CONNACK with a refusal and close (no will: the connection was never accepted)."""
        self.stats.connections_refused += 1
        self.write(encode(connect.refusing_connack(self.version, code, self._reason(reason)),
                          self.version))
        self._held = None
        self._close(publish_will=False)

    def _reason(self, text: str | None) -> Properties:
        if text and self._problem_info:
            return Properties(reason_string=text[:200])
        return NO_PROPERTIES

    # -- PUBLISH in --------------------------------------------------------------------------
    def _on_publish(self, p: Publish) -> None:
        self.stats.publish_received += 1
        qos = p.qos
        limits = self.limits
        if qos > self._max_qos:
            return self.server_disconnect(RC.QOS_NOT_SUPPORTED, "QoS not supported")
        if p.retain and not self._retain_ok:
            return self.server_disconnect(RC.RETAIN_NOT_SUPPORTED, "retain not supported")
        topic = p.topic
        props = p.properties
        code = 0
        if props is not NO_PROPERTIES:
            alias = props.topic_alias
            if alias is not None:
                if alias > limits.topic_alias_maximum:
                    return self.server_disconnect(RC.TOPIC_ALIAS_INVALID,  # MQTT-3.3.2-9
                                                  "topic alias above the maximum")
                if topic:
                    self._aliases_in[alias] = topic
                else:
                    known = self._aliases_in.get(alias)
                    if known is None:
                        return self.server_disconnect(RC.PROTOCOL_ERROR, "unknown topic alias")
                    topic = known
                props = replace(props, topic_alias=None)
                if props.is_empty():
                    props = NO_PROPERTIES
            if props.payload_format_indicator == 1 and not connect.is_utf8(p.payload):
                code = RC.PAYLOAD_FORMAT_INVALID  # 3.3.2.3.2: receiver may check
        session = self.session
        assert session is not None
        pid = p.packet_id or 0
        if qos:
            if qos == 2 and pid in session.incoming_qos2:
                return self.acks.send(PUBREC, pid)  # duplicate: acknowledge again only
            if not self.acks.received() and self.version == MQTT_5:
                return self.server_disconnect(RC.RECEIVE_MAXIMUM_EXCEEDED,  # MQTT-3.3.4-9
                                              "receive maximum exceeded")
        broker = self.broker
        if code == 0 and broker.acl is not None and not self._may_publish(topic):
            code = RC.NOT_AUTHORIZED
            self.stats.dropped["not_authorized"] += 1
            broker.ratelog.warn("publish_denied", "MQTT: {cid!r} ({user}) may not publish to "
                                "{topic!r}", cid=self.client_id, user=self.user or "anonymous",
                                topic=topic)
            denied = getattr(broker, "on_publish_denied", None)  # the audit trail (bridge)
            if denied is not None:
                denied(self.client_id, self.user, topic, p.payload, self.peer)
        if code:
            if qos:
                if self.version != MQTT_5:
                    code = 0  # 3.1.1 cannot say no: acknowledge and drop
                durable = False
                if qos == 2 and not code:  # else a PUBREC >= 0x80 ends the flow (4.3.3)
                    durable = session.add_incoming(pid)
                self.acks.add(PUBACK if qos == 1 else PUBREC, pid, code, None, durable)
            return
        pending = None
        route = True
        if broker.has_interceptors:
            seen = p if topic is p.topic and props is p.properties else \
                Publish(topic, p.payload, qos, p.retain, p.dup, p.packet_id, props)
            route, pending = broker.intercept(self.client_id, self.user, seen)
        need = False
        if route:
            expiry_at = None
            if props is not NO_PROPERTIES and props.message_expiry_interval is not None:
                expiry_at = self.clock.seconds() + props.message_expiry_interval
            need = broker.publish(Message(topic, p.payload, qos, p.retain, props, expiry_at,
                                          self.client_id))
        if qos == 0:
            return
        if qos == 2 and session.add_incoming(pid):
            need = True
        if need or pending:
            self.acks.add(PUBACK if qos == 1 else PUBREC, pid, 0, pending, need)
        else:
            self.acks.send(PUBACK if qos == 1 else PUBREC, pid)

    def _may_publish(self, topic: str) -> bool:
        """The ACL's answer, remembered per topic until the ACL changes (a device publishes
        the same few topics again and again)."""
        cache = self._pub_ok
        if self._acl_generation != self.broker.acl_generation:
            cache.clear()
            self._acl_generation = self.broker.acl_generation
        ok = cache.get(topic)
        if ok is None:
            ok = self.broker.acl.can_publish(self.user, self.client_id, topic)
            if len(cache) >= 1024:
                cache.clear()
            cache[topic] = ok
        return ok

    # -- acknowledgements in -------------------------------------------------------------------
    def _on_puback(self, p: Puback) -> None:
        assert self.session is not None
        self.session.acked(p.packet_id)

    def _on_pubrec(self, p: Pubrec) -> None:
        assert self.session is not None
        if not self.session.received(p.packet_id, p.reason_code >= 0x80) and \
                p.reason_code < 0x80:
            self.write(encode(Pubrel(p.packet_id, RC.PACKET_IDENTIFIER_NOT_FOUND), self.version))

    def _on_pubcomp(self, p: Pubcomp) -> None:
        assert self.session is not None
        self.session.acked(p.packet_id)

    def _on_pubrel(self, p: Pubrel) -> None:
        assert self.session is not None
        pid = p.packet_id
        durable = self.session.release_incoming(pid)
        if durable:
            self.acks.add(PUBCOMP, pid, 0, None, True)
        elif durable is not None:
            self.acks.send(PUBCOMP, pid)
        else:
            self.acks.in_flight += 1  # not counted, but released like the others
            self.acks.add(PUBCOMP, pid, RC.PACKET_IDENTIFIER_NOT_FOUND)  # 4.3.3

    # -- other packets -------------------------------------------------------------------------
    def _on_subscribe(self, p: Subscribe) -> None:
        session = self.session
        assert session is not None
        ids = p.properties.subscription_identifiers
        subid = ids[0] if ids else None
        codes = []
        retained = []
        for topic_filter, options in p.subscriptions:
            code, sub = self.broker.subscribe(session, topic_filter, options, subid)
            codes.append(code)
            if sub is not None:
                retained.append(sub)
        after_commit(self, lambda ok: self._suback(ok, session, p, codes, retained))

    def _suback(self, ok: bool, session: Session, p: Subscribe, codes: list[int],
                retained: list[Any]) -> None:
        """SUBACK once the subscriptions are durable, then their retained messages."""
        if self.state != OPEN or self.session is not session:
            return
        if not ok:  # not stored: not granted either
            for i, (topic_filter, _options) in enumerate(p.subscriptions):
                if codes[i] < 0x80:
                    self.broker.unsubscribe(session, topic_filter)
                    codes[i] = RC.UNSPECIFIED_ERROR
            retained = []
        self.write(encode(Suback(p.packet_id, tuple(codes)), self.version))
        for sub in retained:
            self.broker.send_retained(session, sub)

    def _on_unsubscribe(self, p: Unsubscribe) -> None:
        session = self.session
        assert session is not None
        codes = tuple(RC.SUCCESS if self.broker.unsubscribe(session, f)
                      else RC.NO_SUBSCRIPTION_EXISTED for f in p.topic_filters)

        def unsuback(ok: bool) -> None:  # once durable: a restart must not bring them back
            if self.state == OPEN and self.session is session:
                self.write(encode(Unsuback(p.packet_id, codes), self.version))

        after_commit(self, unsuback)

    def _on_pingreq(self, p: Pingreq) -> None:
        self.write(_PINGRESP)

    def _on_disconnect(self, p: Disconnect) -> None:
        session = self.session
        assert session is not None
        new_expiry = p.properties.session_expiry_interval
        if new_expiry is not None:
            if session.expiry == 0 and new_expiry != 0:
                # MQTT-3.14.2-2: a session that was to end may not be made persistent now
                return self.server_disconnect(RC.PROTOCOL_ERROR, "session expiry was 0")
            session.expiry = min(new_expiry, self.limits.max_session_expiry)
            if session.expiry == 0 and session.store is not None:
                self.broker.make_transient(session)
        # MQTT-3.14.4-3: a normal DISCONNECT discards the will; 0x04 asks for it
        self._close(publish_will=p.reason_code == RC.DISCONNECT_WITH_WILL_MESSAGE)

    def _on_auth(self, p: Auth) -> None:
        # no enhanced authentication was negotiated, so any AUTH is a Protocol Error (4.12)
        self.server_disconnect(RC.PROTOCOL_ERROR, "AUTH without an authentication method")

    # -- output --------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        self._out.append(data)
        self._outbytes += len(data)
        if not self._dirty:
            self._dirty = True
            self.broker.want_flush(self)

    @property
    def is_open(self) -> bool:
        return self.state == OPEN

    def write_publish(self, msg: Message, qos: int, retain: bool, subids: tuple[int, ...],
                      pid: int, dup: bool) -> bool:
        """Buffer one PUBLISH; False when it cannot be sent (expired, too large for the
        client's Maximum Packet Size, MQTT-3.1.2-25), which the session treats as done."""
        if self.state != OPEN:
            return True  # closing: the session keeps it for redelivery
        now = self.clock.seconds() if msg.expiry_at is not None else 0.0
        alias = 0
        if self._alias_out_max:
            alias = self._aliases_out.get(msg.topic, 0)
            if alias:
                enc = msg.encode(self.version, qos, retain, subids, now, alias, True)
            elif len(self._aliases_out) < self._alias_out_max:
                alias = len(self._aliases_out) + 1
                enc = msg.encode(self.version, qos, retain, subids, now, alias, False)
            else:
                enc = msg.encode(self.version, qos, retain, subids, now)
                alias = 0
        else:
            enc = msg.encode(self.version, qos, retain, subids, now)
        if enc is None:
            self.stats.dropped["expired"] += 1
            return False
        data, offset = enc
        if qos:
            if dup:
                data = with_packet_id(data, offset, pid, True)
            else:
                data = data[:offset] + pid.to_bytes(2, "big") + data[offset + 2:]
        if self._max_out and len(data) > self._max_out:
            self.stats.dropped["packet_too_large"] += 1
            self.broker.ratelog.warn("too_large", "MQTT: message on {topic!r} exceeds the "
                                     "maximum packet size of {cid!r}, dropped",
                                     topic=msg.topic, cid=self.client_id)
            return False
        if alias and msg.topic not in self._aliases_out:
            self._aliases_out[msg.topic] = alias
        self.stats.publish_sent += 1
        self._out.append(data)
        self._outbytes += len(data)
        if not self._dirty:
            self._dirty = True
            self.broker.want_flush(self)
        return True

    def write_pubrel(self, pid: int) -> None:
        self.write(bytes((0x62, 2, pid >> 8, pid & 0xFF)))

    def flush(self) -> None:
        """Write everything buffered in this reactor turn with one call."""
        self._dirty = False
        if self._out and self.state != CLOSED:
            self._flush_now()

    def _flush_now(self) -> None:
        out = self._out
        if not out:
            return
        self._out = []
        self.stats.messages_sent += len(out)
        self.stats.bytes_sent += self._outbytes
        self._outbytes = 0
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _send_disconnect(self, code: int, reason: str | None = None) -> None:
        # only after the CONNACK: a DISCONNECT may not precede it (MQTT-3.2.0-1)
        if self.version == MQTT_5 and self.state == OPEN:
            self.write(encode(Disconnect(code, self._reason(reason)), MQTT_5))

    def server_disconnect(self, code: int, reason: str | None = None) -> None:
        """Close with a reason code (v5 DISCONNECT, MQTT-4.13); the will is published except
        when the server is shutting down."""
        if self.state == CLOSED:
            return
        self._send_disconnect(code, reason)
        self._close(publish_will=code != RC.SERVER_SHUTTING_DOWN)

    def taken_over(self) -> None:
        """Another connection took this client id (MQTT-3.1.4-3): DISCONNECT 0x8E, close."""
        self.session = None  # the broker already detached it and dealt with the will
        self._send_disconnect(RC.SESSION_TAKEN_OVER)
        self._close(publish_will=False)

    # -- IPushProducer: the transport tells us when its buffer is full ---------------------------
    def pauseProducing(self) -> None:
        self._tx_paused = True
        self.paused = True

    def resumeProducing(self) -> None:
        self._tx_paused = False
        if self._connack_pending:
            return  # nothing may precede the CONNACK (MQTT-3.2.0-1)
        self.paused = False
        if self.session is not None and self.state == OPEN:
            self.session.fill()

    def stopProducing(self) -> None:
        self._tx_paused = True
        self.paused = True


def _set_write_buffer(transport: Any, size: int) -> None:
    """Set the socket transport's pause threshold (``bufferSize``: Twisted pauses its
    producer, us, once that many bytes are unsent) and let it hand the kernel up to that much
    per reactor turn (``SEND_LIMIT``, 128 KiB by default: a burst of tag changes then drains
    more slowly than the bridge produces it). Under TLS the TCP transport is the wrapped one,
    whose pause the TLS layer passes on."""
    for _ in range(4):
        if transport is None:
            return
        if hasattr(transport, "bufferSize") and hasattr(transport, "socket"):
            transport.bufferSize = size
            transport.SEND_LIMIT = max(transport.SEND_LIMIT, size)
            return
        transport = getattr(transport, "transport", None)
