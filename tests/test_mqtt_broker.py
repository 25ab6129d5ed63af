"""Broker behaviour through the protocol harness: routing, retained messages, wills, sessions,
shared subscriptions, message expiry, properties, interceptors, limits, $SYS."""

from __future__ import annotations

import pytest
from helpers.mqtt_fakes import FakeStore
from helpers.mqtt_harness import Harness, props
from twisted.internet.defer import Deferred

from iotserver.mqtt.broker import RetainedStore
from iotserver.mqtt.packets import (
    MQTT_3_1_1,
    MQTT_5,
    Disconnect,
    Puback,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
    RetainHandling,
    Suback,
    Subscribe,
    SubscriptionOptions,
    Will,
)
from iotserver.mqtt.session import Message
from iotserver.mqtt.sys_topics import SysPublisher

RC = ReasonCode
V4, V5 = MQTT_3_1_1, MQTT_5


def sub(topic: str, qos: int = 0, pid: int = 1, subid: int | None = None,
        **opts: object) -> Subscribe:
    p = props(subscription_identifiers=(subid,)) if subid else props()
    return Subscribe(pid, ((topic, SubscriptionOptions(qos, **opts)),), p)  # type: ignore[arg-type]


def subscribed(h: Harness, cid: str, *filters: str, version: int = V5, qos: int = 0,
               **kw: object) -> object:
    c = h.connect(cid, version, **kw)  # type: ignore[arg-type]
    for i, f in enumerate(filters):
        c.send(sub(f, qos, pid=i + 1))
    c.pending = [p for p in c.packets() if not isinstance(p, Suback)]  # type: ignore[attr-defined]
    return c


def payloads(c: object) -> list[bytes]:
    return [p.payload for p in c.publishes()]  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- routing


def test_wildcards_and_dollar_topics() -> None:
    h = Harness()
    a = subscribed(h, "a", "#")
    b = subscribed(h, "b", "+/x")
    s = subscribed(h, "s", "$SYS/#")
    p = h.connect("p", V4)
    p.send(Publish("k/x", b"1"), Publish("$SYS/x", b"2"), Publish("k", b"3"))
    assert payloads(a) == [b"1", b"3"]  # MQTT-4.7.2-1: '#' does not match $SYS
    assert payloads(b) == [b"1"]
    assert payloads(s) == [b"2"]


def test_overlapping_subscriptions_delivered_once_at_max_qos_with_all_ids() -> None:
    h = Harness()
    c = h.connect("c", V5)
    c.send(sub("a/#", 0, pid=1, subid=1), sub("a/+", 1, pid=2, subid=2))
    c.packets()
    p = h.connect("p", V4)
    p.send(Publish("a/b", b"x", 2, packet_id=1))
    got = c.publishes()
    assert len(got) == 1 and got[0].qos == 1  # QoS min(max granted, published)
    assert got[0].properties.subscription_identifiers == (1, 2)


def test_no_local() -> None:
    h = Harness()
    c = h.connect("c", V5)
    c.send(sub("t", no_local=True))
    c.packets()
    c.send(Publish("t", b"own"))
    assert c.publishes() == []
    h.connect("p", V5).send(Publish("t", b"other"))
    assert payloads(c) == [b"other"]


def test_v5_properties_pass_through_and_v311_receivers_get_plain() -> None:
    h = Harness()
    c5 = subscribed(h, "c5", "t")
    c4 = subscribed(h, "c4", "t", version=V4)
    p = h.connect("p", V5)
    pp = props(payload_format_indicator=1, content_type="application/json",
               response_topic="reply/here", correlation_data=b"\x01\x02",
               user_properties=(("k", "v"), ("k", "w")))
    p.send(Publish("t", b"{}", properties=pp))
    got = c5.publishes()[0].properties
    assert got == pp
    assert c4.publishes()[0].payload == b"{}"


# --------------------------------------------------------------------------- retained


