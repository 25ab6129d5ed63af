"""Tag bridge against a fake broker, a real TagStore / SignalHub and task.Clock."""

from __future__ import annotations

import contextlib
import json
import re
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import pytest
from helpers import wait_for_sync
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from iotserver.config import SignalConfig
from iotserver.mqtt.acl import Acl
from iotserver.mqtt.bridge import (
    SIGNAL_HEADER,
    SignalBlockError,
    TagBridge,
    TagJson,
    decode_signal_block,
    encode_signal_block,
    json_value,
    parse_set_payload,
)
from iotserver.mqtt.packets import Properties, Publish
from iotserver.mqtt.topics import matches
from iotserver.security.users import Role, User, UserDB
from iotserver.tags.model import Access, DataType, DeadbandKind, Quality, TagDef, TagValue, Update
from iotserver.tags.ring import RingRegistry
from iotserver.tags.signals import SignalHub
from iotserver.tags.store import MemoryOwner, TagStore

RATE = 10240.0
CHANNEL = "Plant/Pump1/Vib"
T0 = 1_700_000_000 * 10**9  # 2023-11-14T22:13:20Z


class Msg(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties | None


class FakeBroker:
    """The broker API the bridge uses: publish_internal, add_interceptor (int handles, like
    ``iotserver.mqtt.broker``), remove_interceptor."""

    def __init__(self) -> None:
        self.published: list[Msg] = []
        self.interceptors: dict[str, Any] = {}
        self._handles: dict[int, str] = {}
        self.sources: dict[str, Any] = {}

    def publish_internal(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        assert isinstance(payload, bytes)
        self.published.append(Msg(topic, payload, qos, retain, properties))

    def plan_for(self, topic: str) -> Any:
        return topic  # every topic has a subscriber here

    def route(self, plan: Any, msg: Any) -> bool:
        self.published.append(Msg(msg.topic, msg.payload, msg.qos, msg.retain, None))
        return False

    def add_retained_source(self, prefix: str, source: Any) -> None:
        self.sources[prefix] = source

    def remove_retained_source(self, prefix: str) -> None:
        self.sources.pop(prefix, None)

    def add_interceptor(self, topic_filter: str, callback: Any) -> int:
        self.interceptors[topic_filter] = callback
        self._handles[len(self._handles) + 1] = topic_filter
        return len(self._handles)

    def remove_interceptor(self, handle: int) -> bool:
        return self.interceptors.pop(self._handles.pop(handle), None) is not None

    def client_publish(self, user: str | None, topic: str, payload: bytes, *, qos: int = 1,
                       client_id: str = "c1", properties: Properties | None = None) -> Any:
        """A client PUBLISH that passed the ACL: handed to every matching interceptor."""
        pub = Publish(topic, payload, qos=qos, packet_id=1 if qos else None,
                      properties=properties or Properties())
        results = [cb(client_id, user, pub) for f, cb in list(self.interceptors.items())
                   if matches(f, topic)]
        return results[0] if results else None

    def on(self, topic: str) -> list[Msg]:
        return [m for m in self.published if m.topic == topic]

    def json(self, topic: str) -> Any:
        msgs = self.on(topic)
        assert msgs, f"nothing published on {topic}; got {[m.topic for m in self.published]}"
        return json.loads(msgs[-1].payload)


class HungOwner:
    def write_tag(self, tag: TagDef, value: Any) -> Deferred[Quality]:
        return Deferred()


TAGS = [
    TagDef("Line1/Temp", DataType.FLOAT64, deadband_kind=DeadbandKind.ABSOLUTE, deadband=0.5),
    TagDef("Line1/Setpoint", DataType.FLOAT64, access=Access.READ_WRITE, low=0, high=100,
           initial=20.0),
    TagDef("Line1/Count", DataType.INT32, access=Access.READ_WRITE, initial=0),
    TagDef("Line1/Arr", DataType.FLOAT32, shape=(3,)),
    TagDef("Line1/Name", DataType.STRING, initial="press 1"),
    TagDef("Line1/Remote", DataType.FLOAT64, access=Access.READ_WRITE, owner="plc"),
]


@pytest.fixture
def env() -> SimpleNamespace:
    clock = Clock()
    clock.advance(T0 / 1e9)
    store = TagStore(clock, write_timeout=5.0)
    store.register_owner("memory", MemoryOwner(store))
    store.register_owner("plc", HungOwner())
    for tag in TAGS:
        store.define(tag)
    signals = SignalHub(store, RingRegistry())
    signals.add(SignalConfig(CHANNEL, RATE, 1 << 16, 1024, "g", "", 2048, 2048, (), 100))
    users = UserDB(users={
        "erik": User("erik", Role.ENGINEER),
        "olga": User("olga", Role.OPERATOR),
    })
    core = SimpleNamespace(store=store, signals=signals, users=users, clock=clock)
    broker = FakeBroker()
    bridge = TagBridge(core, broker, SimpleNamespace())
    bridge.start()
    clock.advance(0)  # the store flushes once per reactor turn
    return SimpleNamespace(clock=clock, store=store, signals=signals, core=core, broker=broker,
                           bridge=bridge)


def topic(path: str) -> str:
    return f"iotserver/tags/{path}"


# --------------------------------------------------------------------------- tags -> MQTT


def test_initial_state_is_retained_json(env: SimpleNamespace) -> None:
    b = env.broker
    assert {m.topic for m in b.published} == {topic(p) for p in env.store.paths()}
    assert topic("Line1/Setpoint") in {m.topic for m in b.published}
    assert all(m.retain for m in b.published)
    sp = b.json(topic("Line1/Setpoint"))
    assert sp == {"v": 20.0, "q": "Good", "t": "2023-11-14T22:13:20.000Z"}
    assert b.json(topic("Line1/Name"))["v"] == "press 1"
    assert b.json(topic("Line1/Temp")) == {
        "v": None, "q": "BadWaitingForInitialData", "t": "2023-11-14T22:13:20.000Z"}


def test_changes_deadband_and_quality(env: SimpleNamespace) -> None:
    b, store, clock = env.broker, env.store, env.clock
    store.apply([Update("Line1/Temp", 20.0, Quality.GOOD, T0 + 123_456_789)])
    clock.advance(0)
    assert b.json(topic("Line1/Temp")) == {"v": 20.0, "q": "Good", "t": "2023-11-14T22:13:20.123Z"}
    n = len(b.on(topic("Line1/Temp")))
    store.apply([Update("Line1/Temp", 20.4)])  # within the 0.5 deadband
    clock.advance(0)
    assert len(b.on(topic("Line1/Temp"))) == n
    store.apply([Update("Line1/Temp", 20.6)])  # 0.6 from the last *reported* value
    clock.advance(0)
    assert b.json(topic("Line1/Temp"))["v"] == 20.6
    store.set_quality("Line1/Temp", Quality.BAD_NOT_CONNECTED)
    clock.advance(0)
    assert b.json(topic("Line1/Temp"))["q"] == "BadNotConnected"
    assert b.json(topic("Line1/Temp"))["v"] == 20.6  # last value kept with the bad quality
    assert env.bridge.stats.published == len(b.published)


def test_batches_are_published_once_per_flush(env: SimpleNamespace) -> None:
    b, store, clock = env.broker, env.store, env.clock
    before = len(b.published)
    for v in range(10):
        store.apply([Update("Line1/Temp", float(v))])
    clock.advance(0)
    assert len(b.published) == before + 1  # conflated by the store: latest value only
    assert b.json(topic("Line1/Temp"))["v"] == 9.0


def test_large_batches_are_published_in_slices_and_conflated_meanwhile(
        env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    b, store, clock = env.broker, env.store, env.clock
    monkeypatch.setattr(TagBridge, "SLICE", 3)
    later: list[Any] = []  # the bridge's next slices, run by hand: one "reactor turn" each

    class Turns:
        def callLater(self, _delay: float, f: Any, *args: Any) -> None:
            later.append((f, args))

        def seconds(self) -> float:
            return clock.seconds()

    env.core.clock = Turns()
    paths = [f"Big/T{i}" for i in range(8)]
    for p in paths:
        store.define(TagDef(p, DataType.FLOAT64))
    before = len(b.published)
    store.apply([Update(p, 1.0) for p in paths])
    clock.advance(0)  # the store delivers the batch: the bridge publishes one slice
    assert len(b.published) - before == 3
    store.apply([Update("Big/T0", 2.0)])
    store.apply([Update("Big/T0", 3.0)])  # the bridge is busy: the store conflates
    clock.advance(0)
    assert len(b.published) - before == 3
    while later:
        f, args = later.pop(0)
        f(*args)
    assert len(b.published) - before == 8
    clock.advance(0)  # the bridge is ready again: the conflated change follows
    assert [json.loads(m.payload)["v"] for m in b.on(topic("Big/T0"))] == [1.0, 3.0]
    assert {m.topic for m in b.published[before:]} == {topic(p) for p in paths}


def test_nan_inf_and_arrays(env: SimpleNamespace) -> None:
    b, store, clock = env.broker, env.store, env.clock
    store.apply([Update("Line1/Temp", float("nan"), Quality.UNCERTAIN_SENSOR_NOT_ACCURATE)])
    store.apply([Update("Line1/Arr", np.array([1.5, np.inf, np.nan], dtype=np.float32))])
    clock.advance(0)
    assert b.json(topic("Line1/Temp"))["v"] is None
    assert b.json(topic("Line1/Temp"))["q"] == "UncertainSensorNotAccurate"
    assert b.json(topic("Line1/Arr"))["v"] == [1.5, None, None]
    store.apply([Update("Line1/Arr", np.array([1, 2, 3], dtype=np.float32))])
    clock.advance(0)
    assert b.json(topic("Line1/Arr"))["v"] == [1.0, 2.0, 3.0]


def test_json_value_conversions() -> None:
    assert json_value(np.float32(2.5)) == 2.5
    assert json_value(np.int64(7)) == 7 and type(json_value(np.int64(7))) is int
    assert json_value(np.bool_(True)) is True
    assert json_value(float("-inf")) is None
    assert json_value(np.array([[1, 2], [3, 4]], dtype=np.int16)) == [[1, 2], [3, 4]]
    assert json_value(np.array([[np.nan, 1.0]])) == [[None, 1.0]]
    enc = TagJson()
    out = json.loads(enc(TagValue(np.float64(1.25), Quality.GOOD, 1_500_000_000, 0)))
    assert out == {"v": 1.25, "q": "Good", "t": "1970-01-01T00:00:01.500Z"}


def test_removed_tag_clears_retained(env: SimpleNamespace) -> None:
    env.store.remove("Line1/Name")
    last = env.broker.on(topic("Line1/Name"))[-1]
    assert last.payload == b"" and last.retain


# --------------------------------------------------------------------------- writes


def write(env: SimpleNamespace, user: str | None, path: str, payload: bytes, **kw: Any) -> Any:
    result = env.broker.client_publish(user, topic(path) + "/set", payload, **kw)
    env.clock.advance(0)
    return result


def test_set_good(env: SimpleNamespace) -> None:
    write(env, "erik", "Line1/Setpoint", b"42.5")
    assert env.store.read("Line1/Setpoint").value == 42.5
    result = env.broker.on(topic("Line1/Setpoint") + "/set/result")[-1]
    assert json.loads(result.payload) == {"ok": True}
    assert result.qos == 1 and not result.retain
    # the new value is published like any other change
    assert env.broker.json(topic("Line1/Setpoint"))["v"] == 42.5


@pytest.mark.parametrize(
    ("path", "payload", "status"),
    [
        ("Line1/Setpoint", b"150", "BadOutOfRange"),
        ("Line1/Setpoint", b'"hot"', "BadTypeMismatch"),
        ("Line1/Setpoint", b"{not json", "BadTypeMismatch"),
        ("Line1/Setpoint", b"NaN", "BadTypeMismatch"),
        ("Line1/Setpoint", b"\xff", "BadTypeMismatch"),
        ("Line1/Setpoint", b'{"value": 1}', "BadTypeMismatch"),
        ("Line1/Count", b"1.5", "BadTypeMismatch"),
        ("Line1/Temp", b"1", "BadNotWritable"),
        ("No/Such/Tag", b"1", "BadNodeIdUnknown"),
    ],
)
def test_set_refused(env: SimpleNamespace, path: str, payload: bytes, status: str) -> None:
    write(env, "erik", path, payload)
    reply = env.broker.json(topic(path) + "/set/result")
    assert reply["ok"] is False and reply["status"] == status
    assert env.store.read("Line1/Setpoint").value == 20.0
    assert env.bridge.stats.writes_refused == 1


def test_set_puback_reason_codes(env: SimpleNamespace) -> None:
    assert write(env, "erik", "Line1/Setpoint", b"{bad").result == 0x99  # Payload format invalid
    ok = write(env, "erik", "Line1/Setpoint", b"5")
    assert ok.called and ok.result is None  # PUBACK after the write, plain success
    refused = write(env, "erik", "Line1/Setpoint", b"500")
    assert refused.result is None  # the write failed, the request was fine: see the result topic


def test_set_wrapped_value(env: SimpleNamespace) -> None:
    write(env, "erik", "Line1/Setpoint", b'{"v": 7}')
    assert env.store.read("Line1/Setpoint").value == 7.0


@pytest.mark.parametrize("user", ["olga", None, "ghost"])
def test_set_without_write_role_never_reaches_the_store(env: SimpleNamespace,
                                                       user: str | None) -> None:
    writes = env.store.stats.writes
    d = write(env, user, "Line1/Setpoint", b"50")
    assert d.result == 0x87  # v5 PUBACK reason code: Not authorized
    assert env.broker.json(topic("Line1/Setpoint") + "/set/result") == {
        "ok": False, "status": "BadUserAccessDenied"}
    assert env.store.stats.writes == writes
    assert env.store.read("Line1/Setpoint").value == 20.0


def test_set_v5_response_topic_and_correlation(env: SimpleNamespace) -> None:
    props = Properties(response_topic="iotserver/replies/erik/1", correlation_data=b"\x00req-7")
    write(env, "erik", "Line1/Setpoint", b"10", properties=props)
    reply = env.broker.on("iotserver/replies/erik/1")
    assert len(reply) == 1
    assert json.loads(reply[0].payload) == {"ok": True}
    assert reply[0].properties == Properties(correlation_data=b"\x00req-7")
    assert not env.broker.on(topic("Line1/Setpoint") + "/set/result")
    # refused writes go to the response topic too
    write(env, "erik", "Line1/Setpoint", b"-1", properties=props)
    assert json.loads(env.broker.on("iotserver/replies/erik/1")[-1].payload)["status"] == \
        "BadOutOfRange"


@pytest.mark.parametrize(
    "response_topic",
    ["iotserver/tags/Line1/Temp", "iotserver/tags/Line1/Count/set", "iotserver/signals/x",
     "$SYS/x", "replies/+"],
)
def test_unsafe_response_topic_falls_back(env: SimpleNamespace, response_topic: str) -> None:
    props = Properties(response_topic=response_topic, correlation_data=b"id")
    write(env, "erik", "Line1/Setpoint", b"10", properties=props)
    assert not [m for m in env.broker.on(response_topic) if b'"ok"' in m.payload]
    fallback = env.broker.on(topic("Line1/Setpoint") + "/set/result")
    assert fallback and fallback[-1].properties == Properties(correlation_data=b"id")


def test_response_topic_checked_against_broker_acl(env: SimpleNamespace) -> None:
    env.broker.acl = Acl((), users=env.core.users, prefix="iotserver")
    write(env, "erik", "Line1/Setpoint", b"11",
          properties=Properties(response_topic="iotserver/replies/olga/x"))
    assert not env.broker.on("iotserver/replies/olga/x")  # not erik's to publish
    write(env, "erik", "Line1/Setpoint", b"12",
          properties=Properties(response_topic="iotserver/replies/erik/x"))
    assert env.broker.json("iotserver/replies/erik/x") == {"ok": True}


def test_set_timeout_from_a_hung_owner(env: SimpleNamespace) -> None:
    d = write(env, "erik", "Line1/Remote", b"1")
    assert isinstance(d, Deferred) and not d.called
    assert not env.broker.on(topic("Line1/Remote") + "/set/result")
    env.clock.advance(5.0)
    assert d.called
    assert env.broker.json(topic("Line1/Remote") + "/set/result")["status"] == "BadTimeout"


def test_pending_writes_are_bounded(env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("iotserver.mqtt.bridge.MAX_PENDING_WRITES", 2)
    for _ in range(3):
        write(env, "erik", "Line1/Remote", b"1")
    assert env.broker.json(topic("Line1/Remote") + "/set/result")["status"] == \
        "BadResourceUnavailable"
    env.clock.advance(5.0)
    write(env, "erik", "Line1/Setpoint", b"3")
    assert env.broker.json(topic("Line1/Setpoint") + "/set/result") == {"ok": True}


def test_non_set_publishes_are_ignored(env: SimpleNamespace) -> None:
    before = len(env.broker.published)
    env.broker.client_publish("erik", topic("Line1/Setpoint"), b"99")
    env.broker.client_publish("erik", topic("Line1/Setpoint") + "/set/result", b"{}")
    env.broker.client_publish("erik", "iotserver/tags/set", b"1")
    env.clock.advance(0)
    assert len(env.broker.published) == before
    assert env.store.read("Line1/Setpoint").value == 20.0


def test_parse_set_payload() -> None:
    assert parse_set_payload(b" 1 ") == 1
    assert parse_set_payload(b"[1, 2, 3]") == [1, 2, 3]
    assert parse_set_payload(b'{"v": true}') is True
    for bad in (b"Infinity", b"-Infinity", b'{"v": 1, "q": "Good"}', b""):
        with pytest.raises(ValueError):
            parse_set_payload(bad)


# --------------------------------------------------------------------------- signals


def sig(env: SimpleNamespace, payload: bytes, user: str | None = "erik",
        channel: str = CHANNEL) -> Any:
    result = env.broker.client_publish(user, f"iotserver/signals/{channel}", payload, qos=0)
    env.clock.advance(0)
    return result


def test_signal_block_roundtrip_without_copy() -> None:
    samples = np.arange(8, dtype=np.float32)
    payload = encode_signal_block(T0, RATE, samples)
    assert len(payload) == SIGNAL_HEADER.size + 32 == 60
    block = decode_signal_block(payload)
    assert block.start_ns == T0 and block.sample_rate == RATE
    np.testing.assert_array_equal(block.samples, samples)
    assert block.samples.base is payload  # a view on the wire bytes
    assert not block.samples.flags.writeable


def test_signal_blocks_ingested(env: SimpleNamespace) -> None:
    period = round(1e9 / RATE)
    t = np.arange(2048) / RATE
    data = (2.0 * np.sin(2 * np.pi * 500 * t)).astype(np.float32)
    sig(env, encode_signal_block(T0, RATE, data[:1024]))
    sig(env, encode_signal_block(T0 + 1024 * period, RATE, data[1024:]))
    ch = env.signals.channels[CHANNEL]
    assert ch.stats.blocks == 2 and ch.stats.samples == 2048
    assert env.bridge.stats.blocks == 2 and env.bridge.stats.bad_blocks == 0
    assert env.store.read(f"{CHANNEL}/RMS").value == pytest.approx(np.sqrt(2), rel=1e-3)
    # the derived tags reach MQTT like any other tag
    assert env.broker.json(topic(f"{CHANNEL}/Peak"))["v"] == pytest.approx(2.0, rel=1e-3)
    assert not [m for m in env.broker.published if m.topic.endswith("/error")]


def good_header(**kw: Any) -> dict[str, Any]:
    fields = dict(magic=b"SIG1", version=1, stype=1, reserved=0, start=T0, rate=RATE, count=4)
    fields.update(kw)
    return fields


def raw_block(samples: int = 4, **kw: Any) -> bytes:
    f = good_header(**kw)
    return SIGNAL_HEADER.pack(f["magic"], f["version"], f["stype"], f["reserved"], f["start"],
                              f["rate"], f["count"]) + b"\x00" * (4 * samples)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "shorter than the 28-byte header"),
        (b"SIG1" + b"\x00" * 10, "shorter than"),
        (raw_block(magic=b"SIG2"), "bad magic"),
        (raw_block(version=2), "unsupported block version"),
        (raw_block(stype=2), "unsupported sample type"),
        (raw_block(reserved=1), "reserved"),
        (raw_block(samples=0, count=0), "no samples"),
        (raw_block(samples=3), "header says 4 samples"),
        (raw_block(samples=5), "header says 4 samples"),
        (raw_block(rate=0.0), "bad sample rate"),
        (raw_block(rate=float("nan")), "bad sample rate"),
        (raw_block(rate=RATE * 1.01), "does not match the channel's 10240 Hz"),
    ],
)
def test_malformed_blocks_are_counted_and_reported(env: SimpleNamespace, payload: bytes,
                                                   reason: str) -> None:
    assert sig(env, payload).result == 0x99
    assert env.bridge.stats.bad_blocks == 1 and env.bridge.stats.blocks == 0
    assert env.signals.channels[CHANNEL].stats.samples == 0
    err = env.broker.json(f"iotserver/signals/{CHANNEL}/error")
    assert reason in err["error"] and err["client"] == "c1"


def test_block_rules_channel_user_and_time(env: SimpleNamespace) -> None:
    block = encode_signal_block(T0, RATE, np.zeros(16, np.float32))
    sig(env, block, channel="No/Such")
    assert "unknown signal channel" in env.broker.json("iotserver/signals/No/Such/error")["error"]
    assert sig(env, block, user="olga").result == 0x87
    assert "BadUserAccessDenied" in env.broker.json(f"iotserver/signals/{CHANNEL}/error")["error"]
    assert sig(env, block) is None  # accepted: PUBACK at once
    assert env.bridge.stats.blocks == 1
    sig(env, block)  # same start again: time did not move forward
    assert "not after the previous block" in \
        env.broker.json(f"iotserver/signals/{CHANNEL}/error")["error"]
    period = round(1e9 / RATE)
    sig(env, encode_signal_block(T0 + 16 * period, RATE, np.zeros(16, np.float32)))
    sig(env, encode_signal_block(T0 + 10**9, RATE, np.zeros(16, np.float32)))  # a gap is fine
    assert env.bridge.stats.blocks == 3 and env.bridge.stats.bad_blocks == 3
    # our own error topic is not mistaken for a channel
    sig(env, b"junk", channel=f"{CHANNEL}/error")
    assert env.bridge.stats.bad_blocks == 3


def test_bad_block_logging_is_rate_limited(env: SimpleNamespace) -> None:
    from twisted.logger import globalLogPublisher

    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        for _ in range(50):
            sig(env, b"junk")
        env.clock.advance(10.0)
        sig(env, b"junk")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    lines = [e for e in seen if e.get("log_namespace") == "iotserver.mqtt.bridge"]
    assert len(lines) == 2
    assert lines[1]["more"] == " (49 more since the last report)"
    assert env.bridge.stats.bad_blocks == 51


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_decode_never_raises_anything_else(data: bytes) -> None:
    with contextlib.suppress(SignalBlockError):
        decode_signal_block(data)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=28, max_size=28), st.integers(0, 3))
