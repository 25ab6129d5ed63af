"""MQTT wire primitives shared by the decoder and the encoder: the protocol errors
(``MqttProtocolError``, ``UnsupportedProtocolVersion``), Variable Byte Integers, the
bounds-checked ``_Reader``, UTF-8 string / binary data helpers and the 5.0 property block
(read and encode, with the per-property rules of MQTT 2.2.2). Public names are re-exported by
``iotserver.mqtt.codec``; spec clauses as there (MQTT 5.0 unless marked 3.1.1).
"""

from __future__ import annotations

from iotserver.mqtt.packets import (
    NO_PROPERTIES,
    PROPERTY_BY_ID,
    PROPERTY_SPECS,
    WILL_PROPERTIES,
    Packet,
    PacketType,
    Properties,
    PropertyId,
    PropertyType,
    ReasonCode,
)

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