def test_retained_set_replace_clear_and_retain_flags() -> None:
    h = Harness()
    p = h.connect("p", V4)
    p.send(Publish("r/a", b"1", retain=True), Publish("r/a", b"2", retain=True),
           Publish("r/b", b"3", 1, retain=True, packet_id=1))
    c = subscribed(h, "c", "r/#", qos=1)
    got = sorted((x.topic, x.payload, x.retain) for x in c.publishes())
    assert got == [("r/a", b"2", True), ("r/b", b"3", True)]  # MQTT-3.3.1-9: RETAIN set
    p.send(Publish("r/a", b"4", retain=True))
    live = c.publishes()
    assert (live[0].payload, live[0].retain) == (b"4", False)  # MQTT-3.3.1-12 (no RAP)
    p.send(Publish("r/a", b"", retain=True))  # clear (MQTT-3.3.1-10), still forwarded
    assert payloads(c) == [b""]
    assert len(h.broker.retained) == 1
    d = subscribed(h, "d", "r/#")
    assert payloads(d) == [b"3"]


def test_retain_handling_and_retain_as_published() -> None:
    h = Harness()
    h.connect("p", V4).send(Publish("r", b"kept", retain=True))
    c = h.connect("c", V5)
    c.send(sub("r", retain_handling=RetainHandling.DO_NOT_SEND))
    assert c.publishes() == []
    c.send(sub("r", pid=2, retain_handling=RetainHandling.SEND_IF_NEW_SUBSCRIPTION))
    assert c.publishes() == []  # existed already
    c.send(sub("r", pid=3))  # 0: always
    assert payloads(c) == [b"kept"]
    c.send(sub("x", pid=4, retain_as_published=True))
    c.packets()
    h.connect("p2", V4).send(Publish("x", b"y", retain=True))
    assert c.publishes()[0].retain is True


def test_retained_limit_counts() -> None:
    h = Harness(max_retained=2)
    p = h.connect("p", V4)
    for i in range(3):
        p.send(Publish(f"r/{i}", b"x", retain=True))
    assert len(h.broker.retained) == 2
    assert h.broker.stats.dropped["retained_limit"] == 1


def test_retained_store_trie_matching() -> None:
    store = RetainedStore()
    for topic in ("a", "a/b", "a/b/c", "$SYS/x", "b//c", "/lead"):
        store.set(Message(topic, b"1"))
    m = lambda f: sorted(x.topic for x in store.match(f))  # noqa: E731
    assert m("#") == ["/lead", "a", "a/b", "a/b/c", "b//c"]
    assert m("a/#") == ["a", "a/b", "a/b/c"]
    assert m("+/b") == ["a/b"]
    assert m("+") == ["a"]
    assert m("$SYS/#") == ["$SYS/x"]
    assert m("b/+/c") == ["b//c"]
    assert m("+/lead") == ["/lead"]
    store.remove("a/b")
    assert m("a/#") == ["a", "a/b/c"]


# --------------------------------------------------------------------------- wills


def test_will_on_abrupt_close_not_on_normal_disconnect_but_on_0x04() -> None:
    h = Harness()
    w = subscribed(h, "w", "will/#")
    c = h.connect("c1", V5, will=Will("will/c1", b"gone", retain=True))
    c.drop()
    assert payloads(w) == [b"gone"]
    assert h.broker.retained.get("will/c1") is not None
    c = h.connect("c2", V5, will=Will("will/c2", b"gone"))
    c.send(Disconnect())
    assert payloads(w) == []  # MQTT-3.14.4-3
    c = h.connect("c3", V5, will=Will("will/c3", b"asked"))
    c.send(Disconnect(RC.DISCONNECT_WITH_WILL_MESSAGE))
    assert payloads(w) == [b"asked"]
    c = h.connect("c4", V4, will=Will("will/c4", b"ka"), keepalive=2)
    h.advance(3.1)
    assert payloads(w) == [b"ka"]


def test_will_delay_cancelled_by_reconnect_and_sent_at_session_end() -> None:
    h = Harness()
    w = subscribed(h, "w", "will/#")
    will = Will("will/c", b"late", properties=props(will_delay_interval=10))
    c = h.connect("c", V5, clean=False, will=will, props=props(session_expiry_interval=100))
    c.drop()
    h.advance(5)
    assert payloads(w) == []
    h.connect("c", V5, clean=False, props=props(session_expiry_interval=100)).drop()
    h.advance(20)
    assert payloads(w) == []  # the reconnect cancelled it (MQTT-3.1.3-9)
    c = h.connect("d", V5, clean=False, will=Will("will/d", b"end", properties=props(
        will_delay_interval=50)), props=props(session_expiry_interval=3))
    c.drop()
    h.advance(3.1)
    assert payloads(w) == [b"end"]  # session ended before the delay
    assert "d" not in h.broker.sessions
    got_props = None
    c = h.connect("e", V5, will=Will("will/e", b"x", properties=props(
        will_delay_interval=1, content_type="text/plain")), props=props(
        session_expiry_interval=10))
    c.drop()
    h.advance(1.1)
    got = w.publishes()  # type: ignore[attr-defined]
    got_props = got[0].properties
    assert got_props.content_type == "text/plain" and got_props.will_delay_interval is None