def test_decode_headers_with_valid_magic(header: bytes, extra: int) -> None:
    data = b"SIG1" + header[4:] + b"\x00" * (4 * extra)
    try:
        block = decode_signal_block(data)
    except SignalBlockError:
        return
    assert block.samples.size == extra


# --------------------------------------------------------------------------- lifecycle


def test_stop_is_idempotent_and_silences(env: SimpleNamespace) -> None:
    env.bridge.stop()
    env.bridge.stop()
    assert env.broker.interceptors == {}
    before = len(env.broker.published)
    env.store.apply([Update("Line1/Temp", 99.0)])
    env.clock.advance(0)
    assert len(env.broker.published) == before
    assert env.store.subscriptions == []
    env.bridge.start()  # restartable: publishes the full state again
    env.clock.advance(0)
    assert env.broker.json(topic("Line1/Temp"))["v"] == 99.0


def test_custom_prefix_and_qos(env: SimpleNamespace) -> None:
    broker = FakeBroker()
    cfg = SimpleNamespace(bridge=SimpleNamespace(prefix="plant/site1", qos=1))
    bridge = TagBridge(env.core, broker, cfg)
    bridge.start()
    env.clock.advance(0)
    try:
        msg = broker.on("plant/site1/tags/Line1/Setpoint")[-1]
        assert msg.qos == 1 and msg.retain
        assert set(broker.interceptors) == {"plant/site1/tags/#", "plant/site1/signals/#"}
    finally:
        bridge.stop()


