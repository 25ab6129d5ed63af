"""Sans-I/O MQTT 3.1.1 / 5.0 codec: bytes in, packets out (``Decoder``), packets in, bytes out
(``encode``, ``encode_publish``).

No sockets, no Twisted, no timers. A peer that breaks the protocol raises ``MqttProtocolError``
carrying the 5.0 reason code to send in a DISCONNECT (or CONNACK); misuse of the encoding API
raises ``ValueError`` / ``TypeError``. Spec clauses: ``MQTT-x.y.z-n`` numbers are from MQTT 5.0
unless marked 3.1.1.
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
    PROPERTY_BY_ID,
    PROPERTY_SPECS,
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
    Properties,
    PropertyId,
    PropertyType,
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

Role = Literal["server", "client", "any"]

#: Largest Remaining Length a 4-byte Variable Byte Integer holds (MQTT 1.5.5).
MAX_REMAINING_LENGTH = 268_435_455
#: Largest possible packet: 1 byte type + 4 bytes length + body.
MAX_PACKET_SIZE = 1 + 4 + MAX_REMAINING_LENGTH

_MALFORMED = ReasonCode.MALFORMED_PACKET
_PROTOCOL = ReasonCode.PROTOCOL_ERROR


class MqttProtocolError(Exception):
    """The peer broke the protocol. ``reason_code`` is the 5.0 code for the DISCONNECT/CONNACK.

    ``packets`` holds packets decoded from the same ``feed`` before the error (process or drop
    them; the decoder stays failed). ``protocol_level`` is set for an error inside a CONNECT once
    its level was read, so the server knows whether to answer with a 5.0 CONNACK reason code.
    """

    def __init__(self, reason_code: int, message: str) -> None:
        super().__init__(f"{message} (reason code 0x{reason_code:02X})")
        self.reason_code = ReasonCode(reason_code)
        self.message = message
        self.packets: list[Packet] = []
        self.protocol_level: int | None = None


class UnsupportedProtocolVersion(MqttProtocolError):
    """CONNECT with a protocol name/level we do not speak (MQTT 3.1 "MQIsdp" level 3, or level
    6+). Answer with ``encode(Connack(reason_code=ReasonCode.UNSUPPORTED_PROTOCOL_VERSION), 4)``
    (3.1.1 return code 0x01, MQTT-3.1.2-2 of 3.1.1) and close the connection."""

    def __init__(self, protocol_name: str, protocol_level: int) -> None:
        super().__init__(
            ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
            f"unsupported protocol {protocol_name!r} level {protocol_level}",
        )
        self.protocol_name = protocol_name
        self.protocol_level = protocol_level


def _malformed(message: str) -> MqttProtocolError:
    return MqttProtocolError(_MALFORMED, message)


def _protocol(message: str) -> MqttProtocolError:
    return MqttProtocolError(_PROTOCOL, message)


# --------------------------------------------------------------------------- primitives


def encode_varint(value: int) -> bytes:
    """Variable Byte Integer (MQTT 1.5.5): 7 bits per byte, least significant first, <= 4 bytes."""
    if value < 128:
        if value < 0:
            raise ValueError(f"variable byte integer out of range: {value}")
        return _SMALL_VARINTS[value]
    if value > MAX_REMAINING_LENGTH:
        raise ValueError(f"variable byte integer out of range: {value}")
    out = bytearray()
    while True:
        digit = value & 0x7F
        value >>= 7
        if value:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


_SMALL_VARINTS = tuple(bytes((i,)) for i in range(128))


class _Reader:
    """Bounds-checked cursor over ``data[pos:end]``; every overrun is a Malformed Packet."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data = data
        self.pos = pos
        self.end = end

    def remaining(self) -> int:
        return self.end - self.pos

    def u8(self) -> int:
        pos = self.pos
        if pos >= self.end:
            raise _malformed("packet ends inside a field")
        self.pos = pos + 1
        return self.data[pos]

    def u16(self) -> int:
        pos = self.pos
        if pos + 2 > self.end:
            raise _malformed("packet ends inside a two byte integer")
        self.pos = pos + 2
        return (self.data[pos] << 8) | self.data[pos + 1]

    def u32(self) -> int:
        pos = self.pos
        if pos + 4 > self.end:
            raise _malformed("packet ends inside a four byte integer")
        self.pos = pos + 4
        return int.from_bytes(self.data[pos:pos + 4], "big")

    def varint(self) -> int:
        value = 0
        shift = 0
        for count in range(4):
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                if byte == 0 and count:
                    raise _malformed("variable byte integer not minimal")  # MQTT-1.5.5-1
                return value
            shift += 7
        raise _malformed("variable byte integer longer than 4 bytes")  # MQTT 1.5.5

    def binary(self) -> bytes:
        size = self.u16()
        pos = self.pos
        if pos + size > self.end:
            raise _malformed("binary data runs past the packet")
        self.pos = pos + size
        return bytes(self.data[pos:pos + size])

    def utf8(self) -> str:
        return _decode_utf8(self.binary())


