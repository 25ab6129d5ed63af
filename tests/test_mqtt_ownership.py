"""Sessions belong to their user, wills meet the tag bridge's interception, wildcards that
overlap a deny rule, and the retained value of a tag under ``<tag>/#``, through the protocol
harness with the real ACL and the real bridge."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from helpers.mqtt_harness import Harness, props

from iotserver.mqtt.acl import Access, Acl, AclRule
from iotserver.mqtt.bridge import TagBridge
from iotserver.mqtt.packets import (
    MQTT_3_1_1,
    MQTT_5,
    Puback,
    Publish,
    Suback,
    Subscribe,
    SubscriptionOptions,
    Will,
)
from iotserver.security.users import Role, User, UserDB
from iotserver.tags.model import Access as TagAccess
from iotserver.tags.model import DataType, TagDef
from iotserver.tags.store import MemoryOwner, TagStore

V4, V5 = MQTT_3_1_1, MQTT_5
RW, R, D = Access.READWRITE, Access.READ, Access.DENY
USERS = UserDB(users={"erik": User("erik", Role.ENGINEER), "olga": User("olga", Role.OPERATOR),
                      "ada": User("ada", Role.ADMIN)})


def subscribe(c: Any, topic_filter: str, qos: int = 1, pid: int = 1) -> tuple[int, ...]:
    c.send(Subscribe(pid, ((topic_filter, SubscriptionOptions(qos)),)))
    got = c.packets()
    acks = [p for p in got if isinstance(p, Suback)]
    c.pending = [p for p in got if not isinstance(p, Suback)]
    assert len(acks) == 1, got
    return acks[0].reason_codes


def payloads(c: Any) -> list[bytes]:
    return [p.payload for p in c.publishes()]


# --------------------------------------------------------------------------- item 1: ownership


def per_user_acl() -> Acl:
    return Acl((AclRule("%u/#", RW), AclRule("shared/#", RW)))


def test_another_user_never_inherits_a_session() -> None:
    h = Harness(acl=per_user_acl())
    a = h.connect("dev", V5, clean=False, username="alice",
                  props=props(session_expiry_interval=600),
                  will=Will("alice/status", b"alice offline"))
    assert subscribe(a, "alice/#") == (1,)
    assert subscribe(a, "shared/#", pid=2) == (1,)
    a.drop()  # alice's will (no delay) goes now; the session stays
    watcher = h.connect("w", V4, username="alice")
    subscribe(watcher, "alice/#")
    p = h.connect("p", V4, username="alice")
    p.send(*(Publish("alice/secret", b"%d" % i, 1, packet_id=i + 1) for i in range(3)))
    assert len(h.broker.sessions["dev"].queue) == 3
    # bob brings alice's client id with clean start off: a fresh session, nothing of alice's
    b = h.connect("dev", V4, clean=False, username="bob")
    assert b.connack.session_present is False
    assert b.publishes() == []
    session = h.broker.sessions["dev"]
    assert session.user == "bob" and not session.subs and not session.queue
    assert h.broker.stats.sessions_reassigned == 1
    p.send(Publish("shared/x", b"for subscribers of shared/#", 1, packet_id=9))
    assert b.publishes() == []  # alice's subscription did not pass to bob
    b.drop()
    # and alice coming back does not get bob's (empty) session either
    a2 = h.connect("dev", V5, clean=False, username="alice",
                   props=props(session_expiry_interval=600))
    assert a2.connack.session_present is False
    assert h.broker.sessions["dev"].user == "alice"


def test_another_user_taking_a_connected_client_id_publishes_the_owners_will() -> None:
    h = Harness(acl=per_user_acl())
    watcher = h.connect("w", V4, username="alice")
    subscribe(watcher, "alice/#")
    a = h.connect("dev", V5, clean=False, username="alice",
                  props=props(session_expiry_interval=600),
                  will=Will("alice/status", b"alice gone", properties=props(
                      will_delay_interval=300)))
    subscribe(a, "alice/#")
    b = h.connect("dev", V5, clean=False, username="bob",
                  props=props(session_expiry_interval=600))
    assert a.closed
    assert b.connack.session_present is False
    # alice's session ended: her will is published now, under her rights (not delayed,
    # not cancelled as if alice had come back, and not bob's to publish)
    assert payloads(watcher) == [b"alice gone"]


def test_a_will_restored_after_a_restart_is_not_cancelled_by_another_user() -> None:
    h = Harness(acl=per_user_acl())
    watcher = h.connect("w", V4, username="alice")
    subscribe(watcher, "alice/#")
    h.broker.restore_will("dev", Will("alice/status", b"alice died", properties=props(
        will_delay_interval=60)), "alice", None)
    h.connect("dev", V4, username="bob")
    assert payloads(watcher) == [b"alice died"]


def test_queued_messages_are_checked_again_when_the_same_user_resumes() -> None:
    rules = [AclRule("plant/#", RW)]
    acl = Acl((), acl_file=None)
    acl._inline = tuple(rules)  # the rules as loaded; replaced below as a reload would
    h = Harness(acl=acl)
    c = h.connect("hist", V4, clean=False, username="hist")
    assert subscribe(c, "plant/#") == (1,)
    c.drop()
    p = h.connect("p", V4, username="hist")
    p.send(Publish("plant/a", b"a", 1, packet_id=1), Publish("plant/recipe/x", b"r", 1,
                                                              packet_id=2))
    assert len(h.broker.sessions["hist"].queue) == 2
    # the rules change while the client is away: recipes are no longer readable
    acl._inline = (AclRule("plant/recipe/#", D), AclRule("plant/#", RW))
    acl.reload()
    h.broker.acl_changed()
    c = h.connect("hist", V4, clean=False, username="hist")
    assert c.connack.session_present is True
    assert payloads(c) == [b"a"]
    assert h.broker.stats.dropped["not_authorized"] >= 1


def test_acl_reload_purges_the_queue_of_a_connected_reader() -> None:
    acl = Acl((AclRule("plant/#", RW),))
    h = Harness(acl=acl, max_inflight=1)
    c = h.connect("slow", V4, clean=False, username="u")
    subscribe(c, "plant/#")
    p = h.connect("p", V4, username="u")
    p.send(*(Publish(f"plant/{t}", t.encode(), 1, packet_id=i + 1)
             for i, t in enumerate(("a", "recipe", "b"))))
    assert payloads(c) == [b"a"]  # window 1: the rest waits in the queue
    acl._inline = (AclRule("plant/recipe", D), AclRule("plant/#", RW))
    acl.reload()
    h.broker.acl_changed()
    c.send(Puback(1))
    c.send(Puback(2))
    assert payloads(c) == [b"b"]


# --------------------------------------------------------------------------- item 6: wildcards


def test_wildcards_overlapping_a_deny_are_filtered_at_delivery() -> None:
    h = Harness(acl=Acl((AclRule("test/nosubscribe", D), AclRule("#", RW))))
    v5 = h.connect("s5", V5, username="u")
    v4 = h.connect("s4", V4, username="u")
    assert subscribe(v5, "#") == (1,)
    assert subscribe(v5, "+/+", pid=2) == (1,)
    assert subscribe(v4, "#") == (1,)
    assert subscribe(v5, "test/nosubscribe", pid=3) == (0x87,)
    assert subscribe(v4, "test/nosubscribe", pid=2) == (0x80,)
    p = h.connect("p", V4, username="u")
    p.send(Publish("test/nosubscribe", b"hidden", 1, packet_id=1),
           Publish("test/ok", b"seen", 1, packet_id=2))
    assert payloads(v5) == [b"seen"]
    assert payloads(v4) == [b"seen"]


# --------------------------------------------------------------------------- bridge fixtures


def bridged(acl: Acl | None = None) -> SimpleNamespace:
    h = Harness(acl=acl)
    store = TagStore(h.clock)
    store.register_owner("memory", MemoryOwner(store))
    store.define(TagDef("L1/Pump1", DataType.FLOAT64, initial=1.5, access=TagAccess.READ_WRITE))
    store.define(TagDef("L1/Pump1/Speed", DataType.FLOAT64, initial=2.5,
                        access=TagAccess.READ_WRITE))
    core = SimpleNamespace(store=store, clock=h.clock, signals=None, users=USERS)
    bridge = TagBridge(core, h.broker, SimpleNamespace(bridge=SimpleNamespace()))
    bridge.start()
    h.pump()
    return SimpleNamespace(h=h, store=store, bridge=bridge, broker=h.broker)


def admin_acl() -> Acl:
    return Acl((), users=USERS, prefix="iotserver")


# --------------------------------------------------------------------------- item 2: wills


def test_a_will_on_a_tag_value_topic_is_consumed_not_passed_on() -> None:
    env = bridged(admin_acl())
    watcher = env.h.connect("w", V4, username="ada")
    subscribe(watcher, "iotserver/tags/#", qos=0)
    watcher.publishes()  # the retained values
    c = env.h.connect("dev", V5, username="ada", will=Will(
        "iotserver/tags/L1/Pump1", b'{"v": 999, "q": "Good"}'))
    c.drop()
    assert watcher.publishes() == []  # no fake tag value
    assert env.store.read("L1/Pump1").value == 1.5


def test_a_will_on_a_set_topic_is_a_write_with_the_owners_role() -> None:
    env = bridged(admin_acl())
    watcher = env.h.connect("w", V4, username="erik")
    subscribe(watcher, "iotserver/tags/L1/Pump1/#", qos=0)
    watcher.publishes()
    c = env.h.connect("eng", V5, username="erik", will=Will(
        "iotserver/tags/L1/Pump1/Speed/set", b"0"))
    c.drop()
    env.h.pump()
    got = {p.topic: p.payload for p in watcher.publishes()}
    assert "iotserver/tags/L1/Pump1/Speed/set" not in got  # not forwarded as a message
    assert json.loads(got["iotserver/tags/L1/Pump1/Speed/set/result"]) == {"ok": True}
    assert env.store.read("L1/Pump1/Speed").value == 0.0
    # an operator's will on a set topic is refused like the operator's PUBLISH would be
    c = env.h.connect("op", V5, username="olga", will=Will(
        "iotserver/tags/L1/Pump1/Speed/set", b"7"))
    c.drop()
    assert env.store.read("L1/Pump1/Speed").value == 0.0


def test_a_restored_will_meets_the_bridge_too() -> None:
    env = bridged(admin_acl())
    watcher = env.h.connect("w", V4, username="ada")
    subscribe(watcher, "iotserver/tags/#", qos=0)
    watcher.publishes()
    env.broker.restore_will("dead", Will("iotserver/tags/L1/Pump1", b"fake"), "ada", None)
    env.broker.restore_will("dead2", Will("iotserver/tags/L1/Pump1/Speed/set", b"3"),
                            "erik", None)
    env.h.advance(1)
    got = watcher.publishes()
    # the write's result and the tag's new value; no fake value, no forwarded request
    assert sorted(p.topic for p in got) == ["iotserver/tags/L1/Pump1/Speed",
                                            "iotserver/tags/L1/Pump1/Speed/set/result"]
    assert env.store.read("L1/Pump1/Speed").value == 3.0
    assert env.store.read("L1/Pump1").value == 1.5


# --------------------------------------------------------------------------- item 3: retained


def test_a_tag_under_its_own_hash_filter_gets_its_retained_value() -> None:
    env = bridged()
    c = env.h.connect("r", V4)
    subscribe(c, "iotserver/tags/L1/Pump1/#", qos=0)
    got = {p.topic for p in c.publishes() if p.retain}
    assert got == {"iotserver/tags/L1/Pump1", "iotserver/tags/L1/Pump1/Speed"}  # 4.7.1-2


LEVELS = ("a", "b", "set", "x")


def reference_match(topic_filter: str, topic: str) -> bool:
    """MQTT 4.7 written out plainly: '+' one level, '#' the rest including the parent level,
    and no wildcard first level for '$' topics."""
    f, t = topic_filter.split("/"), topic.split("/")
    if t[0].startswith("$") and f[0] in ("+", "#"):
        return False

    def m(i: int, j: int) -> bool:
        if i == len(f):
            return j == len(t)
        if f[i] == "#":
            return True
        if j == len(t):
            return False
        return (f[i] == "+" or f[i] == t[j]) and m(i + 1, j + 1)

    return m(0, 0)


paths = st.lists(st.lists(st.sampled_from(LEVELS), min_size=1, max_size=4).map("/".join),
                 min_size=1, max_size=12, unique=True)
filter_levels = st.lists(st.sampled_from((*LEVELS, "+")), min_size=0, max_size=4)
heads = st.sampled_from(["iotserver/tags", "iotserver/+", "+/tags", "+/+", "iotserver", "",
                         "other/tags"])


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = [*draw(heads).split("/"), *draw(filter_levels)]
    levels = [x for x in levels if x]
    if draw(st.booleans()) or not levels:
        levels.append("#")
    return "/".join(levels)


@settings(max_examples=150, deadline=None)
@given(paths, filters())
def test_every_filter_matching_a_tag_topic_gets_its_retained_value(
        tag_paths: list[str], topic_filter: str) -> None:
    h = Harness()
    store = TagStore(h.clock)
    store.register_owner("memory", MemoryOwner(store))
    for path in tag_paths:
        store.define(TagDef(path, DataType.FLOAT64, initial=1.0))
    core = SimpleNamespace(store=store, clock=h.clock, signals=None, users=None)
    TagBridge(core, h.broker, SimpleNamespace(bridge=SimpleNamespace())).start()
    c = h.connect("r", V4)
    c.send(Subscribe(1, ((topic_filter, SubscriptionOptions(0)),)))
    got = sorted(p.topic for p in c.publishes())
    want = sorted(f"iotserver/tags/{p}" for p in tag_paths
                  if reference_match(topic_filter, f"iotserver/tags/{p}"))
    assert got == want, topic_filter