def test_iso_timestamps_have_millisecond_precision() -> None:
    enc = TagJson()
    t = json.loads(enc(TagValue(1.0, Quality.GOOD, 1_700_000_000_999_999_999, 0)))["t"]
    assert re.fullmatch(r"2023-11-14T22:13:20\.999Z", t)


def test_bridge_config_options(env: SimpleNamespace) -> None:
    from iotserver.mqtt.config import BridgeConfig

    broker = FakeBroker()
    cfg = SimpleNamespace(bridge=BridgeConfig(
        publish=("Line1/S*",), payload="value", retain=False, writes=False,
        signals=("Other/Channel",)))
    bridge = TagBridge(env.core, broker, cfg)
    bridge.start()
    env.clock.advance(0)
    try:
        assert [m.topic for m in broker.published] == [topic("Line1/Setpoint")]
        assert broker.published[0].payload == b"20.0" and not broker.published[0].retain
        assert set(broker.interceptors) == {"iotserver/tags/#", "iotserver/signals/#"}
        broker.client_publish("erik", topic("Line1/Setpoint") + "/set", b"30")
        env.clock.advance(0)
        assert broker.json(topic("Line1/Setpoint") + "/set/result")["status"] == "BadNotWritable"
        assert env.store.read("Line1/Setpoint").value == 20.0
        broker.client_publish("erik", f"iotserver/signals/{CHANNEL}",
                              encode_signal_block(T0, RATE, np.zeros(4, np.float32)))
        error = broker.json(f"iotserver/signals/{CHANNEL}/error")["error"]
        assert "does not accept blocks" in error
    finally:
        bridge.stop()
    off = TagBridge(env.core, FakeBroker(), SimpleNamespace(bridge=BridgeConfig(enabled=False)))
    off.start()
    env.clock.advance(0)
    assert off.broker.published == [] and off.broker.interceptors == {}
    off.stop()


