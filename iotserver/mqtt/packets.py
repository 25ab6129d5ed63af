"""MQTT control packets (3.1.1 and 5.0) as frozen dataclasses, plus reason codes and properties.

Pure data: no encoding here (see ``codec.py``). Fields cover both protocol versions; the 5.0-only
ones (properties, most reason codes, subscription options beyond QoS) default to empty values and
are dropped by the encoder for 3.1.1, as the 3.1.1 wire format has no room for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple, TypeAlias

MQTT_3_1_1 = 4  #: protocol level of MQTT 3.1.1 (3.1.1 section 3.1.2.2)
MQTT_5 = 5  #: protocol level of MQTT 5.0 (5.0 section 3.1.2.2)
VERSIONS = (MQTT_3_1_1, MQTT_5)


class PacketType(IntEnum):
    """Control packet types, fixed header bits 7-4 (MQTT 5.0 section 2.1.2)."""

    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15  # 5.0 only; reserved in 3.1.1


class ReasonCode(IntEnum):
    """MQTT 5.0 reason codes (section 2.4). Several share a value (0x00 means Success, Normal
    disconnection and Granted QoS 0 depending on the packet); the aliases are listed after."""

    SUCCESS = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL_MESSAGE = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    CONTINUE_AUTHENTICATION = 0x18
    RE_AUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2
    # aliases (same value, other packet)
    NORMAL_DISCONNECTION = 0x00
    GRANTED_QOS_0 = 0x00


class ConnackReturnCode(IntEnum):
    """MQTT 3.1.1 CONNACK return codes (3.1.1 table 3.1). Values 6-255 are reserved."""

    ACCEPTED = 0x00
    UNACCEPTABLE_PROTOCOL_VERSION = 0x01
    IDENTIFIER_REJECTED = 0x02
    SERVER_UNAVAILABLE = 0x03
    BAD_USER_NAME_OR_PASSWORD = 0x04
    NOT_AUTHORIZED = 0x05


RC = ReasonCode
#: Reason codes each 5.0 packet may carry (the "Packets" column of section 2.4, and 3.x.2.1).
CONNACK_CODES = frozenset({
    RC.SUCCESS, RC.UNSPECIFIED_ERROR, RC.MALFORMED_PACKET, RC.PROTOCOL_ERROR,
    RC.IMPLEMENTATION_SPECIFIC_ERROR, RC.UNSUPPORTED_PROTOCOL_VERSION,
    RC.CLIENT_IDENTIFIER_NOT_VALID, RC.BAD_USER_NAME_OR_PASSWORD, RC.NOT_AUTHORIZED,
    RC.SERVER_UNAVAILABLE, RC.SERVER_BUSY, RC.BANNED, RC.BAD_AUTHENTICATION_METHOD,
    RC.TOPIC_NAME_INVALID, RC.PACKET_TOO_LARGE, RC.QUOTA_EXCEEDED, RC.PAYLOAD_FORMAT_INVALID,
    RC.RETAIN_NOT_SUPPORTED, RC.QOS_NOT_SUPPORTED, RC.USE_ANOTHER_SERVER, RC.SERVER_MOVED,
    RC.CONNECTION_RATE_EXCEEDED,
})
PUBACK_CODES = frozenset({  # PUBACK and PUBREC (3.4.2.1, 3.5.2.1)
    RC.SUCCESS, RC.NO_MATCHING_SUBSCRIBERS, RC.UNSPECIFIED_ERROR,
    RC.IMPLEMENTATION_SPECIFIC_ERROR, RC.NOT_AUTHORIZED, RC.TOPIC_NAME_INVALID,
    RC.PACKET_IDENTIFIER_IN_USE, RC.QUOTA_EXCEEDED, RC.PAYLOAD_FORMAT_INVALID,
})
PUBREL_CODES = frozenset({RC.SUCCESS, RC.PACKET_IDENTIFIER_NOT_FOUND})  # PUBREL and PUBCOMP
SUBACK_CODES = frozenset({
    RC.GRANTED_QOS_0, RC.GRANTED_QOS_1, RC.GRANTED_QOS_2, RC.UNSPECIFIED_ERROR,
    RC.IMPLEMENTATION_SPECIFIC_ERROR, RC.NOT_AUTHORIZED, RC.TOPIC_FILTER_INVALID,
    RC.PACKET_IDENTIFIER_IN_USE, RC.QUOTA_EXCEEDED, RC.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED,
    RC.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED, RC.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED,
})
UNSUBACK_CODES = frozenset({
    RC.SUCCESS, RC.NO_SUBSCRIPTION_EXISTED, RC.UNSPECIFIED_ERROR,
    RC.IMPLEMENTATION_SPECIFIC_ERROR, RC.NOT_AUTHORIZED, RC.TOPIC_FILTER_INVALID,
    RC.PACKET_IDENTIFIER_IN_USE,
})
DISCONNECT_CODES = frozenset({
    RC.NORMAL_DISCONNECTION, RC.DISCONNECT_WITH_WILL_MESSAGE, RC.UNSPECIFIED_ERROR,
    RC.MALFORMED_PACKET, RC.PROTOCOL_ERROR, RC.IMPLEMENTATION_SPECIFIC_ERROR, RC.NOT_AUTHORIZED,
    RC.SERVER_BUSY, RC.SERVER_SHUTTING_DOWN, RC.KEEP_ALIVE_TIMEOUT, RC.SESSION_TAKEN_OVER,
    RC.TOPIC_FILTER_INVALID, RC.TOPIC_NAME_INVALID, RC.RECEIVE_MAXIMUM_EXCEEDED,
    RC.TOPIC_ALIAS_INVALID, RC.PACKET_TOO_LARGE, RC.MESSAGE_RATE_TOO_HIGH, RC.QUOTA_EXCEEDED,
    RC.ADMINISTRATIVE_ACTION, RC.PAYLOAD_FORMAT_INVALID, RC.RETAIN_NOT_SUPPORTED,
    RC.QOS_NOT_SUPPORTED, RC.USE_ANOTHER_SERVER, RC.SERVER_MOVED,
    RC.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED, RC.CONNECTION_RATE_EXCEEDED, RC.MAXIMUM_CONNECT_TIME,
    RC.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED, RC.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED,
})
AUTH_CODES = frozenset({RC.SUCCESS, RC.CONTINUE_AUTHENTICATION, RC.RE_AUTHENTICATE})
#: 3.1.1 SUBACK return codes (3.1.1 section 3.9.3).
SUBACK_CODES_V311 = frozenset({0x00, 0x01, 0x02, 0x80})


class PropertyType(IntEnum):
    """Property data types (MQTT 5.0 section 1.5 and 2.2.2.2)."""

    BYTE = 1
    TWO_BYTE_INT = 2
    FOUR_BYTE_INT = 3
    VAR_BYTE_INT = 4
    UTF8 = 5
    BINARY = 6
    UTF8_PAIR = 7


class PropertyId(IntEnum):
    """Property identifiers (MQTT 5.0 table 2-4)."""

    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


#: Pseudo packet type naming the Will Properties of a CONNECT (they have their own allowed set).
WILL_PROPERTIES = 16


class PropertySpec(NamedTuple):
    """One row of MQTT 5.0 table 2-4: identifier, Properties field, wire type, where allowed."""

    id: PropertyId
    name: str
    type: PropertyType
    allowed: frozenset[int]  # PacketType values, or WILL_PROPERTIES
    boolean: bool = False  # a Byte restricted to 0/1, exposed as bool


_T = PacketType
_ACKS = (_T.PUBACK, _T.PUBREC, _T.PUBREL, _T.PUBCOMP)


def _spec(pid: PropertyId, ptype: PropertyType, *allowed: int,
          boolean: bool = False) -> PropertySpec:
    return PropertySpec(pid, pid.name.lower(), ptype, frozenset(allowed), boolean)


_P = PropertyId
_Y = PropertyType
#: In identifier order; the encoder writes properties in this order.
PROPERTY_SPECS: tuple[PropertySpec, ...] = (
    _spec(_P.PAYLOAD_FORMAT_INDICATOR, _Y.BYTE, _T.PUBLISH, WILL_PROPERTIES),
    _spec(_P.MESSAGE_EXPIRY_INTERVAL, _Y.FOUR_BYTE_INT, _T.PUBLISH, WILL_PROPERTIES),
    _spec(_P.CONTENT_TYPE, _Y.UTF8, _T.PUBLISH, WILL_PROPERTIES),
    _spec(_P.RESPONSE_TOPIC, _Y.UTF8, _T.PUBLISH, WILL_PROPERTIES),
    _spec(_P.CORRELATION_DATA, _Y.BINARY, _T.PUBLISH, WILL_PROPERTIES),
    PropertySpec(_P.SUBSCRIPTION_IDENTIFIER, "subscription_identifiers", _Y.VAR_BYTE_INT,
                 frozenset({_T.PUBLISH, _T.SUBSCRIBE})),
    _spec(_P.SESSION_EXPIRY_INTERVAL, _Y.FOUR_BYTE_INT, _T.CONNECT, _T.CONNACK, _T.DISCONNECT),
    _spec(_P.ASSIGNED_CLIENT_IDENTIFIER, _Y.UTF8, _T.CONNACK),
    _spec(_P.SERVER_KEEP_ALIVE, _Y.TWO_BYTE_INT, _T.CONNACK),
    _spec(_P.AUTHENTICATION_METHOD, _Y.UTF8, _T.CONNECT, _T.CONNACK, _T.AUTH),
    _spec(_P.AUTHENTICATION_DATA, _Y.BINARY, _T.CONNECT, _T.CONNACK, _T.AUTH),
    _spec(_P.REQUEST_PROBLEM_INFORMATION, _Y.BYTE, _T.CONNECT, boolean=True),
    _spec(_P.WILL_DELAY_INTERVAL, _Y.FOUR_BYTE_INT, WILL_PROPERTIES),
    _spec(_P.REQUEST_RESPONSE_INFORMATION, _Y.BYTE, _T.CONNECT, boolean=True),
    _spec(_P.RESPONSE_INFORMATION, _Y.UTF8, _T.CONNACK),
    _spec(_P.SERVER_REFERENCE, _Y.UTF8, _T.CONNACK, _T.DISCONNECT),
    _spec(_P.REASON_STRING, _Y.UTF8, _T.CONNACK, *_ACKS, _T.SUBACK, _T.UNSUBACK, _T.DISCONNECT,
          _T.AUTH),
    _spec(_P.RECEIVE_MAXIMUM, _Y.TWO_BYTE_INT, _T.CONNECT, _T.CONNACK),
    _spec(_P.TOPIC_ALIAS_MAXIMUM, _Y.TWO_BYTE_INT, _T.CONNECT, _T.CONNACK),
    _spec(_P.TOPIC_ALIAS, _Y.TWO_BYTE_INT, _T.PUBLISH),
    _spec(_P.MAXIMUM_QOS, _Y.BYTE, _T.CONNACK),
    _spec(_P.RETAIN_AVAILABLE, _Y.BYTE, _T.CONNACK, boolean=True),
    PropertySpec(_P.USER_PROPERTY, "user_properties", _Y.UTF8_PAIR,
                 frozenset({*_T, WILL_PROPERTIES}) - {_T.PINGREQ, _T.PINGRESP}),
    _spec(_P.MAXIMUM_PACKET_SIZE, _Y.FOUR_BYTE_INT, _T.CONNECT, _T.CONNACK),
    _spec(_P.WILDCARD_SUBSCRIPTION_AVAILABLE, _Y.BYTE, _T.CONNACK, boolean=True),
    _spec(_P.SUBSCRIPTION_IDENTIFIER_AVAILABLE, _Y.BYTE, _T.CONNACK, boolean=True),
    _spec(_P.SHARED_SUBSCRIPTION_AVAILABLE, _Y.BYTE, _T.CONNACK, boolean=True),
)
PROPERTY_BY_ID: dict[int, PropertySpec] = {s.id: s for s in PROPERTY_SPECS}


@dataclass(frozen=True, slots=True, repr=False)
class Properties:
    """MQTT 5.0 properties (section 2.2.2). ``None`` / empty tuple means "not present".

    User properties may repeat and keep their order; subscription identifiers may repeat in a
    PUBLISH (one per matching subscription, 3.3.2.3.8). Which properties a packet may carry is
    checked by the codec, not here.
    """

    payload_format_indicator: int | None = None
    message_expiry_interval: int | None = None
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    subscription_identifiers: tuple[int, ...] = ()
    session_expiry_interval: int | None = None
    assigned_client_identifier: str | None = None
    server_keep_alive: int | None = None
    authentication_method: str | None = None
    authentication_data: bytes | None = None
    request_problem_information: bool | None = None
    will_delay_interval: int | None = None
    request_response_information: bool | None = None
    response_information: str | None = None
    server_reference: str | None = None
    reason_string: str | None = None
    receive_maximum: int | None = None
    topic_alias_maximum: int | None = None
    topic_alias: int | None = None
    maximum_qos: int | None = None
    retain_available: bool | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    maximum_packet_size: int | None = None
    wildcard_subscription_available: bool | None = None
    subscription_identifier_available: bool | None = None
    shared_subscription_available: bool | None = None

    def __repr__(self) -> str:
        """Only the properties that are set, so packet reprs stay readable."""
        set_fields = []
        for name in self.__slots__:
            value = getattr(self, name)
            if value is not None and value != ():
                set_fields.append(f"{name}={value!r}")
        return f"Properties({', '.join(set_fields)})"

    def is_empty(self) -> bool:
        """True when no property is set (encodes as a single zero length byte)."""
        return self is NO_PROPERTIES or self == NO_PROPERTIES


NO_PROPERTIES = Properties()


class RetainHandling(IntEnum):
    """Subscription option bits 4-5 (MQTT 5.0 section 3.8.3.1)."""

    SEND_ON_SUBSCRIBE = 0
    SEND_IF_NEW_SUBSCRIPTION = 1
    DO_NOT_SEND = 2


@dataclass(frozen=True, slots=True)
class SubscriptionOptions:
    """Options of one SUBSCRIBE entry; only ``qos`` exists in 3.1.1."""

    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = RetainHandling.SEND_ON_SUBSCRIBE


@dataclass(frozen=True, slots=True)
class Will:
    """The Will Message of a CONNECT (section 3.1.2.5 - 3.1.3.4)."""

    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class Connect:
    """CONNECT. ``protocol_level`` 4 is 3.1.1, 5 is 5.0; ``clean_start`` is 3.1.1's Clean
    Session."""

    client_id: str = ""
    protocol_level: int = MQTT_3_1_1
    clean_start: bool = True
    keepalive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class Connack:
    """CONNACK. ``reason_code`` is a ReasonCode in 5.0 and a ConnackReturnCode in 3.1.1 (the
    encoder maps the usual 5.0 refusal codes to their 3.1.1 return code)."""

    session_present: bool = False
    reason_code: int = ReasonCode.SUCCESS
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class Publish:
    """PUBLISH. ``packet_id`` is None for QoS 0 and 1..65535 otherwise (MQTT-2.2.1-2/3)."""

    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class _Ack:
    packet_id: int
    reason_code: int = ReasonCode.SUCCESS
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class Puback(_Ack):
    """PUBACK (QoS 1 acknowledgement)."""


@dataclass(frozen=True, slots=True)
class Pubrec(_Ack):
    """PUBREC (QoS 2, part 1)."""


@dataclass(frozen=True, slots=True)
class Pubrel(_Ack):
    """PUBREL (QoS 2, part 2)."""


@dataclass(frozen=True, slots=True)
class Pubcomp(_Ack):
    """PUBCOMP (QoS 2, part 3)."""


@dataclass(frozen=True, slots=True)
class Subscribe:
    """SUBSCRIBE: (topic filter, options) pairs, at least one (MQTT-3.8.3-3 / 5.0 MQTT-3.8.3-2)."""

    packet_id: int
    subscriptions: tuple[tuple[str, SubscriptionOptions], ...]
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class Suback:
    """SUBACK: one reason code per filter of the SUBSCRIBE, in order."""

    packet_id: int
    reason_codes: tuple[int, ...]
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """UNSUBSCRIBE: at least one topic filter (MQTT-3.10.3-2)."""

    packet_id: int
    topic_filters: tuple[str, ...]
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class Unsuback:
    """UNSUBACK; ``reason_codes`` is 5.0 only (3.1.1 UNSUBACK has no payload)."""

    packet_id: int
    reason_codes: tuple[int, ...] = ()
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class Pingreq:
    """PINGREQ."""


@dataclass(frozen=True, slots=True)
class Pingresp:
    """PINGRESP."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """DISCONNECT; reason code and properties are 5.0 only."""

    reason_code: int = ReasonCode.NORMAL_DISCONNECTION
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class Auth:
    """AUTH (5.0 only, enhanced authentication, section 3.15)."""

    reason_code: int = ReasonCode.SUCCESS
    properties: Properties = NO_PROPERTIES


Packet: TypeAlias = (
    Connect | Connack | Publish | Puback | Pubrec | Pubrel | Pubcomp | Subscribe | Suback
    | Unsubscribe | Unsuback | Pingreq | Pingresp | Disconnect | Auth
)

PACKET_TYPES: dict[type, PacketType] = {
    Connect: PacketType.CONNECT, Connack: PacketType.CONNACK, Publish: PacketType.PUBLISH,
    Puback: PacketType.PUBACK, Pubrec: PacketType.PUBREC, Pubrel: PacketType.PUBREL,
    Pubcomp: PacketType.PUBCOMP, Subscribe: PacketType.SUBSCRIBE, Suback: PacketType.SUBACK,
    Unsubscribe: PacketType.UNSUBSCRIBE, Unsuback: PacketType.UNSUBACK,
    Pingreq: PacketType.PINGREQ, Pingresp: PacketType.PINGRESP,
    Disconnect: PacketType.DISCONNECT, Auth: PacketType.AUTH,
}
