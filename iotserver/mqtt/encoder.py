"""MQTT packet encoding: ``encode`` for any packet and protocol level, the PUBLISH fast path
(``encode_publish``, ``encode_publish_with_offset``) and ``with_packet_id`` for fan-out, plus
the per-packet ``_encode_*`` functions. Misuse raises ``ValueError`` / ``TypeError``. Built on
the primitives of ``iotserver.mqtt.wire``; re-exported by ``iotserver.mqtt.codec``.
"""

from __future__ import annotations

from collections.abc import Callable

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
    Connect,
    Disconnect,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
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
from iotserver.mqtt.wire import (
    _check_int,
    _encode_binary,
    _encode_properties,
    _encode_utf8,
    encode_varint,
)


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
    header = bytes((b0, size)) if size < 128 else bytes((b0,)) + encode_varint(size)
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
