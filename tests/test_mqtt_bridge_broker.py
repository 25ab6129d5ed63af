"""The tag bridge on the real broker: the tag store answers for the retained tag topics, the
fast publish path, and the JSON payloads it formats itself."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from helpers.mqtt_harness import Harness

from iotserver.mqtt.bridge import TagBridge, TagJson, _IsoClock, json_text, json_value
from iotserver.mqtt.packets import (
    MQTT_5,
    Publish,
    Subscribe,
    SubscriptionOptions,
)
from iotserver.mqtt.session import Message
from iotserver.mqtt.sys_topics import sys_values
from iotserver.mqtt.topics import filter_may_match_prefix
from iotserver.tags.model import DataType, Quality, TagDef, TagValue, Update
from iotserver.tags.store import MemoryOwner, TagStore

T0 = 1_700_000_000 * 10**9  # 2023-11-14T22:13:20Z


def make(publish: tuple[str, ...] = ("**",), retain: bool = True) -> SimpleNamespace:
    h = Harness()
    h.clock.advance(T0 / 1e9 - h.clock.seconds())
    store = TagStore(h.clock)
    store.register_owner("memory", MemoryOwner(store))
    for path in ("L1/Temp", "L1/Press", "L2/Temp", "L2/Sub/Flow"):
        store.define(TagDef(path, DataType.FLOAT64, initial=1.5))
    core = SimpleNamespace(store=store, clock=h.clock, signals=None, users=None)
    bridge = TagBridge(core, h.broker, SimpleNamespace(bridge=SimpleNamespace(
        publish=publish, retain=retain)))
    bridge.start()
    h.pump()
    return SimpleNamespace(h=h, store=store, bridge=bridge, broker=h.broker)


def subscribe(env: SimpleNamespace, topic_filter: str, cid: str = "s", version: int = 4) -> Any:
    c = env.h.connect(cid, version)
    c.send(Subscribe(1, ((topic_filter, SubscriptionOptions(qos=0)),)))
    return c  # the SUBACK and retained messages are read by the caller


def retained_topics(env: SimpleNamespace, topic_filter: str) -> dict[str, Any]:
    c = env.h.connect("r")
    c.send(Subscribe(1, ((topic_filter, SubscriptionOptions(qos=0)),)))
    got = [p for p in c.packets() if isinstance(p, Publish)]
    assert all(p.retain for p in got)  # MQTT-3.3.1-9
    return {p.topic: json.loads(p.payload) for p in got}


# --------------------------------------------------------------------------- retained source


def test_subscribe_gets_current_values_from_the_store() -> None:
    env = make()
    env.store.apply([Update("L1/Temp", 21.25, Quality.GOOD, T0 + 5_000_000)])
    env.h.pump()
    got = retained_topics(env, "iotserver/tags/#")
    assert set(got) == {f"iotserver/tags/{p}" for p in
                        ("L1/Temp", "L1/Press", "L2/Temp", "L2/Sub/Flow")}
    assert got["iotserver/tags/L1/Temp"] == {"v": 21.25, "q": "Good",
                                              "t": "2023-11-14T22:13:20.005Z"}
    # nothing is copied into the broker's own retained store
    assert not [t for t in env.broker.retained.by_topic if t.startswith("iotserver/tags/")]


@pytest.mark.parametrize(("topic_filter", "expected"), [
    ("iotserver/tags/L1/+", {"L1/Temp", "L1/Press"}),
    ("iotserver/tags/+/Temp", {"L1/Temp", "L2/Temp"}),
    ("iotserver/tags/L2/#", {"L2/Temp", "L2/Sub/Flow"}),
    ("iotserver/tags/L2/Sub/Flow", {"L2/Sub/Flow"}),
    ("iotserver/+/L1/Temp", {"L1/Temp"}),
    ("+/+/+/+", {"L1/Temp", "L1/Press", "L2/Temp"}),
    ("#", {"L1/Temp", "L1/Press", "L2/Temp", "L2/Sub/Flow"}),
    ("iotserver/tags/L1", set()),  # a folder is not a tag
    ("iotserver/tags/L1/Temp/set", set()),
    ("other/#", set()),
])
def test_retained_tag_topics_follow_the_filter(topic_filter: str, expected: set[str]) -> None:
    env = make()
    got = retained_topics(env, topic_filter)
    assert set(got) == {f"iotserver/tags/{p}" for p in expected}


def test_publish_globs_limit_retained_and_live_messages() -> None:
    env = make(publish=("L1/*",))
    assert set(retained_topics(env, "iotserver/tags/#")) == {
        "iotserver/tags/L1/Temp", "iotserver/tags/L1/Press"}
    c = subscribe(env, "iotserver/tags/#", "live")
    c.publishes()
    env.store.apply([Update("L1/Temp", 3.0), Update("L2/Temp", 4.0)])
    env.h.pump()
    assert [p.topic for p in c.publishes()] == ["iotserver/tags/L1/Temp"]
    assert env.broker.retained_count == 2


def test_retain_off_means_no_retained_tag_messages() -> None:
    env = make(retain=False)
    assert retained_topics(env, "iotserver/tags/#") == {}
    assert env.broker.retained_sources == {}


def test_live_changes_reach_subscribers_and_removal_clears() -> None:
    env = make()
    c = subscribe(env, "iotserver/tags/L1/#", "live", MQTT_5)
    assert len(c.publishes()) == 2  # the retained ones
    env.store.apply([Update("L1/Temp", 7.0, Quality.UNCERTAIN, T0), Update("L2/Temp", 1.0)])
    env.h.pump()
    got = c.publishes()
    assert [(p.topic, p.retain) for p in got] == [("iotserver/tags/L1/Temp", False)]
    assert json.loads(got[0].payload)["q"] == "Uncertain"
    env.store.remove("L1/Temp")
    env.h.pump()
    got = c.publishes()
    assert [(p.topic, p.payload) for p in got] == [("iotserver/tags/L1/Temp", b"")]
    assert "iotserver/tags/L1/Temp" not in retained_topics(env, "iotserver/tags/#")


def test_nothing_is_built_for_a_topic_nobody_subscribes() -> None:
    env = make()
    before = env.bridge.stats.published
    env.store.apply([Update("L1/Temp", 9.0)])
    env.h.pump()
    assert env.bridge.stats.published == before  # no subscriber: not encoded, not routed
    subscribe(env, "iotserver/tags/L1/Temp").packets()
    env.store.apply([Update("L1/Temp", 10.0)])
    env.h.pump()
    assert env.bridge.stats.published == before + 1


def test_stale_retained_tag_messages_are_cleared_when_the_bridge_starts() -> None:
    h = Harness()
    h.broker.retained.set(Message("iotserver/tags/Old/Tag", b'{"v":1}', 0, True))
    h.broker.retained.set(Message("plant/x", b"keep", 0, True))
    store = TagStore(h.clock)
    core = SimpleNamespace(store=store, clock=h.clock, signals=None, users=None)
    TagBridge(core, h.broker, SimpleNamespace()).start()
    assert list(h.broker.retained.by_topic) == ["plant/x"]


def test_sys_retained_count_includes_the_tag_topics() -> None:
    env = make()
    env.broker.retained.set(Message("plant/x", b"1", 0, True))
    values = sys_values(env.broker)
    assert values["retained messages/count"] == "5"


def test_clients_cannot_retain_under_the_tag_prefix() -> None:
    env = make()
    c = env.h.connect("pub")
    c.send(Publish("iotserver/tags/L1/Temp", b'{"v":99}', retain=True))
    env.h.pump()
    got = retained_topics(env, "iotserver/tags/L1/Temp")
    assert got["iotserver/tags/L1/Temp"]["v"] == 1.5


@pytest.mark.parametrize(("topic_filter", "prefix", "expected"), [
    ("#", "iotserver/tags/", True),
    ("+/#", "iotserver/tags/", True),
    ("iotserver/#", "iotserver/tags/", True),
    ("iotserver/tags/#", "iotserver/tags/", True),
    ("iotserver/tags/a/b", "iotserver/tags/", True),
    ("iotserver/+/x", "iotserver/tags/", True),
    ("iotserver/tags", "iotserver/tags/", False),  # ends above the prefix
    ("iotserver/+", "iotserver/tags/", False),
    ("iotserver/other/#", "iotserver/tags/", False),
    ("other/tags/x", "iotserver/tags/", False),
    ("#", "$SYS/", False),  # MQTT-4.7.2-1
    ("+/x", "$SYS/", False),
    ("$SYS/#", "$SYS/", True),
])
def test_filter_may_match_prefix(topic_filter: str, prefix: str, expected: bool) -> None:
    assert filter_may_match_prefix(topic_filter, prefix) is expected


# --------------------------------------------------------------------------- payload text


@pytest.mark.parametrize("value", [
    0, -1, 2**63 - 1, -(2**70), 1.5, -0.0, 1e300, 5e-324, 0.1, 123456789.123456789,
    float("nan"), float("inf"), -float("inf"), True, False, None, "", "a\"b\\c\n",
    "Grüße ✓", np.float32(1.1), np.int64(-5), np.array([1.0, np.nan]), [1, 2], np.bool_(True),
])
def test_json_text_is_what_the_json_module_writes(value: Any) -> None:
    expected = json.dumps(json_value(value), separators=(",", ":"), allow_nan=False)
    assert json_text(value) == expected
    parsed = json.loads(json_text(value))
    if isinstance(value, float) and not math.isfinite(value):
        assert parsed is None


def test_tag_json_payload() -> None:
    enc = TagJson()
    tv = TagValue(42, Quality.BAD_COMMUNICATION_ERROR, T0 + 999_999_999, T0)
    assert enc(tv) == (b'{"v":42,"q":"BadCommunicationError",'
                       b'"t":"2023-11-14T22:13:20.999Z"}')


def test_iso_clock_cache_follows_milliseconds_and_seconds() -> None:
    iso = _IsoClock()
    assert iso(T0) == "2023-11-14T22:13:20.000Z"
    assert iso(T0 + 400_000) == "2023-11-14T22:13:20.000Z"  # same millisecond
    assert iso(T0 + 1_000_000) == "2023-11-14T22:13:20.001Z"
    assert iso(T0 + 1_000_000_000) == "2023-11-14T22:13:21.000Z"
    assert iso(T0 - 1_000_000) == "2023-11-14T22:13:19.999Z"  # back across a second
    assert iso(0) == "1970-01-01T00:00:00.000Z"


# --------------------------------------------------------------------------- slow readers


def test_paused_reader_gets_the_latest_value_of_each_tag_not_a_queue() -> None:
    env = make()
    c = subscribe(env, "iotserver/tags/#", "slow")
    assert len(c.publishes()) == 4  # the retained snapshot
    c.proto.pauseProducing()  # its socket buffer is full
    for v in (2.0, 3.0, 4.0):
        env.store.apply([Update("L1/Temp", v), Update("L2/Temp", v + 10)])
        env.h.pump()
    session = env.broker.sessions["slow"]
    assert list(session.latest) == ["iotserver/tags/L1/Temp", "iotserver/tags/L2/Temp"]
    assert not session.queue
    assert env.broker.stats.conflated == 4  # two older values of each tag replaced
    assert sum(env.broker.stats.dropped.values()) == 0
    assert c.publishes() == []
    c.proto.resumeProducing()
    got = {p.topic: json.loads(p.payload)["v"] for p in c.publishes()}
    assert got == {"iotserver/tags/L1/Temp": 4.0, "iotserver/tags/L2/Temp": 14.0}
    assert not session.latest and session.latest_bytes == 0


def test_other_qos0_messages_still_queue_in_order_for_a_paused_reader() -> None:
    env = make()
    c = subscribe(env, "plant/#", "slow")
    c.packets()
    c.proto.pauseProducing()
    pub = env.h.connect("pub")
    for i in range(3):
        pub.send(Publish("plant/x", str(i).encode()))
    session = env.broker.sessions["slow"]
    assert [d.msg.payload for d in session.queue] == [b"0", b"1", b"2"]
    assert not session.latest
    c.proto.resumeProducing()
    assert [p.payload for p in c.publishes()] == [b"0", b"1", b"2"]


def test_latest_values_are_dropped_with_the_connection() -> None:
    env = make()
    c = subscribe(env, "iotserver/tags/#", "slow")
    c.publishes()
    c.proto.pauseProducing()
    env.store.apply([Update("L1/Temp", 2.0)])
    env.h.pump()
    session = env.broker.sessions["slow"]
    assert session.latest
    c.drop()
    assert not session.latest and session.latest_bytes == 0


def test_queue_first_then_latest_values_on_resume() -> None:
    env = make()
    c = subscribe(env, "#", "slow")
    c.publishes()
    c.proto.pauseProducing()
    env.store.apply([Update("L1/Temp", 2.0)])
    env.h.pump()
    pub = env.h.connect("pub")
    pub.send(Publish("plant/x", b"p"))
    c.proto.resumeProducing()
    assert [p.topic for p in c.publishes()] == ["plant/x", "iotserver/tags/L1/Temp"]
