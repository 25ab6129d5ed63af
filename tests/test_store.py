from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from iotserver.tags.model import (
    Access,
    Change,
    DataType,
    DeadbandKind,
    Quality,
    TagDef,
    TagValue,
    Update,
)
from iotserver.tags.store import (
    DuplicateTagError,
    MemoryOwner,
    TagStore,
    UnknownTagError,
    WriteRefused,
    compile_pattern,
)


def make_store() -> tuple[TagStore, Clock]:
    clock = Clock()
    clock.advance(1_700_000_000)
    return TagStore(clock, write_timeout=5.0), clock


def f64(path: str, **kw: Any) -> TagDef:
    return TagDef(path=path, data_type=DataType.FLOAT64, **kw)


def result_of(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


def test_pattern_semantics() -> None:
    rx = compile_pattern("Line1/*/Temp")
    assert rx.match("Line1/Press/Temp") and not rx.match("Line1/A/B/Temp")
    assert compile_pattern("Line1/**").match("Line1/A/B/Temp")
    assert not compile_pattern("Line1/**").match("Line2/A")
    assert compile_pattern("**").match("x")
    assert compile_pattern("A/Te?p").match("A/Temp") and not compile_pattern("A.B").match("AxB")


def test_define_read_and_duplicates() -> None:
    store, _ = make_store()
    store.define(f64("A/x"))
    v = store.read("A/x")
    assert v.value is None and v.quality is Quality.BAD_WAITING_FOR_INITIAL_DATA
    with pytest.raises(DuplicateTagError):
        store.define(f64("A/x"))
    with pytest.raises(UnknownTagError):
        store.read("nope")
    store.define(f64("A/y", initial=3))
    assert store.read("A/y").value == 3.0 and store.read("A/y").quality is Quality.GOOD


def test_apply_stamps_times_and_read_many() -> None:
    store, _clock = make_store()
    for name in ("A/x", "A/y", "B/z"):
        store.define(f64(name))
    store.apply([Update("A/x", 1.5), Update("A/y", 2.5, Quality.UNCERTAIN, 123), Update("Q", 1)])
    x = store.read("A/x")
    assert x.value == 1.5 and x.source_ns == x.server_ns == 1_700_000_000 * 10**9
    y = store.read("A/y")
    assert y.source_ns == 123 and y.quality is Quality.UNCERTAIN
    assert list(store.read_many("A/*")) == ["A/x", "A/y"]
    assert store.stats.updates_unknown == 1


def test_subscribers_get_one_batch_per_turn() -> None:
    store, clock = make_store()
    for i in range(5):
        store.define(f64(f"A/t{i}"))
    store.define(f64("B/other"))
    batches: list[list[Change]] = []
    store.subscribe("A/**", batches.append, initial=False)
    store.apply([Update(f"A/t{i}", float(i)) for i in range(5)])
    store.apply([Update("A/t0", 10.0), Update("B/other", 1.0)])
    assert batches == []  # nothing before the reactor turns
    clock.advance(0)
    assert len(batches) == 1
    got = {c.tag.path: c.value.value for c in batches[0]}
    assert got == {"A/t0": 10.0, "A/t1": 1.0, "A/t2": 2.0, "A/t3": 3.0, "A/t4": 4.0}


def test_subscribe_initial_values_and_new_tags() -> None:
    store, clock = make_store()
    store.define(f64("A/x", initial=1))
    batches: list[list[Change]] = []
    store.subscribe("A/*", batches.append)
    clock.advance(0)
    assert [c.value.value for c in batches[0]] == [1.0]
    store.define(f64("A/new"))
    store.apply([Update("A/new", 5.0)])
    clock.advance(0)
    assert [c.tag.path for c in batches[1]] == ["A/new"]


def test_deadband_reports_against_last_reported_value() -> None:
    store, clock = make_store()
    store.define(f64("A/x", deadband_kind=DeadbandKind.ABSOLUTE, deadband=1.0))
    seen: list[float] = []
    store.subscribe("A/x", lambda b: seen.extend(c.value.value for c in b), initial=False)
    # A slow ramp of 0.4 per step must still report once it has moved > 1.0 from the last report.
    for i in range(8):
        store.apply([Update("A/x", 10.0 + 0.4 * i)])
        clock.advance(0)
    assert seen == [10.0, pytest.approx(11.2), pytest.approx(12.4)]
    assert store.read("A/x").value == pytest.approx(12.8)  # reads see every sample


def test_quality_change_is_reported_even_within_deadband() -> None:
    store, clock = make_store()
    store.define(f64("A/x", deadband_kind=DeadbandKind.ABSOLUTE, deadband=5.0))
    seen: list[Quality] = []
    store.subscribe("A/x", lambda b: seen.extend(c.value.quality for c in b), initial=False)
    store.apply([Update("A/x", 1.0)])
    clock.advance(0)
    store.set_quality("A/**", Quality.BAD_NOT_CONNECTED)
    clock.advance(0)
    assert seen == [Quality.GOOD, Quality.BAD_NOT_CONNECTED]
    assert store.read("A/x").value == 1.0


def test_failing_subscriber_does_not_affect_others() -> None:
    store, clock = make_store()
    store.define(f64("A/x"))

    def broken(batch: list[Change]) -> None:
        raise RuntimeError("boom")

    good: list[Change] = []
    store.subscribe("**", broken, name="broken", initial=False)
    store.subscribe("**", good.extend, initial=False)
    store.apply([Update("A/x", 1.0)])
    clock.advance(0)
    store.apply([Update("A/x", 2.0)])
    clock.advance(0)
    assert [c.value.value for c in good] == [1.0, 2.0]
    assert store.stats.subscriber_errors == 2


def test_slow_subscriber_is_conflated_not_queued() -> None:
    store, clock = make_store()
    store.define(f64("A/x"))
    store.define(f64("A/y"))
    pending: list[Deferred[None]] = []
    batches: list[list[tuple[str, float]]] = []

    def slow(batch: list[Change]) -> Deferred[None]:
        batches.append([(c.tag.path, c.value.value) for c in batch])
        d: Deferred[None] = Deferred()
        pending.append(d)
        return d

    fast: list[Change] = []
    sub = store.subscribe("**", slow, initial=False)
    store.subscribe("**", fast.extend, initial=False)
    store.apply([Update("A/x", 1.0)])
    clock.advance(0)
    for v in range(2, 100):  # the slow one is busy: its backlog stays one entry per tag
        store.apply([Update("A/x", float(v)), Update("A/y", float(v))])
        clock.advance(0)
    assert len(batches) == 1 and len(sub.pending) == 2
    assert len(fast) == 1 + 98 * 2  # the fast subscriber saw everything meanwhile
    pending[0].callback(None)
    clock.advance(0)
    assert batches[1] == [("A/x", 99.0), ("A/y", 99.0)]
    assert sub.conflated > 0


def test_cancelled_subscription_stops_delivery() -> None:
    store, clock = make_store()
    store.define(f64("A/x"))
    got: list[Change] = []
    sub = store.subscribe("A/x", got.extend, initial=False)
    store.apply([Update("A/x", 1.0)])
    sub.cancel()
    clock.advance(0)
    assert got == []


class RecordingOwner:
    def __init__(self) -> None:
        self.writes: list[tuple[str, Any]] = []
        self.answer: Any = Quality.GOOD

    def write_tag(self, tag: TagDef, value: Any) -> Any:
        self.writes.append((tag.path, value))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def rw(path: str, dt: DataType = DataType.FLOAT64, **kw: Any) -> TagDef:
    return TagDef(path=path, data_type=dt, access=Access.READ_WRITE, owner="plc", **kw)


def test_write_routes_to_owner_with_coerced_value() -> None:
    store, _ = make_store()
    owner = RecordingOwner()
    store.register_owner("plc", owner)
    store.define(rw("P/sp", DataType.INT16, low=0, high=100))
    assert result_of(store.write("P/sp", 42.0)) is Quality.GOOD
    assert owner.writes == [("P/sp", 42)] and type(owner.writes[0][1]) is int


@pytest.mark.parametrize(
    ("path", "value", "quality"),
    [
        ("P/none", 1, Quality.BAD_NODE_ID_UNKNOWN),
        ("P/ro", 1, Quality.BAD_NOT_WRITABLE),
        ("P/sp", 101, Quality.BAD_OUT_OF_RANGE),
        ("P/sp", "x", Quality.BAD_TYPE_MISMATCH),
    ],
)
def test_refused_writes_never_reach_the_owner(path: str, value: Any, quality: Quality) -> None:
    store, _ = make_store()
    owner = RecordingOwner()
    store.register_owner("plc", owner)
    store.define(rw("P/sp", low=0, high=100))
    store.define(TagDef(path="P/ro", data_type=DataType.FLOAT64, owner="plc"))
    assert result_of(store.write(path, value)) is quality
    assert owner.writes == []


def test_write_owner_answers_and_failures() -> None:
    store, clock = make_store()
    owner = RecordingOwner()
    store.define(rw("P/x"))
    assert result_of(store.write("P/x", 1)) is Quality.BAD_NOT_CONNECTED  # owner not running
    store.register_owner("plc", owner)
    owner.answer = WriteRefused(Quality.BAD_DEVICE_FAILURE)
    assert result_of(store.write("P/x", 1)) is Quality.BAD_DEVICE_FAILURE
    owner.answer = RuntimeError("bug in owner")
    assert result_of(store.write("P/x", 1)) is Quality.BAD_INTERNAL_ERROR
    owner.answer = Deferred()
    d = store.write("P/x", 1)
    assert not d.called
    clock.advance(5.1)
    assert result_of(d) is Quality.BAD_TIMEOUT


def test_write_now_answers_synchronous_owners_without_a_deferred() -> None:
    store, clock = make_store()
    store.register_owner("memory", MemoryOwner(store))
    owner = RecordingOwner()
    store.register_owner("plc", owner)
    store.define(TagDef(path="M/x", data_type=DataType.INT16, access=Access.READ_WRITE))
    store.define(rw("P/x"))
    assert store.write_now("M/x", 5.0) is Quality.GOOD  # coerced: int 5
    assert store.read("M/x").value == 5 and type(store.read("M/x").value) is int
    # refusals are plain qualities too, counted as failed; nothing is written
    assert store.write_now("M/x", 1 << 20) is Quality.BAD_OUT_OF_RANGE
    assert store.write_now("M/none", 1) is Quality.BAD_NODE_ID_UNKNOWN
    assert store.read("M/x").value == 5
    assert (store.stats.writes, store.stats.writes_failed) == (3, 2)
    # an owner that answers later: the same Deferred as write() gives (timeout included)
    owner.answer = Deferred()
    d = store.write_now("P/x", 1)
    assert isinstance(d, Deferred) and not d.called
    clock.advance(5.1)
    assert result_of(d) is Quality.BAD_TIMEOUT


def test_write_now_checked_skips_coerce_only_for_the_current_definition() -> None:
    store, _ = make_store()
    owner = RecordingOwner()
    store.register_owner("plc", owner)
    old = rw("P/x", DataType.INT16, low=0, high=100)
    store.define(old)
    # the caller coerced for this very TagDef: passed on as is
    assert store.write_now("P/x", 7, checked=old) is Quality.GOOD
    # checked against another definition (the tag was redefined): coerced again, refused
    store.remove("P/x")
    store.define(rw("P/x", DataType.INT16, low=0, high=10))
    assert store.write_now("P/x", 50, checked=old) is Quality.BAD_OUT_OF_RANGE
    assert owner.writes == [("P/x", 7)]


def test_write_origin_is_not_notified_every_other_subscriber_is() -> None:
    store, clock = make_store()
    store.register_owner("memory", MemoryOwner(store))
    store.define(TagDef(path="M/x", data_type=DataType.INT16, access=Access.READ_WRITE))
    mine: list[Any] = []
    others: list[Any] = []
    origin = store.subscribe("**", lambda ch: mine.extend(c.value.value for c in ch),
                             initial=False)
    store.subscribe("**", lambda ch: others.extend(c.value.value for c in ch), initial=False)
    store.apply([Update("M/x", 1)])  # pending for both
    assert store.write_now("M/x", 2, origin=origin) is Quality.GOOD
    clock.advance(0)
    assert mine == [] and others == [2]  # the origin's stale pending 1 was dropped as well
    assert result_of(store.write("M/x", 3)) is Quality.GOOD  # without origin: everyone
    clock.advance(0)
    assert mine == [3] and others == [2, 3]
    # an owner other than memory never gets the origin (it cannot know about it)
    owner = RecordingOwner()
    store.register_owner("plc", owner)
    store.define(rw("P/x"))
    assert store.write_now("P/x", 1.0, origin=origin) is Quality.GOOD
    assert owner.writes == [("P/x", 1.0)]


def test_memory_owner_applies_and_persists(tmp_path: Any) -> None:
    import queue

    from iotserver.tags.persist import MemoryTagPersistence

    store, _clock = make_store()
    done: queue.Queue[Any] = queue.Queue()  # the writer thread's results, for this thread
    db = MemoryTagPersistence(tmp_path / "m.sqlite3", call_from_thread=lambda *a: done.put(a))
    store.register_owner("memory", MemoryOwner(store, db))
    store.define(
        TagDef(path="S/sp", data_type=DataType.FLOAT64, access=Access.READ_WRITE, persist=True)
    )
    store.define(
        TagDef(
            path="S/arr",
            data_type=DataType.INT32,
            shape=(3,),
            access=Access.READ_WRITE,
            persist=True,
        )
    )
    results = [store.write("S/sp", 12.5), store.write("S/arr", [1, 2, 3])]
    assert store.read("S/sp").value is None  # not before it is durable
    while not all(d.called for d in results):
        fn, *args = done.get(timeout=10)
        fn(*args)
    assert [result_of(d) for d in results] == [Quality.GOOD, Quality.GOOD]
    assert store.read("S/sp").value == 12.5
    db.close()
    again = MemoryTagPersistence(tmp_path / "m.sqlite3")
    saved = again.load_all()
    again.close()
    assert saved["S/sp"][0] == 12.5 and saved["S/arr"][0] == [1, 2, 3]


def test_array_tags_notify_on_element_change() -> None:
    store, clock = make_store()
    store.define(TagDef(path="A/v", data_type=DataType.FLOAT64, shape=(2,)))
    got: list[Change] = []
    store.subscribe("A/v", got.extend, initial=False)
    store.apply([Update("A/v", np.array([1.0, 2.0]))])
    store.apply([Update("A/v", np.array([1.0, 2.0]))])
    clock.advance(0)
    store.apply([Update("A/v", np.array([1.0, 2.5]))])
    clock.advance(0)
    assert len(got) == 2


def test_history_sink_gets_every_sample() -> None:
    store, _ = make_store()
    store.define(f64("H/x", deadband_kind=DeadbandKind.ABSOLUTE, deadband=100.0))
    samples: list[tuple[int, Any]] = []

    class Sink:
        def append(self, ts: int, value: Any) -> None:
            samples.append((ts, value))

    store.set_history("H/x", Sink())
    store.apply([Update("H/x", 1.0, source_ns=10), Update("H/x", 2.0, source_ns=20)])
    assert samples == [(10, 1.0), (20, 2.0)]


def test_history_skips_bad_samples_and_time_going_backwards() -> None:
    from iotserver.tags.ring import RingBuffer

    store, _ = make_store()
    store.define(f64("H/x"))
    ring = RingBuffer(16)
    store.set_history("H/x", ring)
    store.apply([Update("H/x", 1.0, source_ns=100), Update("H/x", 2.0, source_ns=200)])
    store.apply([Update("H/x", 2.0, Quality.BAD_NOT_CONNECTED, 300)])  # an outage: a gap
    store.apply([Update("H/x", 3.0, source_ns=150), Update("H/x", 4.0, source_ns=400)])
    ts, values = ring.last_n(16)
    assert list(ts) == [100, 200, 400] and list(values) == [1.0, 2.0, 4.0]
    assert store.stats.history_dropped == 1
    assert store.read("H/x").value == 4.0  # the batch was applied in full


def test_remove_tag() -> None:
    store, _ = make_store()
    seen: list[tuple[str, bool]] = []
    store.on_define(lambda t, added: seen.append((t.path, added)))
    store.define(f64("A/x"))
    store.remove("A/x")
    assert "A/x" not in store and seen == [("A/x", True), ("A/x", False)]
    assert isinstance(TagValue(1, Quality.GOOD, 1, 1), tuple)


def test_memory_write_has_the_effects_of_applying_the_value() -> None:
    """A memory tag's write (no persistence) is ``apply`` of a Good update at server time:
    value and timestamps, history, deadband, notifications and flush all the same."""
    got: list[list[Any]] = [[], []]
    samples: list[list[tuple[int, Any]]] = [[], []]
    stores = []
    for i in range(2):
        store, clock = make_store()
        store.register_owner("memory", MemoryOwner(store))
        store.define(f64("M/x", access=Access.READ_WRITE, deadband_kind=DeadbandKind.ABSOLUTE,
                         deadband=1.0, initial=0.0))
        store.define(TagDef(path="M/i", data_type=DataType.INT32, access=Access.READ_WRITE))
        store.define(TagDef(path="M/quiet", data_type=DataType.INT32, access=Access.READ_WRITE))

        class Sink:
            def append(self, ts: int, value: Any, i: int = i) -> None:
                samples[i].append((ts, value))

        store.set_history("M/x", Sink())
        for pattern in ("M/x", "M/i"):
            store.subscribe(pattern, lambda ch, i=i: got[i].extend(
                (c.tag.path, c.value) for c in ch), initial=False)
        stores.append((store, clock))
    steps = [("M/x", 0.5), ("M/x", 2.0), ("M/i", 3), ("M/i", 3), ("M/quiet", 1), ("M/x", 2.2)]
    for path, value in steps:
        flush = []
        for i, (store, clock) in enumerate(stores):
            clock.advance(0.25)
            if i == 0:
                assert store.write_now(path, value) is Quality.GOOD
            else:
                store.apply([Update(path, value)])
            flush.append(clock.getDelayedCalls() != [])
        assert flush[0] == flush[1]
        for _store, clock in stores:
            clock.advance(0)
    (a, _), (b, _) = stores
    assert got[0] == got[1] and [(p, tv.value) for p, tv in got[0]] == \
        [("M/x", 2.0), ("M/i", 3)]
    assert samples[0] == samples[1] and len(samples[0]) == 3
    for path in ("M/x", "M/i", "M/quiet"):
        tv = a.read(path)
        assert tv == b.read(path) and tv.source_ns == tv.server_ns
    assert a.stats.updates_applied == b.stats.updates_applied == 6
    assert a.stats.notifications == b.stats.notifications
