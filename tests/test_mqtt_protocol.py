"""The broker's Twisted protocol over StringTransport + Clock: CONNECT/CONNACK codes, keepalive,
malformed input, acknowledgement flows and order, Receive Maximum, topic aliases, packet sizes,
AUTH, flow control."""

from __future__ import annotations

import pytest
from helpers.mqtt_harness import FakeAuth, Harness, props

from iotserver.mqtt.codec import encode
from iotserver.mqtt.packets import (
    MQTT_3_1_1,
    MQTT_5,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
    Suback,
    Subscribe,
    SubscriptionOptions,
    Unsuback,
    Unsubscribe,
    Will,
)

RC = ReasonCode
V4, V5 = MQTT_3_1_1, MQTT_5


def sub(topic: str, qos: int = 0, pid: int = 1, **opts: object) -> Subscribe:
    return Subscribe(pid, ((topic, SubscriptionOptions(qos, **opts)),))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- CONNECT / CONNACK


@pytest.mark.parametrize("version", [V4, V5])
def test_connect_connack_and_ping(version: int) -> None:
    h = Harness()
    c = h.connect("c1", version)
    assert c.connack.session_present is False
    c.send(Pingreq())
    assert isinstance(c.one(Pingresp), Pingresp)
    assert h.broker.clients.keys() == {"c1"}
    c.send(Disconnect())
    assert c.closed and not h.broker.sessions


def test_v5_connack_announces_limits() -> None:
    h = Harness(receive_maximum=10, topic_alias_maximum=5, max_packet_size=4096, maximum_qos=1,
                retain_available=False, max_keepalive=30, max_session_expiry=60)
    c = h.connect("c", V5, keepalive=0,
                  props=props(session_expiry_interval=3600))
    p = c.connack.properties
    assert (p.receive_maximum, p.topic_alias_maximum, p.maximum_packet_size) == (10, 5, 4096)
    assert p.maximum_qos == 1 and p.retain_available is False
    assert p.server_keep_alive == 30  # MQTT-3.2.2-21: the client must use it
    assert p.session_expiry_interval == 60  # capped


def test_empty_client_id_assigned_in_v5_refused_without_clean_session_in_v311() -> None:
    h = Harness()
    c = h.connect("", V5)
    assigned = c.connack.properties.assigned_client_identifier
    assert assigned and assigned in h.broker.sessions
    c = h.open(V4)
    c.send(Connect("", V4, clean_start=False))
    assert c.one(Connack).reason_code == 2  # identifier rejected (3.1.1 MQTT-3.1.3-8)
    assert c.closed
    h.connect("", V4, clean=True)


@pytest.mark.parametrize(
    ("kwargs", "connect", "code_v5", "code_v4"),
    [
        ({}, {"username": "bad", "password": b"x"}, RC.BAD_USER_NAME_OR_PASSWORD, 4),
        ({"maximum_qos": 1}, {"will": Will("w", b"x", qos=2)}, RC.QOS_NOT_SUPPORTED, 3),
        ({"retain_available": False}, {"will": Will("w", b"x", retain=True)},
         RC.RETAIN_NOT_SUPPORTED, 3),
        ({}, {"will": Will("w", b"\xff", properties=props(payload_format_indicator=1))},
         RC.PAYLOAD_FORMAT_INVALID, None),
        ({"max_connect_rate": 0.5}, {}, RC.CONNECTION_RATE_EXCEEDED, 3),  # second CONNECT
    ],
)
def test_connack_refusals(kwargs: dict[str, object], connect: dict[str, object], code_v5: int,
                          code_v4: int | None) -> None:
    for version, code in ((V5, code_v5), (V4, code_v4)):
        if code is None:
            continue
        h = Harness(**kwargs)  # type: ignore[arg-type]
        if "max_connect_rate" in kwargs:
            h.connect("first", version)
        c = h.open(version)
        c.send(Connect("c", version, **connect))  # type: ignore[arg-type]
        ack = c.one(Connack)
        assert ack.reason_code == code and not ack.session_present
        assert c.closed


def test_bad_authentication_method_and_auth_packet() -> None:
    h = Harness()
    c = h.open(V5)
    c.send(Connect("c", V5, properties=props(authentication_method="SCRAM-SHA-1")))
    assert c.one(Connack).reason_code == RC.BAD_AUTHENTICATION_METHOD
    c = h.connect("c", V5)
    c.send(Auth(RC.RE_AUTHENTICATE, props(authentication_method="SCRAM-SHA-1")))
    assert c.one(Disconnect).reason_code == RC.PROTOCOL_ERROR
    assert c.closed