# --------------------------------------------------------------------------- sessions


@pytest.mark.parametrize("version", [V4, V5])
def test_persistent_session_queues_qos1_2_not_qos0_and_redelivers_with_dup(version: int) -> None:
    h = Harness()
    kw = {"clean": False}
    if version == V5:
        kw["props"] = props(session_expiry_interval=100)  # type: ignore[assignment]
    c = h.connect("c", version, **kw)  # type: ignore[arg-type]
    c.send(sub("t", 2))
    c.packets()
    p = h.connect("p", V4)
    p.send(Publish("t", b"q1-a", 1, packet_id=1))
    first = c.one(Publish)
    c.drop()  # unacknowledged
    p.send(Publish("t", b"q0", 0), Publish("t", b"q1-b", 1, packet_id=2),
           Publish("t", b"q2", 2, packet_id=3), Pubrel(3))
    c = h.connect("c", version, **kw)  # type: ignore[arg-type]
    assert c.connack.session_present is True
    got = c.publishes()
    assert [(x.payload, x.dup) for x in got] == [(b"q1-a", True), (b"q1-b", False),
                                                 (b"q2", False)]
    assert got[0].packet_id == first.packet_id  # MQTT-4.4.0-1


def test_qos2_pubrel_resent_after_reconnect() -> None:
    h = Harness()
    c = h.connect("c", V4, clean=False)
    c.send(sub("t", 2))
    c.packets()
    h.connect("p", V4).send(Publish("t", b"x", 2, packet_id=1))
    got = c.one(Publish)
    c.send(Pubrec(got.packet_id))
    assert c.one(Pubrel).packet_id == got.packet_id
    c.drop()
    c = h.connect("c", V4, clean=False)
    assert c.one(Pubrel).packet_id == got.packet_id


def test_clean_start_discards_session() -> None:
    h = Harness()
    c = h.connect("c", V4, clean=False)
    c.send(sub("t", 1))
    c.drop()
    h.connect("p", V4).send(Publish("t", b"x", 1, packet_id=1))
    c = h.connect("c", V4, clean=True)
    assert c.connack.session_present is False and c.publishes() == []
    assert not h.broker.sessions["c"].subs


def test_take_over_sends_0x8e_to_the_old_connection() -> None:
    h = Harness()
    w = subscribed(h, "w", "will/#")
    old = h.connect("c", V5, clean=False, props=props(session_expiry_interval=60),
                    will=Will("will/c", b"old will"))
    old.send(sub("t", 1))
    old.packets()
    new = h.connect("c", V5, clean=False, props=props(session_expiry_interval=60))
    assert old.one(Disconnect).reason_code == RC.SESSION_TAKEN_OVER
    assert old.closed and new.connack.session_present
    assert payloads(w) == [b"old will"]  # will delay 0: published at take-over
    h.connect("p", V4).send(Publish("t", b"to new"))
    assert payloads(new) == [b"to new"]
    assert h.broker.clients["c"] is new.proto


def test_session_expiry() -> None:
    h = Harness()
    c = h.connect("c", V5, clean=False, props=props(session_expiry_interval=30))
    c.send(sub("t", 1))
    c.drop()
    h.advance(29)
    assert "c" in h.broker.sessions
    h.advance(2)
    assert "c" not in h.broker.sessions
    assert h.broker.subscription_count == 0


def test_offline_queue_limits() -> None:
    h = Harness(max_queued_messages=2)
    c = h.connect("c", V4, clean=False)
    c.send(sub("t", 1))
    c.drop()
    p = h.connect("p", V4)
    for i in range(4):
        p.send(Publish("t", bytes([i]), 1, packet_id=i + 1))
    assert len(h.broker.sessions["c"].queue) == 2
    assert h.broker.stats.dropped["queue_full"] == 2
    c = h.connect("c", V4, clean=False)
    assert payloads(c) == [b"\x00", b"\x01"]