# --------------------------------------------------------------------------- end to end

_E2E_CONFIG = """\
[server]
data_dir = "{data}"

[simulator]
enabled = false

[[tags]]
path = "Line1/Setpoint"
type = "float64"
access = "readwrite"
range = [0, 100]
initial = 20.0

[[signals]]
name = "Line1/Vib"
sample_rate = 10240
block_size = 1024
capacity = 65536
window = 2048
hop = 2048

[[mqtt.listeners]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[mqtt.auth]
allow_anonymous = true

[mqtt.persistence]
enabled = false
"""


@pytest.mark.interop
def test_end_to_end_with_mosquitto_clients(tmp_path: Any, free_port: int) -> None:
    """The real server (twistd) with our auth, ACL and bridge, driven by mosquitto_pub/sub/rr."""
    import shutil
    import subprocess
    import time

    from iotserver.security.users import hash_password, save_users

    from helpers.tools import twistd

    for tool in ("mosquitto_sub", "mosquitto_pub", "mosquitto_rr"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    data = tmp_path / "data"
    data.mkdir()
    save_users(data / "users.toml", [
        User("erik", Role.ENGINEER, hash_password("engineer-pw", n=16, r=1, p=1)),
        User("olga", Role.OPERATOR, hash_password("operator-pw", n=16, r=1, p=1)),
    ])
    config = tmp_path / "server.toml"
    config.write_text(_E2E_CONFIG.format(data=data, port=free_port))
    common = ["-h", "127.0.0.1", "-p", str(free_port)]
    erik = [*common, "-u", "erik", "-P", "engineer-pw"]
    tag = "iotserver/tags/Line1/Setpoint"

    def run(*argv: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(argv, capture_output=True, timeout=15, input=stdin)

    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen(
            twistd("--config", str(config)), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        def ready() -> bool:
            return b"iotserver ready" in (tmp_path / "server.log").read_bytes()

        wait_for_sync(lambda: ready() or server.poll() is not None, 30, "the server")
        assert ready(), (tmp_path / "server.log").read_text()
        # anonymous clients may not read tags (no rule grants it): SUBACK refused
        out = run("mosquitto_sub", *common, "-t", tag, "-C", "1", "-W", "2", "-v")
        assert b"Setpoint" not in out.stdout
        # the retained tag value, read by an operator (role defaults)
        out = run("mosquitto_sub", *common, "-u", "olga", "-P", "operator-pw", "-t", tag,
                  "-C", "1", "-W", "5")
        assert json.loads(out.stdout)["v"] == 20.0, out
        # a v5 request/response write by an engineer
        out = run("mosquitto_rr", *erik, "-t", tag + "/set", "-e", "iotserver/replies/erik/1",
                  "-m", "42.5", "-W", "5")
        assert json.loads(out.stdout) == {"ok": True}, out
        out = run("mosquitto_rr", *erik, "-t", tag + "/set", "-e", "iotserver/replies/erik/1",
                  "-m", "500", "-W", "5")
        assert json.loads(out.stdout) == {"ok": False, "status": "BadOutOfRange"}, out
        out = run("mosquitto_sub", *erik, "-t", tag, "-C", "1", "-W", "5")
        assert json.loads(out.stdout)["v"] == 42.5
        # a wrong password: CONNACK 0x86 / return code 4
        out = run("mosquitto_pub", *common, "-u", "erik", "-P", "nope", "-t", "x", "-m", "1")
        assert out.returncode != 0 and b"bad user name or password" in out.stderr.lower()
        # a signal block ingested, its analytics published as tags
        block = encode_signal_block(time.time_ns(), 10240.0,
                                    np.sin(np.arange(2048) / 10.0).astype(np.float32))
        out = run("mosquitto_pub", *erik, "-t", "iotserver/signals/Line1/Vib", "-s", "-q", "1",
                  stdin=block)
        assert out.returncode == 0, out
        out = run("mosquitto_sub", *erik, "-t", "iotserver/tags/Line1/Vib/Peak", "-C", "1",
                  "-W", "5")
        assert json.loads(out.stdout)["v"] == pytest.approx(1.0, abs=0.01)
        # a malformed block: PUBACK 0x99 for a v5 publisher
        out = run("mosquitto_pub", *erik, "-V", "5", "-t", "iotserver/signals/Line1/Vib",
                  "-m", "junk", "-q", "1")
        assert b"payload format invalid" in out.stderr.lower(), out
    finally:
        server.terminate()
        server.wait(15)


def test_sliced_publishing_leaves_no_reference_cycles(
        env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch published in slices must be freed by reference counting as soon as it is done:
    a cycle (e.g. a closure that schedules itself) keeps every batch alive until the garbage
    collector runs, which at 100k changes/s cost a sixth of a core."""
    import gc

    monkeypatch.setattr(TagBridge, "SLICE", 3)
    store, clock = env.store, env.clock
    paths = [f"Cyc/T{i}" for i in range(10)]
    for p in paths:
        store.define(TagDef(p, DataType.FLOAT64))
    clock.advance(0)
    gc.collect()
    gc.disable()
    try:
        store.apply([Update(p, 2.0) for p in paths])
        for _ in range(10):
            clock.advance(0)
        assert len(env.broker.on(topic("Cyc/T9"))) >= 1  # every slice went out
        assert gc.collect() == 0
    finally:
        gc.enable()