def test_server_busy_over_max_connections_and_session_quota() -> None:
    h = Harness(max_connections=1)
    h.connect("a", V5)
    c = h.open(V5)
    c.send(Connect("b", V5))
    assert c.one(Connack).reason_code == RC.SERVER_BUSY
    c = h.open(V4)
    c.send(Connect("b", V4))
    assert c.one(Connack).reason_code == 3  # server unavailable
    h = Harness(max_sessions=1)
    h.connect("a", V5)
    c = h.open(V5)
    c.send(Connect("b", V5))
    assert c.one(Connack).reason_code == RC.QUOTA_EXCEEDED


def test_unsupported_protocol_level_gets_v311_code_1() -> None:
    h = Harness()
    c = h.open(V4)
    c.send_raw(b"\x10\x0c\x00\x04MQTT\x06\x02\x00\x3c\x00\x00")
    assert c.one(Connack).reason_code == 1
    assert c.closed


def test_connect_timeout_closes_silent_connection() -> None:
    # the listener's login_timeout (the edge guard in front of the protocol) is the CONNECT
    # timeout; [mqtt.limits] connect_timeout is its default
    from dataclasses import replace as _replace

    from iotserver.edge.guard import GuardedFactory
    from iotserver.edge.limits import MQTT as MQTT_LIMITS
    from iotserver.mqtt.service import PROBE

    h = Harness(connect_timeout=5)
    h.factory = GuardedFactory("MQTT tcp:0", h.factory,  # type: ignore[assignment]
                               _replace(MQTT_LIMITS, login_timeout=5), h.clock, probe=PROBE)
    c = h.open()
    h.advance(4.9)
    assert not c.closed
    h.advance(0.2)
    assert c.closed
    assert h.factory.stats.login_timeouts == 1  # type: ignore[attr-defined]


def test_packets_after_connect_wait_for_authentication() -> None:
    auth = FakeAuth()
    auth.hold = True
    h = Harness(auth=auth)
    c = h.open(V4)
    c.send(Connect("c", V4), sub("t", 1), Publish("t", b"x", 1, packet_id=7))
    assert c.packets() == []
    assert c.transport.producerState == "paused"
    auth.release()
    h.pump()
    got = c.packets()
    assert isinstance(got[0], Connack) and isinstance(got[1], Suback)
    assert [type(p) for p in got[2:]] == [Publish, Puback] or \
        [type(p) for p in got[2:]] == [Puback, Publish]
    assert c.transport.producerState == "producing"


# --------------------------------------------------------------------------- keepalive


@pytest.mark.parametrize("version", [V4, V5])
def test_keepalive_one_and_a_half_times(version: int) -> None:
    h = Harness()
    c = h.connect("c", version, keepalive=10)
    h.advance(14)
    c.send(Pingreq())
    c.packets()
    h.advance(14.9)
    assert not c.closed
    h.advance(0.2)  # 15 s of silence: 1.5 x keepalive (MQTT-3.1.2-24)
    if version == V5:
        assert c.one(Disconnect).reason_code == RC.KEEP_ALIVE_TIMEOUT
    assert c.closed


def test_server_keepalive_is_enforced_for_v5() -> None:
    h = Harness(max_keepalive=4)
    c = h.connect("c", V5, keepalive=0)
    h.advance(6.1)
    assert c.closed


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"\x30\x02\x00\x05", RC.MALFORMED_PACKET),  # topic length past the packet
        (b"\x36\x05\x00\x01a\x00\x01", RC.MALFORMED_PACKET),  # QoS 3
        (b"\x82\x03\x00\x01\x00", RC.PROTOCOL_ERROR),  # SUBSCRIBE without filters
        (b"\x10\x0c\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x00", RC.PROTOCOL_ERROR),  # 2nd CONNECT
        (b"\x00\x00", RC.MALFORMED_PACKET),  # reserved type 0
        (b"\x30\xff\xff\xff\xff\x01", RC.MALFORMED_PACKET),  # remaining length > 4 bytes
    ],
)
def test_malformed_input_closes_only_that_client(raw: bytes, code: int) -> None:
    h = Harness()
    good = h.connect("good", V5)
    good.send(sub("t"))
    good.packets()
    bad = h.connect("bad", V5, will=Will("t", b"bad died"))
    bad.send_raw(raw)
    assert bad.one(Disconnect).reason_code == code  # MQTT-4.13.1-1
    assert bad.closed
    assert [p.payload for p in good.publishes()] == [b"bad died"]  # will: abnormal close
    assert h.broker.stats.protocol_errors == 1
    pub = h.connect("p", V5)
    pub.send(Publish("t", b"still fine"))
    assert [p.payload for p in good.publishes()] == [b"still fine"]


