"""Sans-I/O MQTT 3.1.1 / 5.0 codec: bytes in, packets out (``Decoder``), packets in, bytes out
(``encode``, ``encode_publish``).

No sockets, no Twisted, no timers. A peer that breaks the protocol raises ``MqttProtocolError``
carrying the 5.0 reason code to send in a DISCONNECT (or CONNACK); misuse of the encoding API
raises ``ValueError`` / ``TypeError``. Spec clauses: ``MQTT-x.y.z-n`` numbers are from MQTT 5.0
unless marked 3.1.1.

This module is the public facade; the code lives in ``wire.py`` (errors, Variable Byte
Integers, strings, properties), ``decoder.py`` (``Decoder``, ``decode_packet``) and
``encoder.py`` (``encode``, the PUBLISH fast path, ``with_packet_id``).
"""

from __future__ import annotations

from iotserver.mqtt.decoder import Decoder, Role, decode_packet
from iotserver.mqtt.encoder import (
    encode,
    encode_publish,
    encode_publish_with_offset,
    with_packet_id,
)
from iotserver.mqtt.wire import (
    MAX_PACKET_SIZE,
    MAX_REMAINING_LENGTH,
    MqttProtocolError,
    UnsupportedProtocolVersion,
    encode_varint,
)

__all__ = [
    "MAX_PACKET_SIZE",
    "MAX_REMAINING_LENGTH",
    "Decoder",
    "MqttProtocolError",
    "Role",
    "UnsupportedProtocolVersion",
    "decode_packet",
    "encode",
    "encode_publish",
    "encode_publish_with_offset",
    "encode_varint",
    "with_packet_id",
]
