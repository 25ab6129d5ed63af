"""MQTT codec: byte-level cases written out from the spec, malformed-input classes with their
reason codes, split feeds, the PUBLISH fast path, paho-mqtt interop and Hypothesis properties.

Expected bytes are written by hand from the MQTT 3.1.1 / 5.0 wire formats, never produced by our
own encoder.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotserver.mqtt.codec import (
    Decoder,
    MqttProtocolError,
    UnsupportedProtocolVersion,
    decode_packet,
    encode,
    encode_publish,
    encode_publish_with_offset,
    encode_varint,
    with_packet_id,
)
from iotserver.mqtt.packets import (
    AUTH_CODES,
    CONNACK_CODES,
    DISCONNECT_CODES,
    NO_PROPERTIES,
    PROPERTY_SPECS,
    PUBACK_CODES,
    PUBREL_CODES,
    SUBACK_CODES,
    UNSUBACK_CODES,
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

RC = ReasonCode
SO = SubscriptionOptions
MALFORMED = RC.MALFORMED_PACKET
PROTOCOL = RC.PROTOCOL_ERROR

CONNECT_V4 = b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x3c\x00\x03abc"
CONNECT_V5 = b"\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x03abc"

# (version, packet, bytes): encode(packet) == bytes and decode(bytes) == packet
CASES: list[tuple[int, Packet, bytes]] = [
    # ---- MQTT 3.1.1
    (4, Connect("abc"), CONNECT_V4),
    # flags 0xEC: user name, password, will retain, will QoS 1, will flag; clean session off
    (4, Connect("c1", 4, clean_start=False, keepalive=10, username="u", password=b"p",
                will=Will("w", b"bye", 1, True)),
     b"\x10\x1c\x00\x04MQTT\x04\xec\x00\x0a\x00\x02c1\x00\x01w\x00\x03bye\x00\x01u\x00\x01p"),
    (4, Connack(True, ConnackReturnCode.ACCEPTED), b"\x20\x02\x01\x00"),
    (4, Connack(False, ConnackReturnCode.NOT_AUTHORIZED), b"\x20\x02\x00\x05"),
    (4, Publish("a/b", b"hi"), b"\x30\x07\x00\x03a/bhi"),
    (4, Publish("a/b", b"hi", 1, retain=True, dup=True, packet_id=10),
     b"\x3b\x09\x00\x03a/b\x00\x0ahi"),
    (4, Publish("a/b", b"", 2, packet_id=0x1234), b"\x34\x07\x00\x03a/b\x12\x34"),
    (4, Puback(10), b"\x40\x02\x00\x0a"),
    (4, Pubrec(10), b"\x50\x02\x00\x0a"),
    (4, Pubrel(10), b"\x62\x02\x00\x0a"),
    (4, Pubcomp(10), b"\x70\x02\x00\x0a"),
    (4, Subscribe(1, (("a/b", SO(1)), ("#", SO(2)))),
     b"\x82\x0c\x00\x01\x00\x03a/b\x01\x00\x01#\x02"),
    (4, Suback(1, (1, 0x80)), b"\x90\x04\x00\x01\x01\x80"),
    (4, Unsubscribe(2, ("a/b",)), b"\xa2\x07\x00\x02\x00\x03a/b"),
    (4, Unsuback(2), b"\xb0\x02\x00\x02"),
    (4, Pingreq(), b"\xc0\x00"),
    (4, Pingresp(), b"\xd0\x00"),
    (4, Disconnect(), b"\xe0\x00"),
    # ---- MQTT 5.0
    (5, Connect("abc", 5), CONNECT_V5),
    # flags 0xD6: user name, password, will QoS 2, will flag, clean start
    # properties: session expiry 10, receive maximum 10, user property k=v; will delay 5
    (5, Connect("c1", 5, keepalive=30, username="u", password=b"p",
                will=Will("w", b"bye", 2, False, Properties(will_delay_interval=5)),
                properties=Properties(session_expiry_interval=10, receive_maximum=10,
                                      user_properties=(("k", "v"),))),
     (b"\x10\x32\x00\x04MQTT\x05\xd6\x00\x1e"
      b"\x0f\x11\x00\x00\x00\x0a\x21\x00\x0a\x26\x00\x01k\x00\x01v"
      b"\x00\x02c1"
      b"\x05\x18\x00\x00\x00\x05\x00\x01w\x00\x03bye"
      b"\x00\x01u\x00\x01p")),
    (5, Connect("", 5, password=b"secret"),  # 5.0 allows a password without a user name
     b"\x10\x15\x00\x04MQTT\x05\x42\x00\x3c\x00\x00\x00\x00\x06secret"),
    (5, Connack(), b"\x20\x03\x00\x00\x00"),
    (5, Connack(True, RC.SUCCESS, Properties(assigned_client_identifier="xyz", maximum_qos=1,
                                             retain_available=False)),
     b"\x20\x0d\x01\x00\x0a\x12\x00\x03xyz\x24\x01\x25\x00"),
    (5, Connack(False, RC.BAD_USER_NAME_OR_PASSWORD), b"\x20\x03\x00\x86\x00"),
    (5, Publish("a/b", b"hi"), b"\x30\x08\x00\x03a/b\x00hi"),
    (5, Publish("a/b", b"hi", 1, packet_id=10,
                properties=Properties(content_type="text", topic_alias=5,
                                      user_properties=(("a", "1"),))),
     (b"\x32\x1b\x00\x03a/b\x00\x0a"
      b"\x11\x03\x00\x04text\x23\x00\x05\x26\x00\x01a\x00\x011"
      b"hi")),
    (5, Publish("", b"hi", properties=Properties(topic_alias=5)),  # 3.3.2.3.4 alias only
     b"\x30\x08\x00\x00\x03\x23\x00\x05hi"),
    (5, Puback(10), b"\x40\x02\x00\x0a"),
    (5, Puback(10, RC.NO_MATCHING_SUBSCRIBERS), b"\x40\x03\x00\x0a\x10"),
    (5, Puback(10, RC.NO_MATCHING_SUBSCRIBERS, Properties(reason_string="no")),
     b"\x40\x09\x00\x0a\x10\x05\x1f\x00\x02no"),
    (5, Pubrec(10, RC.UNSPECIFIED_ERROR), b"\x50\x03\x00\x0a\x80"),
    (5, Pubrel(10, RC.PACKET_IDENTIFIER_NOT_FOUND), b"\x62\x03\x00\x0a\x92"),
    (5, Pubcomp(10), b"\x70\x02\x00\x0a"),
    # options 0x2D: QoS 1, no local, retain as published, retain handling 2
    (5, Subscribe(1, (("a/b", SO(1, True, True, RetainHandling.DO_NOT_SEND)),),
                  Properties(subscription_identifiers=(7,))),
     b"\x82\x0b\x00\x01\x02\x0b\x07\x00\x03a/b\x2d"),
    (5, Suback(1, (RC.GRANTED_QOS_0, RC.GRANTED_QOS_1, RC.TOPIC_FILTER_INVALID)),
     b"\x90\x06\x00\x01\x00\x00\x01\x8f"),
    (5, Unsubscribe(2, ("a/b", "c")), b"\xa2\x0b\x00\x02\x00\x00\x03a/b\x00\x01c"),
    (5, Unsuback(2, (RC.SUCCESS, RC.NO_SUBSCRIPTION_EXISTED)), b"\xb0\x05\x00\x02\x00\x00\x11"),
    (5, Pingreq(), b"\xc0\x00"),
    (5, Pingresp(), b"\xd0\x00"),
    (5, Disconnect(), b"\xe0\x00"),
    (5, Disconnect(RC.DISCONNECT_WITH_WILL_MESSAGE), b"\xe0\x01\x04"),
    (5, Disconnect(RC.NORMAL_DISCONNECTION, Properties(session_expiry_interval=0)),
     b"\xe0\x07\x00\x05\x11\x00\x00\x00\x00"),
    (5, Auth(), b"\xf0\x00"),
    (5, Auth(RC.CONTINUE_AUTHENTICATION,
             Properties(authentication_method="SCRAM", authentication_data=b"\x01\x02")),
     b"\xf0\x0f\x18\x0d\x15\x00\x05SCRAM\x16\x00\x02\x01\x02"),
]


def _id(case: tuple[int, Packet, bytes]) -> str:
    return f"v{case[0]}-{type(case[1]).__name__}-{case[2][:12].hex()}"


def _error(data: bytes, version: int | None = None, **kwargs: Any) -> MqttProtocolError:
    """Feed ``data`` to a server-role decoder (after a CONNECT of ``version``) and return the
    protocol error it must raise."""
    decoder = Decoder(**kwargs)
    if version is not None:
        decoder.feed(CONNECT_V4 if version == 4 else CONNECT_V5)
    with pytest.raises(MqttProtocolError) as info:
        decoder.feed(data)
    return info.value


# --------------------------------------------------------------------------- byte-level cases


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_encode_matches_spec_bytes(case: tuple[int, Packet, bytes]) -> None:
    version, packet, data = case
    assert encode(packet, version) == data


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_decode_spec_bytes(case: tuple[int, Packet, bytes]) -> None:
    version, packet, data = case
    assert decode_packet(data, version) == packet


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_decode_byte_by_byte(case: tuple[int, Packet, bytes]) -> None:
    version, packet, data = case
    decoder = Decoder(role="any", version=version)
    out: list[Packet] = []
    for i in range(len(data)):
        out += decoder.feed(data[i:i + 1])
    assert out == [packet]
    assert decoder.buffered == 0


@pytest.mark.parametrize("version", [4, 5])
def test_all_packets_in_one_feed_and_in_odd_chunks(version: int) -> None:
    cases = [(p, d) for v, p, d in CASES if v == version and not isinstance(p, Connect)]
    stream = b"".join(d for _, d in cases)
    expected = [p for p, _ in cases]
    assert Decoder(role="any", version=version).feed(stream) == expected
    for chunk in (1, 2, 3, 7, 64):
        decoder = Decoder(role="any", version=version)
        out: list[Packet] = []
        for i in range(0, len(stream), chunk):
            out += decoder.feed(stream[i:i + chunk])
        assert out == expected


def test_server_session_stream_sets_version() -> None:
    decoder = Decoder()
    assert decoder.version is None
    packets = decoder.feed(CONNECT_V5 + b"\x30\x08\x00\x03a/b\x00hi" + b"\xc0\x00")
    assert decoder.version == 5
    assert packets == [Connect("abc", 5), Publish("a/b", b"hi"), Pingreq()]


def test_client_role_decodes_server_output() -> None:
    decoder = Decoder(role="client", version=4)
    assert decoder.feed(b"\x20\x02\x00\x00\x90\x03\x00\x01\x00\x30\x07\x00\x03a/bhi") == [
        Connack(), Suback(1, (0,)), Publish("a/b", b"hi")]


@pytest.mark.parametrize("value,data", [
    # MQTT 5.0 section 1.5.5 table: the boundary values of each length
    (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16_383, b"\xff\x7f"),
    (16_384, b"\x80\x80\x01"), (2_097_151, b"\xff\xff\x7f"), (2_097_152, b"\x80\x80\x80\x01"),
    (268_435_455, b"\xff\xff\xff\x7f"),
])
def test_variable_byte_integer(value: int, data: bytes) -> None:
    assert encode_varint(value) == data


@pytest.mark.parametrize("value", [-1, 268_435_456])
def test_variable_byte_integer_range(value: int) -> None:
    with pytest.raises(ValueError):
        encode_varint(value)


@pytest.mark.parametrize("size,header", [(128, b"\x30\x80\x01"), (16_384, b"\x30\x80\x80\x01")])
def test_multi_byte_remaining_length(size: int, header: bytes) -> None:
    data = header + b"\x00\x01a" + b"x" * (size - 3)
    assert decode_packet(data, 4) == Publish("a", b"x" * (size - 3))
    assert encode(Publish("a", b"x" * (size - 3)), 4) == data


def test_omitted_fields_decode_as_defaults() -> None:
    # 5.0 allows a Property Length of 0 to be sent even where it could be omitted
    assert decode_packet(b"\x40\x04\x00\x0a\x00\x00", 5) == Puback(10)
    assert decode_packet(b"\xe0\x02\x00\x00", 5) == Disconnect()
    assert decode_packet(b"\xf0\x01\x18", 5) == Auth(RC.CONTINUE_AUTHENTICATION)


def test_user_properties_repeat_and_keep_order() -> None:
    props = b"\x26\x00\x01b\x00\x011\x26\x00\x01a\x00\x012\x26\x00\x01b\x00\x013"
    data = b"\x40" + bytes((4 + len(props),)) + b"\x00\x01\x00" + bytes((len(props),)) + props
    packet = decode_packet(data, 5)
    assert packet == Puback(1, 0, Properties(user_properties=(("b", "1"), ("a", "2"), ("b", "3"))))
    assert encode(packet, 5) == data


def test_publish_subscription_identifiers_repeat() -> None:
    data = b"\x30\x09\x00\x01t\x05\x0b\x01\x0b\xc8\x01"  # identifiers 1 and 200 (2-byte varint)
    expected = Publish("t", properties=Properties(subscription_identifiers=(1, 200)))
    assert decode_packet(data, 5, role="client") == expected
    assert encode(expected, 5) == data
    # MQTT-3.3.4-6: a client must not send one
    assert _error(data, 5).reason_code == PROTOCOL


# --------------------------------------------------------------------------- 3.1.1 downgrades


@pytest.mark.parametrize("packet,data", [
    (Puback(10, RC.NO_MATCHING_SUBSCRIBERS, Properties(reason_string="x")), b"\x40\x02\x00\x0a"),
    (Pubrel(10, RC.PACKET_IDENTIFIER_NOT_FOUND), b"\x62\x02\x00\x0a"),
    (Suback(1, (RC.TOPIC_FILTER_INVALID, RC.GRANTED_QOS_2, RC.QUOTA_EXCEEDED)),
     b"\x90\x05\x00\x01\x80\x02\x80"),
    (Unsuback(2, (RC.SUCCESS,)), b"\xb0\x02\x00\x02"),
    (Disconnect(RC.DISCONNECT_WITH_WILL_MESSAGE), b"\xe0\x00"),
    (Connack(reason_code=RC.UNSUPPORTED_PROTOCOL_VERSION), b"\x20\x02\x00\x01"),
    (Connack(reason_code=RC.CLIENT_IDENTIFIER_NOT_VALID), b"\x20\x02\x00\x02"),
    (Connack(reason_code=RC.BAD_USER_NAME_OR_PASSWORD), b"\x20\x02\x00\x04"),
    (Publish("a", b"", properties=Properties(message_expiry_interval=5)), b"\x30\x03\x00\x01a"),
    (Subscribe(1, (("a", SO(1, no_local=True, retain_handling=2)),)),
     b"\x82\x06\x00\x01\x00\x01a\x01"),
])
def test_v311_drops_v5_fields(packet: Packet, data: bytes) -> None:
    assert encode(packet, 4) == data


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize("data,reason", [
    # Remaining Length: a 5th byte is malformed (1.5.5), so is a non-minimal form (MQTT-1.5.5-1)
    (b"\x30\x80\x80\x80\x80\x01", MALFORMED),
    (b"\xc0\x80\x00", MALFORMED),
    # reserved fixed header flags (MQTT-2.1.3-1)
    (b"\x60\x02\x00\x01", MALFORMED),  # PUBREL needs 0b0010
    (b"\x80\x06\x00\x01\x00\x01a\x00", MALFORMED),  # SUBSCRIBE needs 0b0010
    (b"\xa0\x05\x00\x01\x00\x01a", MALFORMED),  # UNSUBSCRIBE needs 0b0010
    (b"\x42\x02\x00\x01", MALFORMED),
    (b"\xc1\x00", MALFORMED),
    (b"\xe8\x00", MALFORMED),
    (b"\x00\x00", MALFORMED),  # packet type 0 is reserved
    (b"\xf0\x00", MALFORMED),  # AUTH does not exist in 3.1.1
    (b"\x36\x09\x00\x03a/b\x00\x01hi", MALFORMED),  # QoS 3 (MQTT-3.3.1-4)
    (b"\x38\x07\x00\x03a/bhi", MALFORMED),  # DUP on QoS 0 (MQTT-3.3.1-2)
    # UTF-8 strings (MQTT-1.5.4-1, MQTT-1.5.4-2)
    (b"\x30\x05\x00\x03a\xffb", MALFORMED),
    (b"\x30\x05\x00\x03a\x00b", MALFORMED),
    (b"\x30\x05\x00\x03\xed\xa0\x80", MALFORMED),  # U+D800, a surrogate
    (b"\x30\x04\x00\x02\xc0\xaf", MALFORMED),  # overlong "/"
    (b"\x82\x07\x00\x01\x00\x02\xed\xbf\xbf\x00", MALFORMED),
    # wildcards and empty topic in PUBLISH (MQTT-3.3.2-2, MQTT-4.7.3-1)
    (b"\x30\x05\x00\x03a/#", RC.TOPIC_NAME_INVALID),
    (b"\x30\x05\x00\x03a/+", RC.TOPIC_NAME_INVALID),
    (b"\x30\x04\x00\x00hi", PROTOCOL),
    # packet identifier 0 (MQTT-2.2.1-3)
    (b"\x32\x07\x00\x03a/b\x00\x00", PROTOCOL),
    (b"\x40\x02\x00\x00", PROTOCOL),
    (b"\x62\x02\x00\x00", PROTOCOL),
    (b"\x82\x06\x00\x00\x00\x01a\x00", PROTOCOL),
    (b"\xa2\x05\x00\x00\x00\x01a", PROTOCOL),
    # SUBSCRIBE / UNSUBSCRIBE without filters (3.1.1 MQTT-3.8.3-3, MQTT-3.10.3-2)
    (b"\x82\x02\x00\x01", PROTOCOL),
    (b"\xa2\x02\x00\x01", PROTOCOL),
    # reserved subscription option bits, QoS 3 (3.1.1 MQTT-3.8.3-4)
    (b"\x82\x06\x00\x01\x00\x01a\x04", MALFORMED),
    (b"\x82\x06\x00\x01\x00\x01a\x03", MALFORMED),
    # fields ending before / running past the remaining length
    (b"\x40\x03\x00\x01\x00", MALFORMED),
    (b"\x40\x01\x00", MALFORMED),
    (b"\xc0\x01\x00", MALFORMED),
    (b"\xe0\x01\x00", MALFORMED),  # 3.1.1 DISCONNECT has no payload
    (b"\xa2\x05\x00\x01\x00\x05a", MALFORMED),
    (b"\x82\x05\x00\x01\x00\x01a", MALFORMED),  # options byte missing
    (b"\x30\x01\x00", MALFORMED),
    (b"\x32\x06\x00\x03a/b\x00", MALFORMED),  # half a packet id
    # server-to-client packets from a client, second CONNECT (MQTT-3.1.0-2)
    (b"\x20\x02\x00\x00", PROTOCOL),
    (b"\x90\x03\x00\x01\x00", PROTOCOL),
    (b"\xd0\x00", PROTOCOL),
    (CONNECT_V4, PROTOCOL),
])
def test_malformed_v311(data: bytes, reason: int) -> None:
    assert _error(data, 4).reason_code == reason


@pytest.mark.parametrize("data,reason", [
    (b"\x30\x03\x00\x00\x00", PROTOCOL),  # empty topic without a topic alias (3.3.2.1)
    (b"\x30\x07\x00\x01a\x03\x23\x00\x00", RC.TOPIC_ALIAS_INVALID),  # alias 0 (MQTT-3.3.2-8)
    (b"\x30\x05\x00\x01a\x01\x00", MALFORMED),  # property length with an unknown id (0)
    (b"\x30\x04\x00\x01a\x05", MALFORMED),  # property length past the end
    (b"\x30\x06\x00\x01a\x03\x23\x00", MALFORMED),
    (b"\x30\x07\x00\x01a\x02\x23\x00\x05", MALFORMED),  # value past the property length
    (b"\x30\x06\x00\x01a\x02\x7f\x00", MALFORMED),  # unknown property identifier
    (b"\x30\x09\x00\x01a\x05\x11\x00\x00\x00\x01", MALFORMED),  # session expiry not in PUBLISH
    (b"\x30\x08\x00\x01a\x04\x01\x00\x01\x01", PROTOCOL),  # payload format given twice
    (b"\x30\x06\x00\x01a\x02\x01\x02", PROTOCOL),  # payload format indicator 2
    (b"\x30\x08\x00\x01a\x04\x08\x00\x01#", PROTOCOL),  # response topic wildcard MQTT-3.3.2-14
    (b"\x30\x0a\x00\x01a\x06\x26\x00\x01k\x00\x01", MALFORMED),  # user property cut short
    # SUBSCRIBE (MQTT-3.8.3-2, MQTT-3.8.3-4, MQTT-3.8.3-5, 3.8.3.1)
    (b"\x82\x03\x00\x01\x00", PROTOCOL),
    (b"\x82\x07\x00\x01\x00\x00\x01a\x40", MALFORMED),
    (b"\x82\x07\x00\x01\x00\x00\x01a\x03", PROTOCOL),
    (b"\x82\x07\x00\x01\x00\x00\x01a\x30", PROTOCOL),
    (b"\x82\x10\x00\x01\x00\x00\x0a$share/g/a\x04", PROTOCOL),  # no local on a shared sub
    (b"\x82\x09\x00\x01\x02\x0b\x00\x00\x01a\x00", PROTOCOL),  # subscription identifier 0
    (b"\x82\x0b\x00\x01\x04\x0b\x01\x0b\x02\x00\x01a\x00", PROTOCOL),  # two identifiers
    # reason codes not valid for the packet
    (b"\x40\x03\x00\x01\x05", PROTOCOL),
    (b"\x62\x03\x00\x01\x10", PROTOCOL),
    (b"\xe0\x01\x03", PROTOCOL),
    (b"\xf0\x02\x01\x00", PROTOCOL),
    (b"\x40\x05\x00\x01\x00\x00\x00", MALFORMED),  # trailing byte after the properties
    (b"\xe0\x03\x00\x00\x00", MALFORMED),
])
def test_malformed_v5(data: bytes, reason: int) -> None:
    assert _error(data, 5).reason_code == reason


@pytest.mark.parametrize("body,reason", [
    (b"\x00\x04MQTT\x04\x03\x00\x3c\x00\x01c", MALFORMED),  # reserved flag (MQTT-3.1.2-3)
    (b"\x00\x04MQTT\x04\x0a\x00\x3c\x00\x01c", MALFORMED),  # will QoS, no will (MQTT-3.1.2-11)
    (b"\x00\x04MQTT\x04\x22\x00\x3c\x00\x01c", MALFORMED),  # will retain, no will (-3.1.2-13)
    (b"\x00\x04MQTT\x04\x1e\x00\x3c\x00\x01c\x00\x01w\x00\x00", MALFORMED),  # will QoS 3
    (b"\x00\x04MQTT\x04\x42\x00\x3c\x00\x01c\x00\x01p", PROTOCOL),  # 3.1.1 MQTT-3.1.2-22
    (b"\x00\x04MQTT\x04\x06\x00\x3c\x00\x01c\x00\x03w/#\x00\x00", RC.TOPIC_NAME_INVALID),
    (b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x01c\x00", MALFORMED),  # trailing byte
    (b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x05c", MALFORMED),  # client id runs past the end
    (b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x01\x00", MALFORMED),  # U+0000 in client id
    (b"\x00\x04MQTT\x04\x82\x00\x3c\x00\x01c", MALFORMED),  # user name flag, no user name
    (b"\x00\x04MQTT\x04", MALFORMED),
    (b"\x00\x04HTTP\x04\x02\x00\x3c\x00\x01c", PROTOCOL),  # not MQTT (MQTT-3.1.2-1)
    (b"\x00\x04MQTT\x05\x02\x00\x3c\x03\x23\x00\x01\x00\x01c", MALFORMED),  # alias in CONNECT
    (b"\x00\x04MQTT\x05\x02\x00\x3c\x06\x21\x00\x01\x21\x00\x02\x00\x01c", PROTOCOL),  # twice
    (b"\x00\x04MQTT\x05\x02\x00\x3c\x03\x21\x00\x00\x00\x01c", PROTOCOL),  # receive max 0
    (b"\x00\x04MQTT\x05\x02\x00\x3c\x02\x17\x02\x00\x01c", PROTOCOL),  # request problem 2
    (b"\x00\x04MQTT\x05\x02\x00\x3c\x04\x16\x00\x01x\x00\x01c", PROTOCOL),  # data, no method
    (b"\x00\x04MQTT\x05\x06\x00\x3c\x00\x00\x01c\x02\x18\x00", MALFORMED),  # will props cut
    (b"\x00\x04MQTT\x05\x06\x00\x3c\x00\x00\x01c\x05\x11\x00\x00\x00\x01\x00\x01w\x00\x00",
     MALFORMED),  # session expiry is not a will property
])
def test_malformed_connect(body: bytes, reason: int) -> None:
    err = _error(b"\x10" + bytes((len(body),)) + body)
    assert err.reason_code == reason


def test_connect_error_reports_protocol_level() -> None:
    body = b"\x00\x04MQTT\x05\x02\x00\x3c\x03\x21\x00\x00\x00\x01c"
    decoder = Decoder()
    with pytest.raises(MqttProtocolError) as info:
        decoder.feed(b"\x10" + bytes((len(body),)) + body)
    assert info.value.protocol_level == 5
    assert decoder.version == 5  # the server may answer with a 5.0 CONNACK reason code


@pytest.mark.parametrize("body", [
    b"\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x01c",  # MQTT 3.1
    b"\x00\x04MQTT\x03\x02\x00\x3c\x00\x01c",
    b"\x00\x04MQTT\x06\x02\x00\x3c\x00\x01c",
])
def test_unsupported_protocol_version(body: bytes) -> None:
    err = _error(b"\x10" + bytes((len(body),)) + body)
    assert isinstance(err, UnsupportedProtocolVersion)
    assert err.reason_code == RC.UNSUPPORTED_PROTOCOL_VERSION
    # the answer: a 3.1.1 CONNACK with return code 0x01 (3.1.1 MQTT-3.1.2-2)
    assert encode(Connack(reason_code=err.reason_code), 4) == b"\x20\x02\x00\x01"


@pytest.mark.parametrize("data", [b"\x30\x07\x00\x03a/bhi", b"\xc0\x00", b"\x82"])
def test_first_packet_must_be_connect(data: bytes) -> None:
    assert _error(data).reason_code == PROTOCOL  # MQTT-3.1.0-1, seen from the first byte


def test_first_packet_from_server_must_be_connack() -> None:
    with pytest.raises(MqttProtocolError) as info:
        Decoder(role="client", version=4).feed(b"\x30\x07\x00\x03a/bhi")
    assert info.value.reason_code == PROTOCOL  # MQTT-3.2.0-1


def test_client_role_refuses_client_packets() -> None:
    decoder = Decoder(role="client", version=5)
    decoder.feed(b"\x20\x03\x00\x00\x00")
    with pytest.raises(MqttProtocolError):
        decoder.feed(b"\xc0\x00")


def test_second_connect_flag() -> None:
    decoder = Decoder(allow_second_connect=True)
    assert decoder.feed(CONNECT_V4 + CONNECT_V4) == [Connect("abc"), Connect("abc")]


@pytest.mark.parametrize("data,reason", [
    (b"\x20\x02\x02\x00", MALFORMED),  # reserved acknowledge flags (3.1.1 MQTT-3.2.2-1)
    (b"\x20\x02\x01\x05", PROTOCOL),  # session present with a refusal
    (b"\x20\x02\x00\x06", PROTOCOL),  # reserved return code
    (b"\x90\x03\x00\x01\x03", PROTOCOL),
    (b"\x90\x02\x00\x01", PROTOCOL),
    (b"\xb0\x03\x00\x01\x00", MALFORMED),
])
def test_malformed_server_packets_v311(data: bytes, reason: int) -> None:
    decoder = Decoder(role="any", version=4)
    with pytest.raises(MqttProtocolError) as info:
        decoder.feed(data)
    assert info.value.reason_code == reason


@pytest.mark.parametrize("data,reason", [
    (b"\x20\x03\x00\x01\x00", PROTOCOL),  # 0x01 is not a CONNACK reason code
    (b"\x20\x02\x00\x00", MALFORMED),  # property length missing
    (b"\x20\x03\x01\x87\x00", PROTOCOL),  # session present with a refusal (MQTT-3.2.2-6)
    (b"\x20\x05\x00\x00\x02\x24\x02", PROTOCOL),  # maximum QoS 2
    (b"\x20\x05\x00\x00\x02\x25\x02", PROTOCOL),  # retain available 2
    (b"\x20\x07\x00\x00\x04\x27\x00\x00\x00", MALFORMED),  # four byte integer cut short
    (b"\x20\x08\x00\x00\x05\x27\x00\x00\x00\x00", PROTOCOL),  # maximum packet size 0
    (b"\x90\x04\x00\x01\x00\x04", PROTOCOL),
    (b"\xb0\x03\x00\x01\x00", PROTOCOL),  # 5.0 UNSUBACK without reason codes
    (b"\xb0\x04\x00\x01\x00\x02", PROTOCOL),
])
def test_malformed_server_packets_v5(data: bytes, reason: int) -> None:
    decoder = Decoder(role="any", version=5)
    with pytest.raises(MqttProtocolError) as info:
        decoder.feed(data)
    assert info.value.reason_code == reason


def test_packet_too_large_is_refused_from_the_fixed_header() -> None:
    decoder = Decoder(max_packet_size=100, version=4)
    with pytest.raises(MqttProtocolError) as info:
        decoder.feed(b"\x30\x80\x01")  # announces 131 bytes; no body sent yet
    assert info.value.reason_code == RC.PACKET_TOO_LARGE
    exact = b"\x30\x62\x00\x01a" + b"x" * 95  # 100 bytes in all: accepted
    assert Decoder(max_packet_size=100, version=4).feed(exact) == [Publish("a", b"x" * 95)]
    assert _error(exact + b"", 4, max_packet_size=99).reason_code == RC.PACKET_TOO_LARGE


def test_decoder_stays_failed_and_returns_earlier_packets() -> None:
    decoder = Decoder(version=4)
    with pytest.raises(MqttProtocolError) as info:
        decoder.feed(b"\xc0\x00\xe0\x00\x60\x02\x00\x01\xc0\x00")
    assert info.value.packets == [Pingreq(), Disconnect()]
    with pytest.raises(MqttProtocolError):
        decoder.feed(b"\xc0\x00")


def test_large_packet_byte_by_byte_is_linear() -> None:
    payload = bytes(range(256)) * 400  # ~100 kB: quadratic buffering would take minutes
    data = encode_publish("big", payload, 1, packet_id=5)
    decoder = Decoder(version=4)
    out: list[Packet] = []
    for i in range(len(data)):
        out += decoder.feed(data[i:i + 1])
        if i == 10:  # the header is in: no parse is tried again before the last byte
            assert decoder._need == len(data)
    assert out == [Publish("big", payload, 1, packet_id=5)]


def test_feed_accepts_bytearray_and_memoryview() -> None:
    decoder = Decoder(version=4)
    assert decoder.feed(bytearray(b"\x30\x07\x00\x03a/b")) == []
    packets = decoder.feed(memoryview(b"hi\xc0\x00"))
    assert packets == [Publish("a/b", b"hi"), Pingreq()]
    assert type(packets[0].payload) is bytes  # type: ignore[union-attr]


def test_decode_packet_requires_exactly_one_packet() -> None:
    with pytest.raises(MqttProtocolError):
        decode_packet(b"\xc0\x00\xc0\x00", 4)
    with pytest.raises(MqttProtocolError):
        decode_packet(b"\x30\x07\x00", 4)


def test_decoder_arguments() -> None:
    with pytest.raises(ValueError):
        Decoder(role="client")
    with pytest.raises(ValueError):
        Decoder(version=3)
    with pytest.raises(ValueError):
        Decoder(role="peer", version=4)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- encoder misuse


@pytest.mark.parametrize("packet,version,error", [
    (Publish("a/#"), 4, ValueError),
    (Publish(""), 4, ValueError),
    (Publish("", properties=Properties(message_expiry_interval=1)), 5, ValueError),
    (Publish("a", qos=0, packet_id=1), 4, ValueError),
    (Publish("a", qos=0, dup=True), 4, ValueError),
    (Publish("a", qos=1), 4, TypeError),
    (Publish("a", qos=1, packet_id=0), 4, ValueError),
    (Publish("a", qos=1, packet_id=65536), 4, ValueError),
    (Publish("a", qos=3, packet_id=1), 4, ValueError),
    (Publish("a", "text"), 4, TypeError),  # type: ignore[arg-type]
    (Publish("a", properties=Properties(session_expiry_interval=1)), 5, ValueError),
    (Publish("a", properties=Properties(topic_alias=0)), 5, ValueError),
    (Publish("a", properties=Properties(payload_format_indicator=2)), 5, ValueError),
    (Publish("a", properties=Properties(response_topic="r/+")), 5, ValueError),
    (Connect("a\x00b"), 4, ValueError),
    (Connect("\ud800"), 4, ValueError),
    (Connect("a", 5), 4, ValueError),
    (Connect("a", password=b"p"), 4, ValueError),  # 3.1.1 MQTT-3.1.2-22
    (Connect("a", keepalive=70000), 4, ValueError),
    (Connect("a", 5, properties=Properties(topic_alias=1)), 5, ValueError),
    (Connect("a", 5, properties=Properties(authentication_data=b"x")), 5, ValueError),
    (Connect("a", 5, properties=Properties(receive_maximum=0)), 5, ValueError),
    (Connect("a", will=Will("w/#")), 4, ValueError),
    (Connect("a", will=Will("w", qos=3)), 4, ValueError),
    (Connect("a", 5, will=Will("w", properties=Properties(session_expiry_interval=1))), 5,
     ValueError),
    (Connack(True, RC.NOT_AUTHORIZED), 5, ValueError),
    (Connack(reason_code=RC.GRANTED_QOS_1), 5, ValueError),
    (Connack(reason_code=RC.TOPIC_ALIAS_INVALID), 4, ValueError),
    (Connack(reason_code=9), 4, ValueError),
    (Puback(0), 4, ValueError),
    (Puback(1, RC.PACKET_IDENTIFIER_NOT_FOUND), 5, ValueError),
    (Subscribe(1, ()), 4, ValueError),
    (Subscribe(1, (("", SO()),)), 4, ValueError),
    (Subscribe(1, (("a", SO(3)),)), 4, ValueError),
    (Subscribe(1, (("$share/g/a", SO(no_local=True)),)), 5, ValueError),
    (Subscribe(1, (("a", SO()),), Properties(subscription_identifiers=(1, 2))), 5, ValueError),
    (Subscribe(1, (("a", SO()),), Properties(subscription_identifiers=(0,))), 5, ValueError),
    (Suback(1, ()), 4, ValueError),
    (Suback(1, (0x03,)), 4, ValueError),
    (Suback(1, (0x04,)), 5, ValueError),
    (Unsubscribe(1, ()), 4, ValueError),
    (Unsuback(1), 5, ValueError),
    (Disconnect(0x01), 5, ValueError),
    (Auth(), 4, ValueError),
    (Auth(RC.SUCCESS, Properties(reason_string="x", topic_alias=1)), 5, ValueError),
    (Pingreq(), 3, ValueError),
])
def test_encoder_misuse_is_not_a_protocol_error(packet: Packet, version: int,
                                                error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        encode(packet, version)
    assert not isinstance(info.value, MqttProtocolError)


def test_encode_rejects_non_packets() -> None:
    with pytest.raises(TypeError):
        encode(object(), 4)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- PUBLISH fast path


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_encode_publish_matches_encode(version: int, qos: int) -> None:
    pid = 77 if qos else None
    props = Properties(user_properties=(("u", "v"),)) if version == 5 else None
    fast = encode_publish("t/1", b"x" * 200, qos, True, False, pid, props, version)
    slow = encode(Publish("t/1", b"x" * 200, qos, True, False, pid, props or NO_PROPERTIES),
                  version)
    assert fast == slow


@pytest.mark.parametrize("version", [4, 5])
def test_packet_id_splicing(version: int) -> None:
    props = Properties(message_expiry_interval=60) if version == 5 else None
    data, offset = encode_publish_with_offset("a/b", b"p" * 300, 1, packet_id=1,
                                              properties=props, version=version)
    assert data[offset:offset + 2] == b"\x00\x01"
    for pid in (2, 0x1234, 65535):
        assert with_packet_id(data, offset, pid) == encode_publish(
            "a/b", b"p" * 300, 1, packet_id=pid, properties=props, version=version)
    assert with_packet_id(data, offset, 9, dup=True) == encode_publish(
        "a/b", b"p" * 300, 1, dup=True, packet_id=9, properties=props, version=version)
    with pytest.raises(ValueError):
        with_packet_id(data, offset, 0)


def test_qos0_has_no_packet_id_offset() -> None:
    data, offset = encode_publish_with_offset("a", b"", 0)
    assert (data, offset) == (b"\x30\x03\x00\x01a", -1)
    with pytest.raises(ValueError):
        with_packet_id(data, offset, 1)


# --------------------------------------------------------------------------- paho-mqtt interop


@pytest.mark.interop
@pytest.mark.parametrize("version", [4, 5])
def test_paho_client_bytes(version: int) -> None:
    """A real paho-mqtt client on a loopback socket: we decode what it sends and it accepts
    what we encode (CONNACK, SUBACK, PUBACK)."""
    mqtt = pytest.importorskip("paho.mqtt.client")
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties as _PahoProperties
    from paho.mqtt.subscribeoptions import SubscribeOptions

    PahoProperties: Any = _PahoProperties  # untyped in paho
    proto = mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-1", protocol=proto)
    client.username_pw_set("user", "pw")
    will_props = None
    connect_props = None
    publish_props = None
    if version == 5:
        will_props = PahoProperties(PacketTypes.WILLMESSAGE)
        will_props.WillDelayInterval = 7
        connect_props = PahoProperties(PacketTypes.CONNECT)
        connect_props.SessionExpiryInterval = 300
        connect_props.UserProperty = ("k", "v")
        publish_props = PahoProperties(PacketTypes.PUBLISH)
        publish_props.ContentType = "application/octet-stream"
        publish_props.UserProperty = [("a", "1"), ("b", "2")]
    client.will_set("will/t", b"gone", qos=1, retain=True, properties=will_props)
    acked: list[str] = []
    client.on_subscribe = lambda *args: acked.append("suback")
    client.on_publish = lambda *args: acked.append("puback")

    decoder = Decoder()
    received: list[Packet] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(5)
        port = server.getsockname()[1]
        conn = None
        try:
            assert client.connect("127.0.0.1", port, keepalive=30, properties=connect_props) == 0
            conn, _ = server.accept()
            conn.settimeout(5)

            def pump(done: Any) -> None:
                deadline = time.monotonic() + 5
                while not done() and time.monotonic() < deadline:
                    client.loop(timeout=0.05)
                assert done()

            def receive(count: int) -> None:
                while len(received) < count:
                    assert conn is not None
                    data = conn.recv(65536)
                    assert data, "paho closed the connection"
                    received.extend(decoder.feed(data))

            receive(1)
            conn.sendall(encode(Connack(), version))
            pump(client.is_connected)
            if version == 5:
                opts = SubscribeOptions(qos=1, noLocal=True, retainAsPublished=True,
                                        retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
                client.subscribe("a/+", options=opts)
            else:
                client.subscribe("a/+", qos=1)
            client.publish("a/b", bytes(range(64)), qos=1, properties=publish_props)
            receive(3)
            conn.sendall(encode(Suback(received[1].packet_id, (1,)), version)  # type: ignore
                         + encode(Puback(received[2].packet_id), version))  # type: ignore
            pump(lambda: len(acked) == 2)
            client.disconnect()
            receive(4)
        finally:
            client.loop_stop()
            if conn is not None:
                conn.close()
    connect, subscribe, publish, disconnect = received
    assert isinstance(connect, Connect)
    assert (connect.client_id, connect.protocol_level, connect.keepalive) == ("paho-1", version, 30)
    assert (connect.username, connect.password) == ("user", b"pw")
    assert connect.will is not None
    assert (connect.will.topic, connect.will.payload, connect.will.qos, connect.will.retain) == (
        "will/t", b"gone", 1, True)
    assert isinstance(subscribe, Subscribe)
    assert isinstance(publish, Publish)
    assert (publish.topic, publish.payload, publish.qos) == ("a/b", bytes(range(64)), 1)
    assert isinstance(disconnect, Disconnect)
    if version == 5:
        assert connect.properties.session_expiry_interval == 300
        assert connect.properties.user_properties == (("k", "v"),)
        assert connect.will.properties.will_delay_interval == 7
        assert subscribe.subscriptions == (("a/+", SO(1, True, True, 1)),)
        assert publish.properties.content_type == "application/octet-stream"
        assert publish.properties.user_properties == (("a", "1"), ("b", "2"))
    else:
        assert subscribe.subscriptions == (("a/+", SO(1)),)
    assert sorted(acked) == ["puback", "suback"]


# --------------------------------------------------------------------------- Hypothesis

_chars = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
texts = st.text(_chars, max_size=12)
topics = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00+#"),
                 min_size=1, max_size=12)
packet_ids = st.integers(1, 65535)
payloads = st.binary(max_size=40)

_NONZERO = {"receive_maximum", "maximum_packet_size", "topic_alias"}


def _value_strategy(name: str, ptype: PropertyType, boolean: bool,
                    context: int) -> st.SearchStrategy[Any]:
    if boolean:
        return st.booleans()
    if name in ("payload_format_indicator", "maximum_qos"):
        return st.integers(0, 1)
    if ptype == PropertyType.TWO_BYTE_INT:
        return st.integers(1 if name in _NONZERO else 0, 0xFFFF)
    if ptype == PropertyType.FOUR_BYTE_INT:
        return st.integers(1 if name in _NONZERO else 0, 0xFFFFFFFF)
    if name == "response_topic":
        return topics
    if ptype == PropertyType.UTF8:
        return texts
    if ptype == PropertyType.BINARY:
        return st.binary(max_size=10)
    raise AssertionError(name)


@st.composite
def properties(draw: st.DrawFn, context: int) -> Properties:
    values: dict[str, Any] = {}
    for spec in PROPERTY_SPECS:
        if context not in spec.allowed:
            continue
        if spec.type == PropertyType.UTF8_PAIR:
            values[spec.name] = tuple(draw(st.lists(st.tuples(texts, texts), max_size=3)))
        elif spec.type == PropertyType.VAR_BYTE_INT:
            most = 3 if context == PacketType.PUBLISH else 1
            values[spec.name] = tuple(draw(st.lists(st.integers(1, 268_435_455), max_size=most)))
        elif draw(st.integers(0, 3)) == 0:
            values[spec.name] = draw(_value_strategy(spec.name, spec.type, spec.boolean, context))
    if "authentication_data" in values and "authentication_method" not in values:
        values["authentication_method"] = draw(texts)
    return Properties(**values)


def _props(version: int, context: int) -> st.SearchStrategy[Properties]:
    return properties(context) if version == 5 else st.just(NO_PROPERTIES)


def _codes(version: int, v5: frozenset[ReasonCode], v4: Any = None) -> st.SearchStrategy[Any]:
    if version == 5:
        return st.sampled_from(sorted(v5))
    return st.just(ReasonCode.SUCCESS) if v4 is None else st.sampled_from(v4)


@st.composite
def packets(draw: st.DrawFn, version: int) -> Packet:
    kind = draw(st.sampled_from(list(PacketType) if version == 5 else list(PacketType)[:-1]))
    P = PacketType
    if kind == P.CONNECT:
        will = None
        if draw(st.booleans()):
            will = Will(draw(topics), draw(payloads), draw(st.integers(0, 2)), draw(st.booleans()),
                        draw(_props(version, WILL_PROPERTIES)))
        username = draw(st.none() | texts)
        password = draw(st.none() | st.binary(max_size=10))
        if version == 4 and username is None:
            password = None
        return Connect(draw(texts), version, draw(st.booleans()), draw(st.integers(0, 65535)),
                       username, password, will, draw(_props(version, P.CONNECT)))
    if kind == P.CONNACK:
        code = draw(_codes(version, CONNACK_CODES, list(ConnackReturnCode)))
        return Connack(draw(st.booleans()) if code == 0 else False, code,
                       draw(_props(version, P.CONNACK)))
    if kind == P.PUBLISH:
        qos = draw(st.integers(0, 2))
        return Publish(draw(topics), draw(payloads), qos, draw(st.booleans()),
                       draw(st.booleans()) if qos else False, draw(packet_ids) if qos else None,
                       draw(_props(version, P.PUBLISH)))
    if kind in (P.PUBACK, P.PUBREC, P.PUBREL, P.PUBCOMP):
        classes: dict[PacketType, type[Puback | Pubrec | Pubrel | Pubcomp]] = {
            P.PUBACK: Puback, P.PUBREC: Pubrec, P.PUBREL: Pubrel, P.PUBCOMP: Pubcomp}
        cls = classes[kind]
        allowed = PUBACK_CODES if kind in (P.PUBACK, P.PUBREC) else PUBREL_CODES
        ack: Packet = cls(draw(packet_ids), draw(_codes(version, allowed)),
                          draw(_props(version, kind)))
        return ack
    if kind == P.SUBSCRIBE:
        if version == 5:
            opts = st.builds(SO, st.integers(0, 2), st.booleans(), st.booleans(),
                             st.sampled_from(list(RetainHandling)))
            filters = texts.filter(lambda f: bool(f) and not f.startswith("$share/"))
        else:
            opts = st.builds(SO, st.integers(0, 2))
            filters = texts.filter(bool)
        subs = draw(st.lists(st.tuples(filters, opts), min_size=1, max_size=4))
        return Subscribe(draw(packet_ids), tuple(subs), draw(_props(version, kind)))
    if kind == P.SUBACK:
        codes = SUBACK_CODES if version == 5 else frozenset({0, 1, 2, 0x80})
        return Suback(draw(packet_ids),
                      tuple(draw(st.lists(st.sampled_from(sorted(codes)), min_size=1, max_size=4))),
                      draw(_props(version, kind)))
    if kind == P.UNSUBSCRIBE:
        return Unsubscribe(draw(packet_ids),
                           tuple(draw(st.lists(texts, min_size=1, max_size=4))),
                           draw(_props(version, kind)))
    if kind == P.UNSUBACK:
        codes_v5 = tuple(draw(st.lists(st.sampled_from(sorted(UNSUBACK_CODES)), min_size=1,
                                       max_size=4)))
        return Unsuback(draw(packet_ids), codes_v5 if version == 5 else (),
                        draw(_props(version, kind)))
    if kind == P.PINGREQ:
        return Pingreq()
    if kind == P.PINGRESP:
        return Pingresp()
    if kind == P.DISCONNECT:
        return Disconnect(draw(_codes(version, DISCONNECT_CODES)), draw(_props(version, kind)))
    return Auth(draw(_codes(version, AUTH_CODES)), draw(_props(version, kind)))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), version=st.sampled_from([4, 5]))
def test_round_trip(data: st.DataObject, version: int) -> None:
    packet = data.draw(packets(version))
    wire = encode(packet, version)
    assert decode_packet(wire, version) == packet
    assert encode(decode_packet(wire, version), version) == wire


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), version=st.sampled_from([4, 5]))
def test_round_trip_stream_random_splits(data: st.DataObject, version: int) -> None:
    items = data.draw(st.lists(packets(version), min_size=1, max_size=6))
    wire = b"".join(encode(p, version) for p in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    decoder = Decoder(role="any", version=version)
    out: list[Packet] = []
    start = 0
    for cut in [*cuts, len(wire)]:
        out += decoder.feed(wire[start:cut])
        start = cut
    assert out == items


def _only_protocol_errors(decoder: Decoder, chunks: list[bytes]) -> None:
    try:
        for chunk in chunks:
            decoder.feed(chunk)
    except MqttProtocolError:
        pass


_DECODER_KINDS = [
    {}, {"version": 4}, {"version": 5}, {"role": "client", "version": 4},
    {"role": "client", "version": 5}, {"role": "any", "version": 4}, {"role": "any", "version": 5},
    {"max_packet_size": 64, "version": 5},
]


@settings(max_examples=500)
@given(raw=st.lists(st.binary(max_size=64), max_size=4), kind=st.sampled_from(_DECODER_KINDS))
def test_random_bytes_raise_only_protocol_errors(raw: list[bytes], kind: dict[str, Any]) -> None:
    _only_protocol_errors(Decoder(**kind), raw)


@settings(max_examples=1000)
@given(b0=st.integers(0, 255), body=st.binary(max_size=48),
       kind=st.sampled_from(_DECODER_KINDS[1:]))
def test_random_bodies_raise_only_protocol_errors(b0: int, body: bytes,
                                                  kind: dict[str, Any]) -> None:
    # a well-framed packet with a random body reaches every field parser
    _only_protocol_errors(Decoder(**kind), [bytes((b0,)) + encode_varint(len(body)) + body])


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.data(), version=st.sampled_from([4, 5]))
def test_mutated_packets_raise_only_protocol_errors(data: st.DataObject, version: int) -> None:
    wire = bytearray(encode(data.draw(packets(version)), version))
    for _ in range(data.draw(st.integers(1, 3))):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    _only_protocol_errors(Decoder(role="any", version=version), [bytes(wire[:cut]),
                                                                 bytes(wire[cut:])])