def test_malformed_connect_v5_gets_connack_code_v311_just_closes() -> None:
    h = Harness()
    c = h.open(V5)
    # v5 CONNECT with the reserved flag bit 0 set
    c.send_raw(b"\x10\x0d\x00\x04MQTT\x05\x03\x00\x3c\x00\x00\x01c")
    assert c.one(Connack).reason_code == RC.MALFORMED_PACKET
    c = h.open(V4)
    c.send_raw(b"\x10\x0d\x00\x04MQTT\x04\x03\x00\x3c\x00\x01c")
    assert c.packets() == [] and c.closed


def test_packet_too_large_inbound() -> None:
    h = Harness(max_packet_size=100)
    c = h.connect("c", V5)
    c.send(Publish("t", b"x" * 200))
    assert c.one(Disconnect).reason_code == RC.PACKET_TOO_LARGE
    assert c.closed


# --------------------------------------------------------------------------- PUBLISH flows


@pytest.mark.parametrize("version", [V4, V5])
def test_qos_flows_both_directions(version: int) -> None:
    h = Harness()
    s = h.connect("s", version)
    s.send(sub("t", 2))
    assert s.one(Suback).reason_codes == (2,)
    p = h.connect("p", version)
    p.send(Publish("t", b"q1", 1, packet_id=10))
    assert p.one(Puback).packet_id == 10
    got = s.one(Publish)
    assert (got.qos, got.payload, got.dup) == (1, b"q1", False)
    s.send(Puback(got.packet_id))
    p.send(Publish("t", b"q2", 2, packet_id=11))
    assert p.one(Pubrec).packet_id == 11
    p.send(Publish("t", b"q2", 2, dup=True, packet_id=11))  # duplicate before PUBREL
    assert p.one(Pubrec).packet_id == 11
    p.send(Pubrel(11))
    assert p.one(Pubcomp).packet_id == 11
    got = s.one(Publish)  # delivered once (Method B)
    assert got.qos == 2 and got.payload == b"q2"
    s.send(Pubrec(got.packet_id))
    assert s.one(Pubrel).packet_id == got.packet_id
    s.send(Pubcomp(got.packet_id))
    assert not h.broker.sessions["s"].inflight


def test_pubrel_for_unknown_id_v5() -> None:
    h = Harness()
    c = h.connect("c", V5)
    c.send(Pubrel(99))
    comp = c.one(Pubcomp)
    assert comp.reason_code == RC.PACKET_IDENTIFIER_NOT_FOUND


def test_receive_maximum_exceeded_disconnects_v5() -> None:
    from helpers.mqtt_fakes import FakeStore

    store = FakeStore()
    h = Harness(receive_maximum=2, store=store)
    s = h.connect("s", V5, clean=False, props=props(session_expiry_interval=100))
    s.send(sub("t", 1))
    s.drop()  # offline persistent session: QoS 1 must be committed before PUBACK
    p = h.connect("p", V5)
    p.send(Publish("t", b"1", 1, packet_id=1), Publish("t", b"2", 1, packet_id=2))
    assert p.packets() == []  # both waiting for the commit
    p.send(Publish("t", b"3", 1, packet_id=3))
    assert p.one(Disconnect).reason_code == RC.RECEIVE_MAXIMUM_EXCEEDED


def test_acks_wait_for_commit_and_stay_in_order() -> None:
    from helpers.mqtt_fakes import FakeStore

    store = FakeStore()
    h = Harness(store=store)
    s = h.connect("s", V4, clean=False)
    s.send(sub("durable", 1))
    s.drop()
    p = h.connect("p", V4)
    p.send(Publish("durable", b"a", 1, packet_id=1),  # persisted: waits
           Publish("volatile", b"b", 1, packet_id=2),  # nothing to persist, but after #1
           Publish("durable", b"c", 2, packet_id=3))
    assert p.packets() == []
    store.commit()
    got = p.packets()
    assert [(type(x), x.packet_id) for x in got] == [(Puback, 1), (Puback, 2), (Pubrec, 3)]
    p.send(Publish("volatile", b"d", 1, packet_id=4))
    assert p.one(Puback).packet_id == 4  # nothing pending: at once