def test_max_subscriptions() -> None:
    h = Harness(max_subscriptions=2)
    c = h.connect("c", V5)
    c.send(Subscribe(1, tuple((f, SubscriptionOptions()) for f in ("a", "b", "c", "a"))))
    assert c.one(Suback).reason_codes == (0, 0, RC.QUOTA_EXCEEDED, 0)


def test_invalid_filters_refused_per_entry() -> None:
    h = Harness()
    c = h.connect("c", V5)
    c.send(Subscribe(1, tuple((f, SubscriptionOptions()) for f in
                              ("a/#/b", "$share/g", "$share/g+/x", "ok"))))
    assert c.one(Suback).reason_codes == (RC.TOPIC_FILTER_INVALID,) * 3 + (0,)


# --------------------------------------------------------------------------- shared subscriptions


def test_shared_subscription_round_robin_and_no_retained() -> None:
    h = Harness()
    h.connect("p0", V4).send(Publish("s/x", b"ret", retain=True))
    members = [subscribed(h, f"m{i}", "$share/g/s/#") for i in range(3)]
    plain = subscribed(h, "plain", "s/#")
    assert all(payloads(m) == [] for m in members)  # retained not sent to shared subs
    assert payloads(plain) == [b"ret"]
    p = h.connect("p", V4)
    for i in range(6):
        p.send(Publish("s/x", bytes([i])))
    counts = [len(payloads(m)) for m in members]
    assert counts == [2, 2, 2]
    assert len(payloads(plain)) == 6
    members[0].drop()
    for i in range(4):
        p.send(Publish("s/x", bytes([i])))
    assert [len(payloads(m)) for m in members[1:]] == [2, 2]


# --------------------------------------------------------------------------- expiry


def test_message_expiry_forwarded_and_queued_expired_dropped() -> None:
    h = Harness()
    c = h.connect("c", V5, clean=False, props=props(session_expiry_interval=100))
    c.send(sub("t", 1))
    c.packets()
    p = h.connect("p", V5)
    p.send(Publish("t", b"live", 1, packet_id=1, properties=props(message_expiry_interval=60)))
    assert c.publishes()[0].properties.message_expiry_interval == 60
    c.drop()
    p.send(Publish("t", b"short", 1, packet_id=2, properties=props(message_expiry_interval=5)),
           Publish("t", b"long", 1, packet_id=3, properties=props(message_expiry_interval=50)))
    h.advance(10)
    c = h.connect("c", V5, clean=False, props=props(session_expiry_interval=100))
    got = [x for x in c.publishes() if not x.dup]
    assert [x.payload for x in got] == [b"long"]
    assert got[0].properties.message_expiry_interval == 40  # MQTT-3.3.2-6
    assert h.broker.stats.dropped["expired"] >= 1


def test_expired_retained_message_not_sent() -> None:
    h = Harness()
    h.connect("p", V5).send(Publish("r", b"x", retain=True,
                                    properties=props(message_expiry_interval=5)))
    h.advance(6)
    c = subscribed(h, "c", "r")
    assert payloads(c) == [] and len(h.broker.retained) == 0


# --------------------------------------------------------------------------- persistence hooks


def test_persistent_session_operations_reach_the_store() -> None:
    store = FakeStore()
    h = Harness(store=store)
    c = h.connect("c", V4, clean=False)
    c.send(sub("t", 1))
    c.drop()
    h.connect("p", V4).send(Publish("t", b"x", 1, packet_id=1), Publish("r", b"y", retain=True))
    kinds = [op[0] for op in store.ops]
    assert kinds[:2] == ["session", "sub"] and "q_add" in kinds and "r_put" in kinds
    c = h.connect("c", V4, clean=False)
    got = c.one(Publish)
    c.send(Puback(got.packet_id))
    assert store.ops[-1][0] == "q_del"
    c.send(Disconnect())
    h.connect("c", V4, clean=True)
    assert ("session_del", "c") in store.ops