def _decode_utf8(raw: bytes) -> str:
    # Python's strict codec rejects overlong forms and encoded surrogates U+D800-DFFF
    # (MQTT-1.5.4-1; 3.1.1 MQTT-1.5.3-1); U+0000 is ours to refuse (MQTT-1.5.4-2; 3.1.1 -1.5.3-2).
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed("malformed UTF-8 string") from None
    if "\x00" in text:
        raise _malformed("UTF-8 string contains U+0000")
    return text


def _encode_utf8(text: str, what: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be str, not {type(text).__name__}")
    raw = text.encode("utf-8")  # UnicodeEncodeError (a ValueError) for lone surrogates
    if "\x00" in text:
        raise ValueError(f"{what} must not contain U+0000")  # MQTT-1.5.4-2
    if len(raw) > 65535:
        raise ValueError(f"{what} is longer than 65535 bytes")
    return len(raw).to_bytes(2, "big") + raw


def _encode_binary(data: bytes, what: str) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, not {type(data).__name__}")
    if len(data) > 65535:
        raise ValueError(f"{what} is longer than 65535 bytes")
    return len(data).to_bytes(2, "big") + bytes(data)


def _check_int(value: object, lo: int, hi: int, what: str) -> int:
    if not isinstance(value, int):
        raise TypeError(f"{what} must be int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{what} out of range {lo}..{hi}: {value}")
    return value


def _has_wildcard(topic: str) -> bool:
    return "+" in topic or "#" in topic


# --------------------------------------------------------------------------- properties

_USER = PropertyId.USER_PROPERTY
_SUBID = PropertyId.SUBSCRIPTION_IDENTIFIER
# Properties for which the spec makes 0 a Protocol Error (3.1.2.11.3, 3.1.2.11.4, 3.8.2.1.2).
_NONZERO = frozenset({"receive_maximum", "maximum_packet_size"})


def _read_properties(r: _Reader, context: int) -> Properties:
    """Read a Property Length and the properties after it (MQTT 2.2.2)."""
    length = r.varint()
    if length == 0:
        return NO_PROPERTIES
    end = r.pos + length
    if end > r.end:
        raise _malformed("property length runs past the packet")
    outer_end = r.end
    r.end = end
    values: dict[str, object] = {}
    user: list[tuple[str, str]] = []
    subids: list[int] = []
    while r.pos < end:
        ident = r.varint()
        spec = PROPERTY_BY_ID.get(ident)
        if spec is None:
            raise _malformed(f"unknown property identifier 0x{ident:02X}")
        if context not in spec.allowed:
            # 2.2.2.2: an identifier not valid for the packet type is a Malformed Packet
            raise _malformed(f"property {spec.name} not allowed in {_context_name(context)}")
        ptype = spec.type
        value: object
        if ptype == PropertyType.BYTE:
            value = r.u8()
        elif ptype == PropertyType.FOUR_BYTE_INT:
            value = r.u32()
        elif ptype == PropertyType.TWO_BYTE_INT:
            value = r.u16()
        elif ptype == PropertyType.UTF8:
            value = r.utf8()
        elif ptype == PropertyType.BINARY:
            value = r.binary()
        elif ptype == PropertyType.VAR_BYTE_INT:
            value = r.varint()
        else:  # UTF8_PAIR
            user.append((r.utf8(), r.utf8()))  # may repeat, order kept (3.1.2.11.8)
            continue
        if ident == _SUBID:
            if value == 0:
                raise _protocol("subscription identifier 0")  # 3.8.2.1.2
            if subids and context != PacketType.PUBLISH:
                raise _protocol("subscription identifier given more than once")
            subids.append(value)  # type: ignore[arg-type]
            continue
        name = spec.name
        if name in values:
            raise _protocol(f"property {name} given more than once")  # 2.2.2.2 per property
        if spec.boolean:
            if value not in (0, 1):
                raise _protocol(f"property {name} must be 0 or 1, got {value!r}")
            value = bool(value)
        elif name in _NONZERO and value == 0:
            raise _protocol(f"property {name} must not be 0")
        values[name] = value
    r.end = outer_end
    fmt = values.get("payload_format_indicator")
    if fmt is not None and fmt not in (0, 1):
        raise _protocol(f"payload format indicator {fmt}")  # 3.3.2.3.2
    qos = values.get("maximum_qos")
    if qos is not None and qos not in (0, 1):
        raise _protocol(f"maximum QoS {qos}")  # 3.2.2.3.4
    if "authentication_data" in values and "authentication_method" not in values:
        raise _protocol("authentication data without authentication method")  # 3.1.2.11.10
    response_topic = values.get("response_topic")
    if isinstance(response_topic, str) and _has_wildcard(response_topic):
        raise _protocol("response topic contains a wildcard")  # MQTT-3.3.2-14
    return Properties(
        **values, user_properties=tuple(user), subscription_identifiers=tuple(subids)  # type: ignore[arg-type]
    )


def _context_name(context: int) -> str:
    return "Will Properties" if context == WILL_PROPERTIES else PacketType(context).name


def _encode_properties(props: Properties, context: int) -> bytes:
    """Property Length + properties; only the fields that are set (None / () are absent)."""
    if props is NO_PROPERTIES:
        return b"\x00"
    if not isinstance(props, Properties):
        raise TypeError(f"properties must be Properties, not {type(props).__name__}")
    parts: list[bytes] = []
    for spec in PROPERTY_SPECS:
        value = getattr(props, spec.name)
        if value is None or value == ():
            continue
        name = spec.name
        if context not in spec.allowed:
            raise ValueError(f"property {name} not allowed in {_context_name(context)}")
        ident = bytes((spec.id,))
        ptype = spec.type
        if ptype == PropertyType.UTF8_PAIR:
            for pair in value:
                if not (isinstance(pair, tuple) and len(pair) == 2):
                    raise TypeError("user properties must be (name, value) pairs")
                parts += (ident, _encode_utf8(pair[0], name), _encode_utf8(pair[1], name))
        elif ptype == PropertyType.VAR_BYTE_INT:  # subscription identifiers
            if context != PacketType.PUBLISH and len(value) > 1:
                raise ValueError("only PUBLISH may carry several subscription identifiers")
            for subid in value:
                parts += (ident, encode_varint(_check_int(subid, 1, MAX_REMAINING_LENGTH, name)))
        elif ptype == PropertyType.BYTE:
            hi = 1 if spec.boolean or name in ("payload_format_indicator", "maximum_qos") else 255
            parts += (ident, bytes((_check_int(value, 0, hi, name),)))
        elif ptype == PropertyType.TWO_BYTE_INT:
            lo = 1 if name in _NONZERO or name == "topic_alias" else 0
            parts += (ident, _check_int(value, lo, 0xFFFF, name).to_bytes(2, "big"))
        elif ptype == PropertyType.FOUR_BYTE_INT:
            lo = 1 if name in _NONZERO else 0
            parts += (ident, _check_int(value, lo, 0xFFFFFFFF, name).to_bytes(4, "big"))
        elif ptype == PropertyType.UTF8:
            if name == "response_topic" and _has_wildcard(value):
                raise ValueError("response topic must not contain wildcards")  # MQTT-3.3.2-14
            parts += (ident, _encode_utf8(value, name))
        else:  # BINARY
            parts += (ident, _encode_binary(value, name))
    if context != WILL_PROPERTIES and props.authentication_data is not None \
            and props.authentication_method is None:
        raise ValueError("authentication data requires an authentication method")
    body = b"".join(parts)
    return encode_varint(len(body)) + body


# --------------------------------------------------------------------------- decoding

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
                if ptype <= 2 and self._phase != "open" or ptype == 1 and self.role == "any":
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


# --------------------------------------------------------------------------- encoding


def _frame(b0: int, body: bytes) -> bytes:
    size = len(body)
    if size < 128:
        return bytes((b0, size)) + body
    return bytes((b0,)) + encode_varint(size) + body


def _check_version(version: int) -> None:
    if version not in VERSIONS:
        raise ValueError(f"version must be 4 (3.1.1) or 5 (5.0), not {version!r}")


def _check_packet_id(packet_id: object) -> int:
    return _check_int(packet_id, 1, 0xFFFF, "packet id")  # MQTT-2.2.1-3


def _check_topic_name(topic: object, allow_empty: bool) -> bytes:
    if not isinstance(topic, str):
        raise TypeError(f"topic must be str, not {type(topic).__name__}")
    if "+" in topic or "#" in topic:
        raise ValueError(f"topic name {topic!r} contains a wildcard")  # MQTT-3.3.2-2
    if not topic and not allow_empty:
        raise ValueError("empty topic name")  # MQTT-4.7.3-1
    return _encode_utf8(topic, "topic")


def encode_publish_with_offset(topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                               dup: bool = False, packet_id: int | None = None,
                               properties: Properties | None = None,
                               version: int = MQTT_3_1_1) -> tuple[bytes, int]:
    """Encode a PUBLISH and return (bytes, offset of its packet id); offset is -1 for QoS 0.

    For fan-out: encode once per (qos, retain) with any packet id (e.g. 1) and give each
    subscriber ``with_packet_id(data, offset, its_id)``.
    """
    if version != MQTT_3_1_1 and version != MQTT_5:
        _check_version(version)
    b0 = 0x30 | (qos << 1) | (1 if retain else 0) | (8 if dup else 0)
    if qos == 0:
        if packet_id is not None:
            raise ValueError("QoS 0 PUBLISH has no packet id")  # MQTT-2.2.1-2
        if dup:
            raise ValueError("QoS 0 PUBLISH must not set DUP")  # MQTT-3.3.1-2
        pid = b""
    elif qos == 1 or qos == 2:
        if type(packet_id) is not int or not 0 < packet_id < 0x10000:
            _check_packet_id(packet_id)
        pid = packet_id.to_bytes(2, "big")  # type: ignore[union-attr]
    else:
        raise ValueError(f"QoS must be 0, 1 or 2, not {qos!r}")
    if version == MQTT_5:
        if properties is None or properties is NO_PROPERTIES:
            props = b"\x00"
            alias = False
        else:
            props = _encode_properties(properties, PacketType.PUBLISH)
            alias = properties.topic_alias is not None
        tb = _check_topic_name(topic, alias)  # empty topic only with a topic alias (3.3.2.1)
    else:
        props = b""
        tb = _check_topic_name(topic, False)
    size = len(tb) + len(pid) + len(props) + len(payload)
    if size < 128:
        header = bytes((b0, size))
    else:
        header = bytes((b0,)) + encode_varint(size)
    offset = len(header) + len(tb) if qos else -1
    return b"".join((header, tb, pid, props, payload)), offset


def encode_publish(topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                   dup: bool = False, packet_id: int | None = None,
                   properties: Properties | None = None, version: int = MQTT_3_1_1) -> bytes:
    """Fast path for PUBLISH, the broker's hot packet; same checks as ``encode``."""
    return encode_publish_with_offset(topic, payload, qos, retain, dup, packet_id, properties,
                                      version)[0]


def with_packet_id(data: bytes, offset: int, packet_id: int, dup: bool = False) -> bytes:
    """Copy of an encoded QoS 1/2 PUBLISH with another packet id (and DUP set if ``dup``)."""
    if offset < 3:
        raise ValueError("no packet id in a QoS 0 PUBLISH")
    if type(packet_id) is not int or not 0 < packet_id < 0x10000:
        _check_packet_id(packet_id)
    head = bytes((data[0] | 0x08,)) + data[1:offset] if dup else data[:offset]
    return b"".join((head, packet_id.to_bytes(2, "big"), memoryview(data)[offset + 2:]))


def _encode_connect(p: Connect, version: int) -> bytes:
    if p.protocol_level != version:
        raise ValueError(f"CONNECT protocol_level {p.protocol_level} but encoding for {version}")
    v5 = version == MQTT_5
    flags = 0x02 if p.clean_start else 0
    parts = [b"\x00\x04MQTT", bytes((version,)), b"", _check_int(p.keepalive, 0, 0xFFFF,
                                                                   "keepalive").to_bytes(2, "big")]
    if v5:
        parts.append(_encode_properties(p.properties, PacketType.CONNECT))
    parts.append(_encode_utf8(p.client_id, "client id"))
    if p.will is not None:
        w = p.will
        _check_int(w.qos, 0, 2, "will QoS")
        flags |= 0x04 | (w.qos << 3) | (0x20 if w.retain else 0)
        if v5:
            parts.append(_encode_properties(w.properties, WILL_PROPERTIES))
        parts += (_check_topic_name(w.topic, False), _encode_binary(w.payload, "will payload"))
    if p.username is not None:
        flags |= 0x80
        parts.append(_encode_utf8(p.username, "username"))
    if p.password is not None:
        if not v5 and p.username is None:
            raise ValueError("MQTT 3.1.1 forbids a password without a user name")  # MQTT-3.1.2-22
        flags |= 0x40
        parts.append(_encode_binary(p.password, "password"))
    parts[2] = bytes((flags,))
    return _frame(0x10, b"".join(parts))


# 3.1.1 CONNACK return code for the 5.0 reason codes that have one (5.0 3.2.2.2 vs 3.1.1 3.2.2.3)
_V311_CONNACK = {
    ReasonCode.SUCCESS: 0,
    ReasonCode.UNSUPPORTED_PROTOCOL_VERSION: 1,
    ReasonCode.CLIENT_IDENTIFIER_NOT_VALID: 2,
    ReasonCode.SERVER_UNAVAILABLE: 3,
    ReasonCode.SERVER_BUSY: 3,
    ReasonCode.BAD_USER_NAME_OR_PASSWORD: 4,
    ReasonCode.NOT_AUTHORIZED: 5,
    ReasonCode.BANNED: 5,
    ReasonCode.BAD_AUTHENTICATION_METHOD: 5,
}


def _encode_connack(p: Connack, version: int) -> bytes:
    code = p.reason_code
    if version == MQTT_5:
        if code not in CONNACK_CODES:
            raise ValueError(f"reason code 0x{code:02X} not valid in a 5.0 CONNACK")
    elif isinstance(code, ReasonCode) or code >= 0x80:
        if code not in _V311_CONNACK:
            raise ValueError(f"reason code 0x{code:02X} has no 3.1.1 CONNACK return code")
        code = _V311_CONNACK[code]  # type: ignore[index]
    elif not 0 <= code <= 5:
        raise ValueError(f"3.1.1 CONNACK return code out of range: {code}")
    if code and p.session_present:
        raise ValueError("session_present must be False for a refusal")  # MQTT-3.2.2-6
    body = bytes((1 if p.session_present else 0, code))
    if version == MQTT_5:
        body += _encode_properties(p.properties, PacketType.CONNACK)
    return _frame(0x20, body)


def _encode_publish(p: Publish, version: int) -> bytes:
    return encode_publish_with_offset(p.topic, p.payload, p.qos, p.retain, p.dup, p.packet_id,
                                      p.properties, version)[0]


def _ack_encoder(b0: int, ptype: PacketType, allowed: frozenset[ReasonCode]
                 ) -> Callable[[Packet, int], bytes]:
    def encode(p: Packet, version: int) -> bytes:
        pid = _check_packet_id(p.packet_id).to_bytes(2, "big")  # type: ignore[union-attr]
        if version != MQTT_5:
            return bytes((b0, 2)) + pid  # 3.1.1 acks have no reason code or properties
        code = p.reason_code  # type: ignore[union-attr]
        if code not in allowed:
            raise ValueError(f"reason code 0x{code:02X} not valid in {ptype.name}")
        props = p.properties  # type: ignore[union-attr]
        if props is NO_PROPERTIES or props.is_empty():
            if code == 0:
                return bytes((b0, 2)) + pid  # 3.4.2.1: code and property length omitted
            return bytes((b0, 3)) + pid + bytes((code,))
        return _frame(b0, pid + bytes((code,)) + _encode_properties(props, ptype))

    return encode


def _encode_subscribe(p: Subscribe, version: int) -> bytes:
    parts = [_check_packet_id(p.packet_id).to_bytes(2, "big")]
    if version == MQTT_5:
        parts.append(_encode_properties(p.properties, PacketType.SUBSCRIBE))
    if not p.subscriptions:
        raise ValueError("SUBSCRIBE needs at least one topic filter")  # MQTT-3.8.3-2
    for topic_filter, opts in p.subscriptions:
        if not topic_filter:
            raise ValueError("empty topic filter")  # MQTT-4.7.3-1
        bits = _check_int(opts.qos, 0, 2, "subscription QoS")
        if version == MQTT_5:
            bits |= _check_int(opts.retain_handling, 0, 2, "retain handling") << 4
            if opts.no_local:
                if topic_filter.startswith("$share/"):
                    raise ValueError("no_local on a shared subscription")  # MQTT-3.8.3-4
                bits |= 0x04
            if opts.retain_as_published:
                bits |= 0x08
        parts += (_encode_utf8(topic_filter, "topic filter"), bytes((bits,)))
    return _frame(0x82, b"".join(parts))


def _encode_suback(p: Suback, version: int) -> bytes:
    if not p.reason_codes:
        raise ValueError("SUBACK needs at least one reason code")
    pid = _check_packet_id(p.packet_id).to_bytes(2, "big")
    if version == MQTT_5:
        for code in p.reason_codes:
            if code not in SUBACK_CODES:
                raise ValueError(f"reason code 0x{code:02X} not valid in SUBACK")
        return _frame(0x90, pid + _encode_properties(p.properties, PacketType.SUBACK)
                      + bytes(p.reason_codes))
    codes = []
    for code in p.reason_codes:
        if code >= 0x80:
            codes.append(0x80)  # 3.1.1 has a single failure code
        elif code in SUBACK_CODES_V311:
            codes.append(code)
        else:
            raise ValueError(f"reason code 0x{code:02X} not valid in a 3.1.1 SUBACK")
    return _frame(0x90, pid + bytes(codes))


def _encode_unsubscribe(p: Unsubscribe, version: int) -> bytes:
    if not p.topic_filters:
        raise ValueError("UNSUBSCRIBE needs at least one topic filter")  # MQTT-3.10.3-2
    parts = [_check_packet_id(p.packet_id).to_bytes(2, "big")]
    if version == MQTT_5:
        parts.append(_encode_properties(p.properties, PacketType.UNSUBSCRIBE))
    parts += (_encode_utf8(f, "topic filter") for f in p.topic_filters)
    return _frame(0xA2, b"".join(parts))


def _encode_unsuback(p: Unsuback, version: int) -> bytes:
    pid = _check_packet_id(p.packet_id).to_bytes(2, "big")
    if version != MQTT_5:
        return b"\xb0\x02" + pid  # 3.1.1 UNSUBACK has no payload
    if not p.reason_codes:
        raise ValueError("5.0 UNSUBACK needs one reason code per topic filter")
    for code in p.reason_codes:
        if code not in UNSUBACK_CODES:
            raise ValueError(f"reason code 0x{code:02X} not valid in UNSUBACK")
    return _frame(0xB0, pid + _encode_properties(p.properties, PacketType.UNSUBACK)
                  + bytes(p.reason_codes))


def _encode_disconnect(p: Disconnect, version: int) -> bytes:
    if version != MQTT_5:
        return b"\xe0\x00"
    code = p.reason_code
    if code not in DISCONNECT_CODES:
        raise ValueError(f"reason code 0x{code:02X} not valid in DISCONNECT")
    if p.properties is NO_PROPERTIES or p.properties.is_empty():
        return b"\xe0\x00" if code == 0 else bytes((0xE0, 1, code))  # 3.14.2.1
    return _frame(0xE0, bytes((code,)) + _encode_properties(p.properties, PacketType.DISCONNECT))


def _encode_auth(p: Auth, version: int) -> bytes:
    if version != MQTT_5:
        raise ValueError("AUTH does not exist in MQTT 3.1.1")
    code = p.reason_code
    if code not in AUTH_CODES:
        raise ValueError(f"reason code 0x{code:02X} not valid in AUTH")
    if code == 0 and (p.properties is NO_PROPERTIES or p.properties.is_empty()):
        return b"\xf0\x00"  # 3.15.2.1
    return _frame(0xF0, bytes((code,)) + _encode_properties(p.properties, PacketType.AUTH))


_ENCODERS: dict[type, Callable[[Packet, int], bytes]] = {
    Connect: _encode_connect,  # type: ignore[dict-item]
    Connack: _encode_connack,  # type: ignore[dict-item]
    Publish: _encode_publish,  # type: ignore[dict-item]
    Puback: _ack_encoder(0x40, PacketType.PUBACK, PUBACK_CODES),
    Pubrec: _ack_encoder(0x50, PacketType.PUBREC, PUBACK_CODES),
    Pubrel: _ack_encoder(0x62, PacketType.PUBREL, PUBREL_CODES),
    Pubcomp: _ack_encoder(0x70, PacketType.PUBCOMP, PUBREL_CODES),
    Subscribe: _encode_subscribe,  # type: ignore[dict-item]
    Suback: _encode_suback,  # type: ignore[dict-item]
    Unsubscribe: _encode_unsubscribe,  # type: ignore[dict-item]
    Unsuback: _encode_unsuback,  # type: ignore[dict-item]
    Pingreq: lambda p, v: b"\xc0\x00",
    Pingresp: lambda p, v: b"\xd0\x00",
    Disconnect: _encode_disconnect,  # type: ignore[dict-item]
    Auth: _encode_auth,  # type: ignore[dict-item]
}


def encode(packet: Packet, version: int) -> bytes:
    """Encode any packet for protocol level ``version`` (4 = 3.1.1, 5 = 5.0).

    For 3.1.1 the 5.0-only parts are dropped as the 3.1.1 wire format has no room for them
    (properties, ack reason codes, UNSUBACK payload, DISCONNECT reason); AUTH raises ValueError.
    """
    _check_version(version)
    try:
        encoder = _ENCODERS[type(packet)]
    except KeyError:
        raise TypeError(f"not an MQTT packet: {type(packet).__name__}") from None
    return encoder(packet, version)