def test_publish_to_denied_topic() -> None:
    from helpers.mqtt_harness import AllowAcl

    h = Harness(acl=AllowAcl(deny=("secret",)))
    s = h.connect("s", V5)
    s.send(sub("#"))
    s.packets()
    p5 = h.connect("p5", V5)
    p5.send(Publish("secret/x", b"1", 1, packet_id=1), Publish("secret/x", b"2", 2, packet_id=2))
    got = p5.packets()
    assert [(type(x), x.reason_code) for x in got] == [(Puback, RC.NOT_AUTHORIZED),
                                                        (Pubrec, RC.NOT_AUTHORIZED)]
    p4 = h.connect("p4", V4)
    p4.send(Publish("secret/x", b"1", 1, packet_id=1))
    assert p4.one(Puback).packet_id == 1  # 3.1.1 cannot refuse: acknowledged and dropped
    assert s.publishes() == []
    s.send(sub("secret/#", pid=2))
    assert s.one(Suback).reason_codes == (RC.NOT_AUTHORIZED,)


def test_qos_above_maximum_and_retain_unavailable_disconnect() -> None:
    h = Harness(maximum_qos=1, retain_available=False)
    c = h.connect("c", V5)
    c.send(Publish("t", b"x", 2, packet_id=1))
    assert c.one(Disconnect).reason_code == RC.QOS_NOT_SUPPORTED
    c = h.connect("c2", V5)
    c.send(Publish("t", b"x", retain=True))
    assert c.one(Disconnect).reason_code == RC.RETAIN_NOT_SUPPORTED
    c = h.connect("c3", V5)
    c.send(sub("t", 2))
    assert c.one(Suback).reason_codes == (1,)  # downgraded


# --------------------------------------------------------------------------- topic aliases


def test_inbound_topic_alias() -> None:
    h = Harness(topic_alias_maximum=4)
    s = h.connect("s", V4)
    s.send(sub("a/b"))
    s.packets()
    p = h.connect("p", V5)
    p.send(Publish("a/b", b"1", properties=props(topic_alias=3)),
           Publish("", b"2", properties=props(topic_alias=3)))
    assert [(x.topic, x.payload) for x in s.publishes()] == [("a/b", b"1"), ("a/b", b"2")]
    p.send(Publish("", b"3", properties=props(topic_alias=2)))
    assert p.one(Disconnect).reason_code == RC.PROTOCOL_ERROR  # unknown alias
    p = h.connect("p2", V5)
    p.send(Publish("a/b", b"3", properties=props(topic_alias=5)))
    assert p.one(Disconnect).reason_code == RC.TOPIC_ALIAS_INVALID  # MQTT-3.3.2-9


def test_outbound_topic_alias() -> None:
    h = Harness()
    s = h.connect("s", V5, props=props(topic_alias_maximum=1))
    s.send(sub("#"))
    s.packets()
    p = h.connect("p", V4)
    p.send(Publish("a/b", b"1"), Publish("a/b", b"2"), Publish("c", b"3"))
    got = s.publishes()
    assert (got[0].topic, got[0].properties.topic_alias) == ("a/b", 1)
    assert (got[1].topic, got[1].properties.topic_alias) == ("", 1)
    assert (got[2].topic, got[2].properties.topic_alias) == ("c", None)  # all aliases used


def test_outbound_maximum_packet_size_drops_and_counts() -> None:
    h = Harness()
    s = h.connect("s", V5, props=props(maximum_packet_size=50))
    s.send(sub("t", 1))
    s.packets()
    p = h.connect("p", V4)
    p.send(Publish("t", b"x" * 100, 1, packet_id=1), Publish("t", b"small", 1, packet_id=2))
    assert [x.payload for x in s.publishes()] == [b"small"]
    assert h.broker.stats.dropped["packet_too_large"] == 1
    assert len(h.broker.sessions["s"].inflight) == 1  # the dropped one counts as delivered


# --------------------------------------------------------------------------- flow control


def test_paused_transport_queues_then_drops_qos0_first() -> None:
    h = Harness(max_queued_messages=3)
    s = h.connect("s", V4)
    s.send(sub("t", 1))
    s.packets()
    s.proto.pauseProducing()  # the transport's buffer is full
    p = h.connect("p", V4)
    p.send(Publish("t", b"a"), Publish("t", b"b", 1, packet_id=1), Publish("t", b"c"),
           Publish("t", b"d", 1, packet_id=2), Publish("t", b"e"))
    assert s.publishes() == []
    session = h.broker.sessions["s"]
    assert len(session.queue) == 3
    s.proto.resumeProducing()
    got = [x.payload for x in s.publishes()]
    assert got == [b"b", b"c", b"d"]  # "a" made room for "d", "e" found the queue full
    assert h.broker.stats.dropped["queue_full_qos0"] == 2


