"""MQTT packet decoding: the per-state fixed-header tables, one ``_decode_*`` function per
packet type, the per-connection ``Decoder`` (``feed(bytes) -> [Packet, ...]``) and
``decode_packet`` for a lone packet. Built on the primitives of ``iotserver.mqtt.wire``;
re-exported by ``iotserver.mqtt.codec``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Literal

from iotserver.mqtt.packets import (
    AUTH_CODES,
    CONNACK_CODES,
    DISCONNECT_CODES,
    MQTT_3_1_1,
    MQTT_5,
    NO_PROPERTIES,
    PUBACK_CODES,
    PUBREL_CODES,
    SUBACK_CODES,
    SUBACK_CODES_V311,
    UNSUBACK_CODES,
    VERSIONS,
    WILL_PROPERTIES,
    Auth,
    Connack,
    ConnackReturnCode,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
    RetainHandling,
    Suback,
    Subscribe,
    SubscriptionOptions,
    Unsuback,
    Unsubscribe,
    Will,
)
from iotserver.mqtt.wire import (
    _MALFORMED,
    _PROTOCOL,
    MAX_PACKET_SIZE,
    MqttProtocolError,
    UnsupportedProtocolVersion,
    _has_wildcard,
    _malformed,
    _protocol,
    _read_properties,
    _Reader,
)

Role = Literal["server", "client", "any"]

# Fixed header flags required per packet type (MQTT-2.1.3-1, table 2-2); PUBLISH is checked apart.
_FIXED_FLAGS = {1: 0, 2: 0, 4: 0, 5: 0, 6: 2, 7: 0, 8: 2, 9: 0, 10: 2, 11: 0, 12: 0, 13: 0, 14: 0,
                15: 0}
_CLIENT_TO_SERVER = frozenset({1, 3, 4, 5, 6, 7, 8, 10, 12, 14, 15})
_SERVER_TO_CLIENT = frozenset({2, 3, 4, 5, 6, 7, 9, 11, 13, 14, 15})
_HeaderError = tuple[int, str] | None


@cache
def _header_table(role: str, version: int | None, phase: str, second_connect: bool
                  ) -> tuple[_HeaderError, ...]:
    """For each possible first byte: None if acceptable now, else (reason code, message).

    Checking the whole first byte with one tuple index keeps the hot path cheap; the table
    depends only on the decoder state, so there are a handful of them, built once.
    """
    table: list[_HeaderError] = []
    for b0 in range(256):
        ptype, flags = b0 >> 4, b0 & 0x0F
        err: _HeaderError = None
        if ptype == 0:
            err = (_MALFORMED, "reserved packet type 0")
        elif ptype == 15 and version == MQTT_3_1_1:
            err = (_MALFORMED, "packet type 15 is reserved in MQTT 3.1.1")
        elif phase == "connect" and ptype != PacketType.CONNECT:
            err = (_PROTOCOL, "first packet must be CONNECT")  # MQTT-3.1.0-1
        elif phase == "connack" and ptype != PacketType.CONNACK:
            err = (_PROTOCOL, "first packet from the server must be CONNACK")  # MQTT-3.2.0-1
        elif role == "server" and ptype not in _CLIENT_TO_SERVER:
            err = (_PROTOCOL, f"{PacketType(ptype).name} may only be sent by a server")
        elif role == "client" and ptype not in _SERVER_TO_CLIENT:
            err = (_PROTOCOL, f"{PacketType(ptype).name} may only be sent by a client")
        elif ptype == PacketType.CONNECT and phase == "open" and role == "server" \
                and not second_connect:
            err = (_PROTOCOL, "second CONNECT")  # MQTT-3.1.0-2
        elif ptype == PacketType.PUBLISH:
            qos = (flags >> 1) & 3
            if qos == 3:
                err = (_MALFORMED, "PUBLISH with QoS 3")  # MQTT-3.3.1-4
            elif qos == 0 and flags & 0x08:
                err = (_MALFORMED, "PUBLISH QoS 0 with DUP set")  # MQTT-3.3.1-2
        elif flags != _FIXED_FLAGS[ptype]:
            # MQTT-2.1.3-1
            err = (_MALFORMED, f"{PacketType(ptype).name} with reserved flags 0b{flags:04b}")
        table.append(err)
    return tuple(table)


def _packet_id(data: bytes, pos: int, end: int) -> int:
    if pos + 2 > end:
        raise _malformed("packet ends inside the packet identifier")
    pid = (data[pos] << 8) | data[pos + 1]
    if pid == 0:
        raise _protocol("packet identifier 0")  # MQTT-2.2.1-3
    return pid


def _trailing(r: _Reader, what: str) -> None:
    if r.pos != r.end:
        raise _malformed(f"{r.end - r.pos} unexpected bytes at the end of {what}")


def _reason(code: int, allowed: frozenset[ReasonCode], what: str) -> ReasonCode:
    if code not in allowed:
        raise _protocol(f"reason code 0x{code:02X} not valid in {what}")
    return ReasonCode(code)


def _decode_connect(data: bytes, pos: int, end: int, flags: int, version: int | None,
                    server: bool) -> Connect:
    r = _Reader(data, pos, end)
    name = r.utf8()
    level = r.u8()
    if name != "MQTT" and name != "MQIsdp":
        raise _protocol(f"not an MQTT CONNECT (protocol name {name!r})")  # MQTT-3.1.2-1
    if name == "MQIsdp" or level not in VERSIONS:
        raise UnsupportedProtocolVersion(name, level)  # MQTT-3.1.2-2
    try:
        return _decode_connect_body(r, level)
    except MqttProtocolError as exc:
        exc.protocol_level = level
        raise


def _decode_connect_body(r: _Reader, level: int) -> Connect:
    cflags = r.u8()
    if cflags & 0x01:
        raise _malformed("CONNECT reserved flag set")  # MQTT-3.1.2-3
    will_flag = cflags & 0x04
    will_qos = (cflags >> 3) & 0x03
    will_retain = bool(cflags & 0x20)
    has_password = cflags & 0x40
    has_username = cflags & 0x80
    if will_qos == 3:
        raise _malformed("will QoS 3")  # MQTT-3.1.2-12 (3.1.1: MQTT-3.1.2-14)
    if not will_flag and (will_qos or will_retain):
        # MQTT-3.1.2-11, MQTT-3.1.2-13 (3.1.1: MQTT-3.1.2-13, MQTT-3.1.2-15)
        raise _malformed("will QoS or will retain set without the will flag")
    if level == MQTT_3_1_1 and has_password and not has_username:
        raise _protocol("password without user name")  # 3.1.1 MQTT-3.1.2-22
    keepalive = r.u16()
    props = _read_properties(r, PacketType.CONNECT) if level == MQTT_5 else NO_PROPERTIES
    client_id = r.utf8()  # MQTT-3.1.3-3/4
    will = None
    if will_flag:
        wprops = _read_properties(r, WILL_PROPERTIES) if level == MQTT_5 else NO_PROPERTIES
        wtopic = r.utf8()
        if not wtopic or _has_wildcard(wtopic):
            raise MqttProtocolError(ReasonCode.TOPIC_NAME_INVALID, "invalid will topic")
        will = Will(wtopic, r.binary(), will_qos, will_retain, wprops)
    username = r.utf8() if has_username else None  # MQTT-3.1.3-11
    password = r.binary() if has_password else None
    _trailing(r, "CONNECT")
    return Connect(client_id, level, bool(cflags & 0x02), keepalive, username, password, will,
                   props)


def _decode_connack(data: bytes, pos: int, end: int, flags: int, version: int | None,
                    server: bool) -> Connack:
    r = _Reader(data, pos, end)
    ack_flags = r.u8()
    code = r.u8()
    if ack_flags & 0xFE:
        raise _malformed("CONNACK reserved flags set")  # MQTT-3.2.2-1
    session_present = bool(ack_flags & 1)
    if version == MQTT_5:
        rc: int = _reason(code, CONNACK_CODES, "CONNACK")
        props = _read_properties(r, PacketType.CONNACK)
    else:
        if code > 5:
            raise _protocol(f"reserved CONNACK return code {code}")
        rc = ConnackReturnCode(code)
        props = NO_PROPERTIES
    if code and session_present:
        raise _protocol("session present with a refusal")  # MQTT-3.2.2-6 (3.1.1: -4)
    _trailing(r, "CONNACK")
    return Connack(session_present, rc, props)


def _decode_publish(data: bytes, pos: int, end: int, flags: int, version: int | None,
                    server: bool) -> Publish:
    # The broker's hot path: inlined field access, no _Reader unless properties are present.
    qos = (flags >> 1) & 3  # QoS 3 and DUP on QoS 0 were refused with the fixed header
    if pos + 2 > end:
        raise _malformed("PUBLISH ends inside the topic length")
    tend = pos + 2 + ((data[pos] << 8) | data[pos + 1])
    if tend > end:
        raise _malformed("PUBLISH topic runs past the packet")
    try:
        topic = data[pos + 2:tend].decode("utf-8")  # MQTT-1.5.4-1
    except UnicodeDecodeError:
        raise _malformed("PUBLISH topic is not valid UTF-8") from None
    if "+" in topic or "#" in topic:
        raise MqttProtocolError(ReasonCode.TOPIC_NAME_INVALID,
                                "PUBLISH topic contains a wildcard")  # MQTT-3.3.2-2
    if "\x00" in topic:
        raise _malformed("PUBLISH topic contains U+0000")  # MQTT-1.5.4-2
    pos = tend
    packet_id = None
    if qos:
        packet_id = _packet_id(data, pos, end)  # MQTT-2.2.1-3
        pos += 2
    props = NO_PROPERTIES
    if version == MQTT_5:
        if pos < end and data[pos] == 0:
            pos += 1
        else:
            r = _Reader(data, pos, end)
            props = _read_properties(r, PacketType.PUBLISH)
            pos = r.pos
            if props.topic_alias == 0:
                raise MqttProtocolError(ReasonCode.TOPIC_ALIAS_INVALID,
                                        "topic alias 0")  # MQTT-3.3.2-8
            if server and props.subscription_identifiers:
                raise _protocol("PUBLISH from a client with a subscription identifier"
                                )  # MQTT-3.3.4-6
        if not topic and props.topic_alias is None:
            raise _protocol("empty topic without a topic alias")  # 3.3.2.1
    elif not topic:
        raise _protocol("empty topic name")  # MQTT-4.7.3-1
    return Publish(topic, data[pos:end], qos, bool(flags & 1), bool(flags & 8), packet_id, props)


def _ack_decoder(cls: type[Puback | Pubrec | Pubrel | Pubcomp],
                 ptype: PacketType, allowed: frozenset[ReasonCode]) -> _DecodeFn:
    name = ptype.name

    def decode(data: bytes, pos: int, end: int, flags: int, version: int | None,
               server: bool) -> Packet:
        size = end - pos
        if version != MQTT_5 and size != 2:
            raise _malformed(f"{name} remaining length must be 2")
        packet_id = _packet_id(data, pos, end)
        if size == 2:
            return cls(packet_id)
        # 5.0 3.4.2.1: reason code omitted means Success; property length may be omitted
        code = _reason(data[pos + 2], allowed, name)
        if size == 3:
            return cls(packet_id, code)
        r = _Reader(data, pos + 3, end)
        props = _read_properties(r, ptype)
        _trailing(r, name)
        return cls(packet_id, code, props)

    return decode


def _decode_subscribe(data: bytes, pos: int, end: int, flags: int, version: int | None,
                      server: bool) -> Subscribe:
    packet_id = _packet_id(data, pos, end)
    r = _Reader(data, pos + 2, end)
    props = _read_properties(r, PacketType.SUBSCRIBE) if version == MQTT_5 else NO_PROPERTIES
    subs: list[tuple[str, SubscriptionOptions]] = []
    while r.pos < end:
        topic_filter = r.utf8()
        opts = r.u8()
        qos = opts & 0x03
        if version == MQTT_5:
            if opts & 0xC0:
                raise _malformed("reserved subscription option bits set")  # MQTT-3.8.3-5
            if qos == 3:
                raise _protocol("subscription QoS 3")  # 3.8.3.1
            retain_handling = (opts >> 4) & 0x03
            if retain_handling == 3:
                raise _protocol("retain handling 3")  # 3.8.3.1
            no_local = bool(opts & 0x04)
            if no_local and topic_filter.startswith("$share/"):
                raise _protocol("no local on a shared subscription")  # MQTT-3.8.3-4
            options = SubscriptionOptions(qos, no_local, bool(opts & 0x08),
                                          RetainHandling(retain_handling))
        else:
            if opts & 0xFC or qos == 3:
                raise _malformed("reserved subscription bits or QoS 3")  # 3.1.1 MQTT-3.8.3-4
            options = _V311_OPTIONS[qos]
        subs.append((topic_filter, options))
    if not subs:
        raise _protocol("SUBSCRIBE without topic filters")  # MQTT-3.8.3-2 (3.1.1: -3.8.3-3)
    return Subscribe(packet_id, tuple(subs), props)


_V311_OPTIONS = tuple(SubscriptionOptions(q) for q in range(3))


def _decode_suback(data: bytes, pos: int, end: int, flags: int, version: int | None,
                   server: bool) -> Suback:
    packet_id = _packet_id(data, pos, end)
    r = _Reader(data, pos + 2, end)
    codes: tuple[int, ...]
    if version == MQTT_5:
        props = _read_properties(r, PacketType.SUBACK)
        codes = tuple(_reason(c, SUBACK_CODES, "SUBACK") for c in data[r.pos:end])
    else:
        props = NO_PROPERTIES
        codes = tuple(data[r.pos:end])
        if any(c not in SUBACK_CODES_V311 for c in codes):
            raise _protocol("invalid SUBACK return code")  # 3.1.1 MQTT-3.9.3-2
    if not codes:
        raise _protocol("SUBACK without return codes")
    return Suback(packet_id, codes, props)


def _decode_unsubscribe(data: bytes, pos: int, end: int, flags: int, version: int | None,
                        server: bool) -> Unsubscribe:
    packet_id = _packet_id(data, pos, end)
    r = _Reader(data, pos + 2, end)
    props = _read_properties(r, PacketType.UNSUBSCRIBE) if version == MQTT_5 else NO_PROPERTIES
    filters: list[str] = []
    while r.pos < end:
        filters.append(r.utf8())
    if not filters:
        raise _protocol("UNSUBSCRIBE without topic filters")  # MQTT-3.10.3-2
    return Unsubscribe(packet_id, tuple(filters), props)


def _decode_unsuback(data: bytes, pos: int, end: int, flags: int, version: int | None,
                     server: bool) -> Unsuback:
    if version != MQTT_5:
        if end - pos != 2:
            raise _malformed("UNSUBACK remaining length must be 2")  # 3.1.1 3.11.1
        return Unsuback(_packet_id(data, pos, end))
    packet_id = _packet_id(data, pos, end)
    r = _Reader(data, pos + 2, end)
    props = _read_properties(r, PacketType.UNSUBACK)
    codes = tuple(_reason(c, UNSUBACK_CODES, "UNSUBACK") for c in data[r.pos:end])
    if not codes:
        raise _protocol("UNSUBACK without reason codes")  # 3.11.3
    return Unsuback(packet_id, codes, props)


def _decode_empty(cls: type[Pingreq | Pingresp]) -> _DecodeFn:
    instance = cls()

    def decode(data: bytes, pos: int, end: int, flags: int, version: int | None,
               server: bool) -> Packet:
        if end != pos:
            raise _malformed(f"{cls.__name__.upper()} with a payload")
        return instance

    return decode


def _decode_disconnect(data: bytes, pos: int, end: int, flags: int, version: int | None,
                       server: bool) -> Disconnect:
    if end == pos:
        return _DISCONNECT  # 3.14.2.1: no reason code means Normal disconnection
    if version != MQTT_5:
        raise _malformed("DISCONNECT with a payload")  # 3.1.1 3.14
    code = _reason(data[pos], DISCONNECT_CODES, "DISCONNECT")
    r = _Reader(data, pos + 1, end)
    props = _read_properties(r, PacketType.DISCONNECT) if end - pos > 1 else NO_PROPERTIES
    _trailing(r, "DISCONNECT")
    return Disconnect(code, props)


_DISCONNECT = Disconnect()


def _decode_auth(data: bytes, pos: int, end: int, flags: int, version: int | None,
                 server: bool) -> Auth:
    if end == pos:
        return Auth()  # 3.15.2.1: omitted reason code means Success
    code = _reason(data[pos], AUTH_CODES, "AUTH")
    r = _Reader(data, pos + 1, end)
    props = _read_properties(r, PacketType.AUTH) if end - pos > 1 else NO_PROPERTIES
    _trailing(r, "AUTH")
    return Auth(code, props)


_DecodeFn = Callable[[bytes, int, int, int, "int | None", bool], Packet]
_DECODERS: tuple[_DecodeFn | None, ...] = (
    None,
    _decode_connect,
    _decode_connack,
    _decode_publish,
    _ack_decoder(Puback, PacketType.PUBACK, PUBACK_CODES),
    _ack_decoder(Pubrec, PacketType.PUBREC, PUBACK_CODES),
    _ack_decoder(Pubrel, PacketType.PUBREL, PUBREL_CODES),
    _ack_decoder(Pubcomp, PacketType.PUBCOMP, PUBREL_CODES),
    _decode_subscribe,
    _decode_suback,
    _decode_unsubscribe,
    _decode_unsuback,
    _decode_empty(Pingreq),
    _decode_empty(Pingresp),
    _decode_disconnect,
    _decode_auth,
)


class Decoder:
    """Per-connection MQTT decoder: ``feed(bytes) -> [Packet, ...]``.

    ``role="server"`` decodes client-to-server traffic: the first packet must be CONNECT, whose
    level fixes ``version`` (pass ``version`` to start already connected, e.g. in tests).
    ``role="client"`` decodes server-to-client traffic for a known ``version``; the first packet
    must be CONNACK. ``role="any"`` accepts every packet type in any order (tests, captures).

    ``max_packet_size`` bounds the whole packet (fixed header included, as 5.0's Maximum Packet
    Size does); it is checked as soon as the fixed header is complete, before the body is
    buffered. A second CONNECT is a Protocol Error unless ``allow_second_connect`` (then it is
    returned and the session layer decides). After an error the decoder stays failed.
    """

    def __init__(self, max_packet_size: int = MAX_PACKET_SIZE, *, role: Role = "server",
                 version: int | None = None, allow_second_connect: bool = False) -> None:
        if role not in ("server", "client", "any"):
            raise ValueError(f"role must be 'server', 'client' or 'any', not {role!r}")
        if version is not None and version not in VERSIONS:
            raise ValueError(f"version must be 4 or 5, not {version!r}")
        if role != "server" and version is None:
            raise ValueError(f"role {role!r} needs the protocol version")
        if max_packet_size < 2:
            raise ValueError("max_packet_size must be at least 2")
        self.max_packet_size = max_packet_size
        self.role = role
        self.version = version
        self._second_connect = allow_second_connect
        if role == "server":
            self._phase = "connect" if version is None else "open"
        else:
            self._phase = "connack" if role == "client" else "open"
        self._pending = bytearray()
        self._need = 0  # bytes _pending must hold before parsing is worth trying again
        self._error: MqttProtocolError | None = None
        self._set_table()

    def _set_table(self) -> None:
        self._table = _header_table(self.role, self.version, self._phase, self._second_connect)

    @property
    def buffered(self) -> int:
        """Bytes held of a packet not yet complete."""
        return len(self._pending)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Packet]:
        """Decode every complete packet in the buffered bytes plus ``data``."""
        if self._error is not None:
            raise self._error
        if type(data) is not bytes:
            data = bytes(data)  # payload slices must be bytes, whatever the caller passes
        if self._pending:
            # only parse once the packet under way can be complete: keeps byte-by-byte feeding
            # of a large packet O(n) instead of re-scanning the buffer on every call
            self._pending += data
            if len(self._pending) < self._need:
                return []
            data = bytes(self._pending)
            self._pending.clear()
        out: list[Packet] = []
        pos = 0
        n = len(data)
        table = self._table
        server = self.role == "server"
        try:
            while pos < n:
                b0 = data[pos]
                err = table[b0]
                if err is not None:
                    raise MqttProtocolError(*err)
                # Remaining Length: at most 4 bytes (MQTT 1.5.5)
                i = pos + 1
                if i < n and data[i] < 0x80:  # one-byte length, the common case
                    size = data[i]
                    i += 1
                else:
                    size = 0
                    shift = 0
                    while True:
                        if i >= n:
                            size = -1
                            break
                        byte = data[i]
                        i += 1
                        size |= (byte & 0x7F) << shift
                        if byte < 0x80:
                            if byte == 0:
                                raise _malformed("remaining length not minimal")  # MQTT-1.5.5-1
                            break
                        if i - pos > 4:
                            raise _malformed("remaining length longer than 4 bytes")
                        shift += 7
                    if size < 0:  # header incomplete
                        self._need = n - pos + 1
                        break
                total = i - pos + size
                if total > self.max_packet_size:
                    raise MqttProtocolError(ReasonCode.PACKET_TOO_LARGE,
                                            f"packet of {total} bytes exceeds the maximum "
                                            f"{self.max_packet_size}")
                end = i + size
                if end > n:
                    self._need = total
                    break
                ptype = b0 >> 4
                packet = _DECODERS[ptype](data, i, end, b0 & 0x0F,  # type: ignore[misc]
                                          self.version, server)
                out.append(packet)
                pos = end
                if (ptype <= 2 and self._phase != "open") or (ptype == 1 and self.role == "any"):
                    self._connected(packet)
                    table = self._table
        except MqttProtocolError as exc:
            if self.version is None and not isinstance(exc, UnsupportedProtocolVersion) \
                    and exc.protocol_level in VERSIONS:
                self.version = exc.protocol_level
            exc.packets = out
            self._error = exc
            self._pending.clear()
            raise
        if pos < n:
            self._pending += data[pos:] if pos else data
        return out

    def _connected(self, packet: Packet) -> None:
        if isinstance(packet, Connect):
            self.version = packet.protocol_level
        self._phase = "open"
        self._set_table()


def decode_packet(data: bytes, version: int, role: Role = "any") -> Packet:
    """Decode exactly one complete packet (tests, captures); anything else is an error."""
    decoder = Decoder(role=role, version=version, allow_second_connect=True)
    decoder._phase = "open"  # no ordering rules for a lone packet
    decoder._set_table()
    packets = decoder.feed(data)
    if len(packets) != 1 or decoder.buffered:
        raise _malformed(f"expected one complete packet, got {len(packets)} "
                         f"and {decoder.buffered} extra bytes")
    return packets[0]