def test_volatile_retained_topics_are_not_persisted() -> None:
    store = FakeStore()
    h = Harness(store=store)
    h.broker.volatile_retained = (*h.broker.volatile_retained, "iotserver/tags/")
    h.broker.publish_internal("iotserver/tags/A/x", b"1", retain=True)
    h.broker.publish_internal("plant/status", b"up", retain=True)
    h.broker.publish_internal("$SYS/broker/x", b"2", retain=True)
    puts = [op for op in store.ops if op[0] == "r_put"]
    assert len(puts) == 1 and "plant/status" in repr(puts[0])
    assert len(h.broker.retained) == 3  # all three are still retained in memory
    c = subscribed(h, "c", "iotserver/tags/#")
    assert payloads(c) == [b"1"]


# --------------------------------------------------------------------------- interceptors


def test_interceptor_consumes_and_delays_ack_with_reason_code() -> None:
    h = Harness()
    seen: list[tuple[str, str | None, bytes]] = []
    pending: list[Deferred[object]] = []

    def on_set(cid: str, user: str | None, pub: Publish) -> Deferred[object]:
        seen.append((cid, user, pub.payload))
        d: Deferred[object] = Deferred()
        pending.append(d)
        return d

    handle = h.broker.add_interceptor("cmd/+/set", on_set)
    h.broker.add_interceptor("obs/#", lambda c, u, p: None, route=True)
    s = subscribed(h, "s", "#")
    p = h.connect("p", V5, username="alice")
    p.send(Publish("cmd/x/set", b"1", 1, packet_id=1), Publish("obs/y", b"2", 1, packet_id=2))
    assert seen == [("p", "alice", b"1")]
    assert p.packets() == []  # waiting for the interceptor, in order
    assert payloads(s) == [b"2"]  # consumed one not routed, route=True one routed
    pending[0].callback(RC.NOT_AUTHORIZED)
    got = p.packets()
    assert [(type(x), x.packet_id, x.reason_code) for x in got] == [
        (Puback, 1, RC.NOT_AUTHORIZED), (Puback, 2, RC.SUCCESS)]
    assert h.broker.remove_interceptor(handle)
    p.send(Publish("cmd/x/set", b"3"))
    assert payloads(s) == [b"3"]


def test_publish_internal_routes_and_retains() -> None:
    h = Harness()
    s = subscribed(h, "s", "tags/#", qos=1)
    h.broker.publish_internal("tags/a", b"1", qos=1, retain=True,
                              properties=props(content_type="json"))
    got = s.publishes()
    assert got[0].payload == b"1" and got[0].properties.content_type == "json"
    assert h.broker.retained.get("tags/a") is not None
    with pytest.raises(ValueError):
        h.broker.publish_internal("bad/#", b"")


# --------------------------------------------------------------------------- $SYS


def test_sys_topics_published_periodically() -> None:
    h = Harness()
    s = subscribed(h, "s", "$SYS/broker/clients/connected", "$SYS/broker/uptime")
    sys_pub = SysPublisher(h.broker, 10)
    sys_pub.start()
    try:
        got = {x.topic: x.payload for x in s.publishes()}
        assert got["$SYS/broker/clients/connected"] == b"1"
        h.connect("other", V4)
        h.advance(10)
        got = {x.topic: x.payload for x in s.publishes()}
        assert got["$SYS/broker/clients/connected"] == b"2"
        assert got["$SYS/broker/uptime"] == b"10 seconds"
    finally:
        sys_pub.stop()


def test_admin_disconnect() -> None:
    h = Harness()
    c = h.connect("c", V5)
    assert h.broker.disconnect("c")
    assert c.one(Disconnect).reason_code == RC.ADMINISTRATIVE_ACTION
    assert not h.broker.disconnect("nobody")


@pytest.mark.parametrize("version", [V4, V5])
@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("size", [0, 10, 200, 20000])
def test_plain_encoding_matches_the_codec(version: int, qos: int, size: int) -> None:
    from iotserver.mqtt.codec import encode_publish_with_offset

    for retain in (False, True):
        msg = Message("a/ü/c", b"p" * size, qos, retain)
        got = msg.encode(version, qos, retain)
        assert got == encode_publish_with_offset("a/ü/c", b"p" * size, qos, retain, False,
                                                 1 if qos else None, None, version)