def test_inflight_window_respects_client_receive_maximum() -> None:
    h = Harness(max_inflight=10)
    s = h.connect("s", V5, props=props(receive_maximum=2))
    s.send(sub("t", 1))
    s.packets()
    p = h.connect("p", V4)
    for i in range(5):
        p.send(Publish("t", bytes([i]), 1, packet_id=i + 1))
    got = s.publishes()
    assert [x.payload for x in got] == [b"\x00", b"\x01"]
    s.send(Puback(got[0].packet_id))
    got2 = s.publishes()
    assert [x.payload for x in got2] == [b"\x02"]
    assert got2[0].packet_id not in {got[1].packet_id}  # MQTT-2.2.1-4


def test_unsubscribe_codes() -> None:
    h = Harness()
    c = h.connect("c", V5)
    c.send(sub("a"), Unsubscribe(2, ("a", "b")))
    got = c.packets()
    assert got[1] == Unsuback(2, (RC.SUCCESS, RC.NO_SUBSCRIPTION_EXISTED))


def test_disconnect_session_expiry_change_rules() -> None:
    h = Harness()
    c = h.connect("c", V5)  # expiry 0
    c.send(Disconnect(properties=props(session_expiry_interval=10)))
    assert c.one(Disconnect).reason_code == RC.PROTOCOL_ERROR  # MQTT-3.14.2-2
    c = h.connect("d", V5, clean=False, props=props(session_expiry_interval=10))
    c.send(Disconnect(properties=props(session_expiry_interval=0)))
    assert "d" not in h.broker.sessions


def test_internal_error_is_contained(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness()
    c = h.connect("c", V5)

    def boom(*a: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(h.broker, "subscribe", boom)
    c.send(sub("t"))
    assert c.one(Disconnect).reason_code == RC.IMPLEMENTATION_SPECIFIC_ERROR
    assert c.closed
    encode(Pingreq(), V4)  # the codec is untouched


def test_v311_publisher_outrunning_commits_stops_being_read() -> None:
    from helpers.mqtt_fakes import FakeStore

    store = FakeStore()
    h = Harness(receive_maximum=4, store=store)
    s = h.connect("s", V4, clean=False)
    s.send(sub("t", 1))
    s.drop()
    p = h.connect("p", V4)
    p.send(*(Publish("t", b"x", 1, packet_id=i) for i in range(1, 5)))
    assert p.transport.producerState == "paused"  # 4 acks waiting: reading stops
    store.commit()
    assert len(p.packets()) == 4
    assert p.transport.producerState == "producing"


def test_resend_after_reconnect_respects_a_smaller_receive_maximum() -> None:
    h = Harness()
    s = h.connect("s", V5, clean=False, props=props(session_expiry_interval=60))
    s.send(sub("t", 1))
    s.packets()
    p = h.connect("p", V4)
    for i in range(4):
        p.send(Publish("t", bytes([i]), 1, packet_id=i + 1))
    first = s.publishes()
    assert len(first) == 4
    s.drop()
    s = h.connect("s", V5, clean=False, props=props(session_expiry_interval=60,
                                                     receive_maximum=2))
    again = s.publishes()
    assert [(x.payload, x.dup, x.packet_id) for x in again] == [
        (f.payload, True, f.packet_id) for f in first[:2]]
    s.send(Puback(again[0].packet_id))
    third = s.publishes()
    assert [(x.payload, x.dup, x.packet_id) for x in third] == [
        (first[2].payload, True, first[2].packet_id)]
    p.send(Publish("t", b"new", 1, packet_id=9))
    s.send(Puback(again[1].packet_id), Puback(third[0].packet_id))
    rest = s.publishes()
    assert [x.payload for x in rest] == [first[3].payload, b"new"]
    assert rest[1].packet_id not in {f.packet_id for f in first[3:]}


def test_garbage_while_authenticating_closes_without_disconnect() -> None:
    auth = FakeAuth()
    auth.hold = True
    h = Harness(auth=auth)
    c = h.open(V5)
    c.send_raw(encode(Connect("c", V5), V5) + b"\x00\x00")
    assert c.packets() == [] and c.closed  # no DISCONNECT before a CONNACK (MQTT-3.2.0-1)
    auth.release()
    h.pump()
    assert c.packets() == [] and "c" not in h.broker.sessions
