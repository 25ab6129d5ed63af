"""Acknowledge only what is durable: the CONNACK of a persistent
session, SUBACK and UNSUBACK, the PUBREL of an outgoing QoS 2 message and the PUBREC/PUBCOMP
of an incoming one each wait for the commit that holds their state. Protocol harness with a
store whose commits the test triggers; the real kill -9 runs are in test_mqtt_kill9.py."""

from __future__ import annotations

from helpers.mqtt_fakes import FakeStore
from helpers.mqtt_harness import Harness

from iotserver.mqtt.packets import (
    MQTT_3_1_1,
    MQTT_5,
    Connack,
    Connect,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    SubscriptionOptions,
    Unsuback,
    Unsubscribe,
)
from iotserver.mqtt.persistence import restore
from iotserver.mqtt.session import RELEASED

V4, V5 = MQTT_3_1_1, MQTT_5


def test_connack_of_a_persistent_session_waits_for_the_commit() -> None:
    store = FakeStore()
    h = Harness(store=store)
    p = h.connect("p", V4)
    c = h.open(V4)
    c.send(Connect("dur", V4, False, 0),
           Subscribe(1, (("t", SubscriptionOptions(1)),)))  # pipelined behind the CONNECT
    assert c.packets() == []
    store.commit()
    got = c.packets()
    assert isinstance(got[0], Connack) and got[0].reason_code == 0
    assert ("session", "dur", h.broker.sessions["dur"].expiry) in store.ops
    assert not any(isinstance(p, Suback) for p in got)  # the SUBACK waits for its own commit
    store.commit()
    assert [type(x) for x in c.packets()] == [Suback]
    p.send(Publish("t", b"x", 0))
    assert [x.payload for x in c.publishes()] == [b"x"]


def test_nothing_is_sent_to_a_resumed_session_before_its_connack() -> None:
    store = FakeStore()
    h = Harness(store=store)
    c = h.connect("dur", V4, clean=False)
    c.send(Subscribe(1, (("t", SubscriptionOptions(1)),)))
    store.commit()
    c.packets()
    c.drop()
    p = h.connect("p", V4)
    p.send(Publish("t", b"queued", 1, packet_id=1))
    c = h.open(V4)
    c.send(Connect("dur", V4, False, 0))
    p.send(Publish("t", b"while waiting", 1, packet_id=2))
    assert c.packets() == []
    store.commit()
    got = c.packets()
    assert isinstance(got[0], Connack) and got[0].session_present
    assert [x.payload for x in got[1:]] == [b"queued", b"while waiting"]


def test_suback_and_unsuback_wait_for_the_commit() -> None:
    store = FakeStore()
    h = Harness(store=store)
    c = h.connect("dur", V5, clean=False, props=_expiry(600))
    c.send(Subscribe(1, (("a/#", SubscriptionOptions(1)), ("b", SubscriptionOptions(0)))))
    assert c.packets() == []
    assert ("sub", "dur", "a/#") in store.ops
    store.commit()
    assert c.one(Suback).reason_codes == (1, 0)
    c.send(Unsubscribe(2, ("b",)))
    assert c.packets() == []
    store.commit()
    assert c.one(Unsuback).reason_codes == (0,)
    # a clean session has nothing to store: answered at once
    k = h.connect("clean", V4)
    k.send(Subscribe(1, (("a/#", SubscriptionOptions(1)),)))
    assert k.one(Suback).reason_codes == (1,)


def test_pubrel_goes_out_only_once_released_is_durable() -> None:
    store = FakeStore()
    h = Harness(store=store)
    c = h.connect("dur", V4, clean=False)
    c.send(Subscribe(1, (("t", SubscriptionOptions(2)),)))
    store.commit()
    c.packets()
    h.connect("p", V4).send(Publish("t", b"once", 2, packet_id=7))
    store.commit()
    got = c.one(Publish)
    c.send(Pubrec(got.packet_id))
    c.send(Pubrec(got.packet_id))  # a repeated PUBREC does not hurry it either
    assert c.packets() == []
    d = h.broker.sessions["dur"].inflight[got.packet_id]
    assert d.state == RELEASED and store.ops[-1][0] == "q_upd" and store.ops[-1][4] == RELEASED
    store.commit()
    assert c.one(Pubrel).packet_id == got.packet_id
    c.send(Pubcomp(got.packet_id))
    # a reconnect before the commit does not send it early either
    h.connect("p", V4).send(Publish("t", b"twice", 2, packet_id=8))
    store.commit()
    got = c.one(Publish)
    c.send(Pubrec(got.packet_id))
    c.drop()
    c = h.open(V4)
    c.send(Connect("dur", V4, False, 0))
    pubrels = [p for p in c.packets() if isinstance(p, Pubrel)]
    assert pubrels == []
    store.commit()  # the CONNACK's commit also covers RELEASED
    got2 = c.packets()
    assert [p.packet_id for p in got2 if isinstance(p, Pubrel)] == [got.packet_id]


def test_inbound_qos2_state_is_durable_before_pubrec_and_pubcomp() -> None:
    store = FakeStore()
    h = Harness(store=store)
    p = h.connect("pub", V4, clean=False)
    p.send(Publish("nobody/listens", b"x", 2, packet_id=5))
    assert p.packets() == []  # PUBREC waits: the packet id must survive a restart
    assert ("in_add", "pub", 5) in store.ops
    store.commit()
    assert p.one(Pubrec).packet_id == 5
    p.send(Publish("nobody/listens", b"x", 2, packet_id=5, dup=True))  # resent: not routed
    store.commit()
    assert p.one(Pubrec).packet_id == 5
    p.send(Pubrel(5))
    assert p.packets() == []  # PUBCOMP waits: the id may be reused for a new message after it
    assert ("in_del", "pub", 5) in store.ops
    store.commit()
    assert p.one(Pubcomp).packet_id == 5


def test_restart_restores_inbound_qos2_ids() -> None:
    from iotserver.mqtt.persistence import Snapshot

    h = Harness(store=FakeStore())
    snap = Snapshot(sessions=[("pub", 600, 4, None, None)], inbound=[("pub", 9)])
    h.broker.store.local = lambda wall: wall  # type: ignore[attr-defined]
    restore(h.broker, snap)
    s = h.connect("s", V4)
    s.send(Subscribe(1, (("t", SubscriptionOptions(2)),)))
    s.packets()
    p = h.connect("pub", V4, clean=False)
    assert p.connack.session_present  # type: ignore[attr-defined]
    p.send(Publish("t", b"resent after the restart", 2, packet_id=9, dup=True))
    h.broker.store.commit()  # type: ignore[attr-defined]
    assert p.one(Pubrec).packet_id == 9
    assert s.publishes() == []  # it was routed before the restart: not again


def _expiry(seconds: int) -> object:
    from helpers.mqtt_harness import props

    return props(session_expiry_interval=seconds)
