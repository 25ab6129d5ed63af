"""Tests for iotserver.tags.ring: ring buffer writes, history queries and the registry cap."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotserver.tags.ring import (
    MAX_BUCKETS,
    OutOfOrderError,
    RingBuffer,
    RingMemoryError,
    RingRegistry,
)

# -- helpers: straightforward Python references ------------------------------------------------


def ref_range(samples: list[tuple[int, float]], start: int, end: int) -> list[tuple[int, float]]:
    return [(t, v) for t, v in samples if start <= t < end]


def ref_aggregate(
    samples: list[tuple[int, float]], start: int, end: int, interval: int
) -> list[dict[str, Any]]:
    out = []
    b = start
    while b < end:
        vs = [v for t, v in samples if b <= t < min(b + interval, end)]
        if vs:
            out.append(
                {
                    "start": b,
                    "count": len(vs),
                    "min": min(vs),
                    "max": max(vs),
                    "mean": sum(vs) / len(vs),
                    "rms": math.sqrt(sum(v * v for v in vs) / len(vs)),
                    "first": vs[0],
                    "last": vs[-1],
                }
            )
        else:
            out.append({"start": b, "count": 0})
        b += interval
    return out


def assert_aggregate_matches(agg: dict[str, np.ndarray], ref: list[dict[str, Any]]) -> None:
    assert list(agg["start"]) == [r["start"] for r in ref]
    assert list(agg["count"]) == [r["count"] for r in ref]
    for i, r in enumerate(ref):
        for key in ("min", "max", "mean", "rms", "first", "last"):
            got = float(agg[key][i])
            if r["count"] == 0:
                assert math.isnan(got), (key, i)
            else:
                assert got == pytest.approx(r[key], rel=1e-9, abs=1e-9), (key, i)


def contents(ring: RingBuffer) -> list[tuple[int, float]]:
    ts, vals = ring.last_n(len(ring))
    return list(zip(ts.tolist(), vals.tolist(), strict=True))


def filled(capacity: int, n: int, *, start: int = 0, period: int = 10) -> RingBuffer:
    """A float64 ring after appending n samples t = start + i*period, v = i."""
    ring = RingBuffer(capacity)
    ring.append_block(None, np.arange(n, dtype=np.float64), start_ns=start, period_ns=period)
    return ring


# -- construction and state ----------------------------------------------------------------------


def test_empty_ring_state() -> None:
    ring = RingBuffer(4, np.float32)
    assert len(ring) == 0
    assert ring.capacity == 4
    assert ring.dtype == np.float32
    assert ring.total_appended == 0
    assert ring.dropped == 0
    assert ring.nbytes == 4 * 8 + 4 * 4
    assert ring.latest() is None
    ts, vals = ring.last_n(3)
    assert ts.dtype == np.int64 and vals.dtype == np.float32 and len(ts) == len(vals) == 0
    ts, vals = ring.range(0, 100)
    assert len(ts) == 0 and vals.dtype == np.float32


@pytest.mark.parametrize("capacity", [0, -1])
def test_capacity_must_be_positive(capacity: int) -> None:
    with pytest.raises(ValueError):
        RingBuffer(capacity)


@pytest.mark.parametrize("dtype", [np.complex128, np.str_, object, "datetime64[ns]"])
def test_unsupported_dtype(dtype: Any) -> None:
    with pytest.raises(TypeError):
        RingBuffer(4, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.int64, np.uint32, np.bool_])
def test_supported_dtypes_nbytes(dtype: Any) -> None:
    ring = RingBuffer(10, dtype)
    assert ring.nbytes == RingBuffer.bytes_for(10, dtype) == 10 * (8 + np.dtype(dtype).itemsize)


# -- single appends and wrap-around --------------------------------------------------------------


def test_single_appends_wrap_around() -> None:
    ring = RingBuffer(3)
    for i in range(5):
        ring.append(100 + i, float(i))
    assert contents(ring) == [(102, 2.0), (103, 3.0), (104, 4.0)]
    assert len(ring) == 3
    assert ring.total_appended == 5
    assert ring.dropped == 2
    assert ring.latest() == (104, 4.0)
    assert isinstance(ring.latest()[1], float)  # type: ignore[index]


def test_equal_timestamps_allowed() -> None:
    ring = RingBuffer(4)
    ring.append(5, 1.0)
    ring.append(5, 2.0)
    ring.append_block(np.array([5, 5]), np.array([3.0, 4.0]))
    assert contents(ring) == [(5, 1.0), (5, 2.0), (5, 3.0), (5, 4.0)]


def test_last_n() -> None:
    ring = filled(4, 6)  # holds t=20..50, v=2..5, wrapped
    ts, vals = ring.last_n(3)
    assert ts.tolist() == [30, 40, 50] and vals.tolist() == [3.0, 4.0, 5.0]
    ts, vals = ring.last_n(100)
    assert ts.tolist() == [20, 30, 40, 50]
    assert ring.last_n(0)[0].tolist() == []
    with pytest.raises(ValueError):
        ring.last_n(-1)


def test_last_n_returns_contiguous_copies() -> None:
    ring = filled(8, 5)
    ts, vals = ring.last_n(5)
    assert ts.flags.c_contiguous and vals.flags.c_contiguous
    vals[:] = -1
    ts[:] = 0
    assert ring.last_n(5)[1].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    _rts, rvals = ring.range(0, 1000)
    rvals[:] = -1
    assert ring.range(0, 1000)[1].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


# -- blocks --------------------------------------------------------------------------------------


def test_block_with_explicit_timestamps_wraps() -> None:
    ring = RingBuffer(5, np.int32)
    ring.append_block(np.array([1, 2, 3]), np.array([10, 20, 30], dtype=np.int32))
    ring.append_block(np.array([4, 5, 6, 7]), np.array([40, 50, 60, 70], dtype=np.int32))
    assert contents(ring) == [(3, 30), (4, 40), (5, 50), (6, 60), (7, 70)]
    assert ring.total_appended == 7 and ring.dropped == 2


def test_block_with_period_wraps_exactly_at_end() -> None:
    ring = RingBuffer(4)
    ring.append_block(None, np.array([0.0, 1.0]), start_ns=0, period_ns=10)
    ring.append_block(None, np.array([2.0, 3.0]), start_ns=20, period_ns=10)  # fills to the end
    ring.append_block(None, np.array([4.0]), start_ns=40, period_ns=10)
    assert contents(ring) == [(10, 1.0), (20, 2.0), (30, 3.0), (40, 4.0)]


def test_oversize_block_keeps_newest() -> None:
    ring = RingBuffer(4)
    ring.append(0, -1.0)
    ring.append_block(None, np.arange(10, dtype=np.float64), start_ns=100, period_ns=5)
    assert contents(ring) == [(130, 6.0), (135, 7.0), (140, 8.0), (145, 9.0)]
    assert ring.total_appended == 11 and ring.dropped == 7
    ring.append_block(np.arange(200, 210), np.arange(10, dtype=np.float64))
    assert contents(ring) == [(206, 6.0), (207, 7.0), (208, 8.0), (209, 9.0)]


def test_oversize_block_after_partial_fill_keeps_order() -> None:
    ring = RingBuffer(5)
    ring.append_block(None, np.arange(3, dtype=np.float64), start_ns=0, period_ns=1)
    ring.append_block(None, np.arange(7, dtype=np.float64) + 10, start_ns=10, period_ns=1)
    assert contents(ring) == [(12, 12.0), (13, 13.0), (14, 14.0), (15, 15.0), (16, 16.0)]
    assert ring.latest() == (16, 16.0)


def test_block_exactly_capacity() -> None:
    ring = RingBuffer(3)
    ring.append(0, 0.0)
    ring.append_block(np.array([1, 2, 3]), np.array([1.0, 2.0, 3.0]))
    assert contents(ring) == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_large_period_block_larger_than_step_cache() -> None:
    n = 200_000  # larger than one cached step array, wraps twice
    ring = RingBuffer(150_000, np.float32)
    ring.append_block(None, np.zeros(100_000, np.float32), start_ns=0, period_ns=7)
    ring.append_block(None, np.arange(n, dtype=np.float32), start_ns=700_000, period_ns=7)
    ts, vals = ring.last_n(len(ring))
    expected = 700_000 + 7 * np.arange(n - 150_000, n, dtype=np.int64)
    assert np.array_equal(ts, expected)
    assert np.array_equal(vals, np.arange(n - 150_000, n, dtype=np.float32))


def test_empty_blocks_are_no_ops() -> None:
    ring = filled(4, 2)
    ring.append_block(None, np.array([], dtype=np.float64), start_ns=0, period_ns=1)
    ring.append_block(np.array([], dtype=np.int64), np.array([], dtype=np.float64))
    assert len(ring) == 2 and ring.total_appended == 2


def test_values_cast_same_kind_only() -> None:
    ring = RingBuffer(4, np.float32)
    ring.append_block(None, np.array([1, 2], dtype=np.int64), start_ns=0, period_ns=1)
    ring.append_block(None, [3.5, 4.5], start_ns=2, period_ns=1)
    assert ring.last_n(4)[1].tolist() == [1.0, 2.0, 3.5, 4.5]
    iring = RingBuffer(4, np.int16)
    with pytest.raises(TypeError):
        iring.append_block(None, np.array([1.5]), start_ns=0, period_ns=1)
    assert len(iring) == 0


def test_block_argument_errors() -> None:
    ring = RingBuffer(4)
    with pytest.raises(TypeError):
        ring.append_block(None, np.zeros(2))
    with pytest.raises(TypeError):
        ring.append_block(np.array([1, 2]), np.zeros(2), start_ns=0, period_ns=1)
    with pytest.raises(ValueError):
        ring.append_block(np.array([1, 2, 3]), np.zeros(2))
    with pytest.raises(TypeError):
        ring.append_block(np.array([1.0, 2.0]), np.zeros(2))
    with pytest.raises(ValueError):
        ring.append_block(None, np.zeros((2, 2)), start_ns=0, period_ns=1)
    with pytest.raises(ValueError):
        ring.append_block(None, np.zeros(2), start_ns=0, period_ns=-1)
    with pytest.raises(OverflowError):
        ring.append_block(None, np.zeros(3), start_ns=2**63 - 2, period_ns=1)
    assert len(ring) == 0


# -- time order ----------------------------------------------------------------------------------


def test_out_of_order_single_append_rejected() -> None:
    ring = RingBuffer(4)
    ring.append(100, 1.0)
    with pytest.raises(OutOfOrderError):
        ring.append(99, 2.0)
    assert contents(ring) == [(100, 1.0)]


def test_out_of_order_block_rejected_and_ring_unchanged() -> None:
    ring = filled(4, 4, start=100)  # t = 100..130
    before = contents(ring)
    with pytest.raises(ValueError):  # OutOfOrderError is a ValueError
        ring.append_block(np.array([129, 140]), np.array([1.0, 2.0]))
    with pytest.raises(OutOfOrderError):
        ring.append_block(None, np.array([1.0]), start_ns=129, period_ns=1)
    assert contents(ring) == before
    assert ring.total_appended == 4


def test_unsorted_timestamps_inside_block_rejected() -> None:
    ring = RingBuffer(8)
    with pytest.raises(OutOfOrderError):
        ring.append_block(np.array([1, 3, 2]), np.zeros(3))
    assert len(ring) == 0


def test_block_starting_at_newest_timestamp_accepted() -> None:
    ring = filled(8, 2, start=100)  # t = 100, 110
    ring.append_block(np.array([110, 111]), np.array([7.0, 8.0]))
    assert ring.latest() == (111, 8.0)


# -- range ---------------------------------------------------------------------------------------


def test_range_boundaries() -> None:
    ring = filled(10, 5, start=100)  # t = 100, 110, 120, 130, 140
    assert ring.range(100, 140)[0].tolist() == [100, 110, 120, 130]  # inclusive start, excl. end
    assert ring.range(101, 141)[0].tolist() == [110, 120, 130, 140]
    assert ring.range(0, 100)[0].tolist() == []  # before first
    assert ring.range(141, 1000)[0].tolist() == []  # after last
    assert ring.range(120, 120)[0].tolist() == []  # empty interval
    assert ring.range(130, 120)[0].tolist() == []  # reversed interval
    assert ring.range(-(2**70), 2**70)[0].tolist() == [100, 110, 120, 130, 140]


def test_range_spanning_wrap() -> None:
    ring = filled(5, 8)  # holds t = 30..70; physical order 50,60,70,30,40
    ts, vals = ring.range(35, 65)
    assert ts.tolist() == [40, 50, 60]
    assert vals.tolist() == [4.0, 5.0, 6.0]
    assert ts.flags.c_contiguous
    assert ring.range(30, 50)[0].tolist() == [30, 40]  # only the older segment
    assert ring.range(50, 80)[0].tolist() == [50, 60, 70]  # only the newer segment
    assert ring.range(0, 30)[0].tolist() == []  # overwritten samples are gone


# -- aggregate -----------------------------------------------------------------------------------


def test_aggregate_against_reference_with_empty_buckets() -> None:
    ring = RingBuffer(16)
    samples = [(0, 1.0), (1, -2.0), (2, 3.0), (9, 4.0), (10, 5.0), (11, -6.0), (25, 7.0)]
    for t, v in samples:
        ring.append(t, v)
    agg = ring.aggregate(0, 30, 5)
    ref = ref_aggregate(samples, 0, 30, 5)
    assert [r["count"] for r in ref] == [3, 1, 2, 0, 0, 1]
    assert_aggregate_matches(agg, ref)
    assert agg["start"].dtype == np.int64 and agg["count"].dtype == np.int64


def test_aggregate_partial_last_bucket_and_offsets() -> None:
    ring = filled(100, 50, start=1000, period=3)
    samples = contents(ring)
    for start, end, interval in [(1000, 1150, 20), (995, 1100, 7), (1010, 1011, 5), (900, 999, 10)]:
        assert_aggregate_matches(
            ring.aggregate(start, end, interval), ref_aggregate(samples, start, end, interval)
        )


def test_aggregate_spanning_wrap() -> None:
    ring = RingBuffer(6)
    samples = [(t, float((t * 7) % 11 - 5)) for t in range(0, 100, 7)]
    for t, v in samples:
        ring.append(t, v)
    kept = samples[-6:]
    assert_aggregate_matches(ring.aggregate(50, 110, 13), ref_aggregate(kept, 50, 110, 13))


def test_aggregate_on_empty_ring_and_empty_interval() -> None:
    ring = RingBuffer(4)
    agg = ring.aggregate(0, 10, 3)
    assert agg["count"].tolist() == [0, 0, 0, 0]
    assert agg["start"].tolist() == [0, 3, 6, 9]
    assert np.isnan(agg["mean"]).all()
    agg = filled(4, 4).aggregate(10, 10, 5)
    assert all(len(a) == 0 for a in agg.values())
    assert set(agg) == {"start", "count", "min", "max", "mean", "rms", "first", "last"}


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_, np.float32])
def test_aggregate_other_dtypes(dtype: Any) -> None:
    ring = RingBuffer(8, dtype)
    raw = [1, 0, 1, 1, 0, 1] if dtype is np.bool_ else [3, 1, 4, 1, 5, 9]
    ring.append_block(None, np.array(raw, dtype=dtype), start_ns=0, period_ns=1)
    samples = [(t, float(v)) for t, v in enumerate(raw)]
    assert_aggregate_matches(ring.aggregate(0, 6, 4), ref_aggregate(samples, 0, 6, 4))


def test_aggregate_argument_errors() -> None:
    ring = filled(4, 4)
    with pytest.raises(ValueError):
        ring.aggregate(0, 10, 0)
    with pytest.raises(ValueError):
        ring.aggregate(10, 0, 1)
    with pytest.raises(ValueError):
        ring.aggregate(0, MAX_BUCKETS + 1, 1)


# -- envelope ------------------------------------------------------------------------------------


def test_envelope_min_max_per_bucket() -> None:
    ring = RingBuffer(32)
    vals = [5.0, -1.0, 3.0, 8.0, 2.0, 2.0, 0.0, 9.0, -4.0, 1.0]
    ring.append_block(None, np.array(vals), start_ns=0, period_ns=10)  # t = 0..90
    starts, mins, maxs = ring.envelope(0, 100, 4)  # edges 0, 25, 50, 75, 100
    assert starts.tolist() == [0, 25, 50, 75]
    assert mins.tolist() == [-1.0, 2.0, 0.0, -4.0]
    assert maxs.tolist() == [5.0, 8.0, 9.0, 1.0]


def test_envelope_uneven_split_and_empty_buckets() -> None:
    ring = RingBuffer(8)
    ring.append(0, 1.0)
    ring.append(9, 2.0)
    starts, mins, maxs = ring.envelope(0, 10, 3)  # floor(k*10/3): 0, 3, 6
    assert starts.tolist() == [0, 3, 6]
    assert mins[0] == 1.0 and maxs[0] == 1.0
    assert math.isnan(mins[1]) and math.isnan(maxs[1])
    assert mins[2] == 2.0 and maxs[2] == 2.0


def test_envelope_matches_reference_over_wrap() -> None:
    rng = np.random.default_rng(7)
    ring = RingBuffer(50)
    ts = np.cumsum(rng.integers(0, 5, 120)).astype(np.int64)
    vals = rng.normal(size=120)
    ring.append_block(ts[:70], vals[:70])
    ring.append_block(ts[70:], vals[70:])
    samples = list(zip(ts[-50:].tolist(), vals[-50:].tolist(), strict=True))
    start, end, nb = int(ts[-50]) - 3, int(ts[-1]) + 1, 7
    starts, mins, maxs = ring.envelope(start, end, nb)
    edges = [start + (k * (end - start)) // nb for k in range(nb)] + [end]
    assert starts.tolist() == edges[:-1]
    for k in range(nb):
        vs = [v for t, v in samples if edges[k] <= t < edges[k + 1]]
        if vs:
            assert (mins[k], maxs[k]) == (min(vs), max(vs))
        else:
            assert math.isnan(mins[k]) and math.isnan(maxs[k])


def test_envelope_no_overflow_on_wide_spans() -> None:
    ring = RingBuffer(4)
    ring.append(1_700_000_000_000_000_000, 1.0)
    starts, mins, _ = ring.envelope(0, 2**62, 1000)
    assert starts[1] == 2**62 // 1000
    assert np.nansum(mins) == 1.0


def test_envelope_argument_errors() -> None:
    ring = filled(4, 4)
    with pytest.raises(ValueError):
        ring.envelope(0, 10, 0)
    with pytest.raises(ValueError):
        ring.envelope(10, 0, 2)
    with pytest.raises(ValueError):
        ring.envelope(0, 10, MAX_BUCKETS + 1)


# -- registry ------------------------------------------------------------------------------------


def test_registry_create_get_remove() -> None:
    reg = RingRegistry()
    a = reg.create("Line1/Press/Temperature", 100, np.float32)
    b = reg.create("vib/ch0", 1000)
    assert reg.get("Line1/Press/Temperature") is a
    assert reg.names() == ["Line1/Press/Temperature", "vib/ch0"]
    assert "vib/ch0" in reg and len(reg) == 2
    assert reg.total_bytes == a.nbytes + b.nbytes == 100 * 12 + 1000 * 16
    with pytest.raises(ValueError):
        reg.create("vib/ch0", 10)
    reg.remove("vib/ch0")
    assert reg.names() == ["Line1/Press/Temperature"]
    assert reg.total_bytes == 1200
    with pytest.raises(KeyError):
        reg.get("vib/ch0")
    with pytest.raises(KeyError):
        reg.remove("vib/ch0")


def test_registry_memory_report() -> None:
    reg = RingRegistry(max_bytes=10_000)
    reg.create("b", 10, np.int16)
    reg.create("a", 20)
    report = reg.memory_report()
    assert report["total_bytes"] == 10 * 10 + 20 * 16
    assert report["max_bytes"] == 10_000
    assert report["rings"] == {"a": 320, "b": 100}
    assert isinstance(report["step_cache_bytes"], int)


def test_registry_memory_cap() -> None:
    reg = RingRegistry(max_bytes=1000)
    reg.create("a", 50)  # 800 bytes
    with pytest.raises(RingMemoryError) as info:
        reg.create("big", 20)  # 320 more: 1120 > 1000
    assert isinstance(info.value, MemoryError)
    msg = str(info.value)
    assert "'big'" in msg and "320" in msg and "800" in msg and "1000" in msg
    assert info.value.requested == 320 and info.value.in_use == 800
    assert reg.names() == ["a"] and reg.total_bytes == 800
    reg.create("fits", 12)  # 192 bytes: exactly 992
    reg.remove("a")
    reg.create("big", 20)  # room again after remove
    assert reg.total_bytes == 192 + 320


def test_registry_rejects_bad_ring_arguments_without_accounting() -> None:
    reg = RingRegistry(max_bytes=1000)
    with pytest.raises(ValueError):
        reg.create("x", 0)
    with pytest.raises(TypeError):
        reg.create("x", 4, np.complex64)
    assert reg.total_bytes == 0 and reg.names() == []


# -- property test -------------------------------------------------------------------------------

_value = st.integers(-1000, 1000).map(float)
_op = st.one_of(
    st.tuples(st.just("one"), st.integers(0, 20), _value),
    st.tuples(
        st.just("block"), st.lists(st.tuples(st.integers(0, 20), _value), min_size=0, max_size=30)
    ),
    st.tuples(
        st.just("period"),
        st.integers(0, 20),
        st.integers(0, 7),
        st.lists(_value, min_size=0, max_size=30),
    ),
)


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(1, 17),
    ops=st.lists(_op, max_size=12),
    queries=st.lists(
        st.tuples(st.integers(-10, 600), st.integers(0, 300), st.integers(1, 60)), max_size=4
    ),
)
def test_property_range_and_aggregate_match_reference(
    capacity: int, ops: list[tuple[Any, ...]], queries: list[tuple[int, int, int]]
) -> None:
    ring = RingBuffer(capacity)
    appended: list[tuple[int, float]] = []
    now = 0
    for op in ops:
        if op[0] == "one":
            now += op[1]
            ring.append(now, op[2])
            appended.append((now, op[2]))
        elif op[0] == "block":
            block = []
            for gap, v in op[1]:
                now += gap
                block.append((now, v))
            ts = np.array([t for t, _ in block], dtype=np.int64)
            ring.append_block(ts, np.array([v for _, v in block], dtype=np.float64))
            appended.extend(block)
        else:
            _, gap, period, vals = op
            start = now + gap
            block_vals = np.array(vals, dtype=np.float64)
            ring.append_block(None, block_vals, start_ns=start, period_ns=period)
            block = [(start + i * period, v) for i, v in enumerate(vals)]
            appended.extend(block)
            if block:
                now = block[-1][0]
    kept = appended[-capacity:] if appended else []
    assert contents(ring) == kept
    assert ring.total_appended == len(appended)
    assert ring.dropped == len(appended) - len(kept)
    for start, length, interval in queries:
        end = start + length
        ts, vals = ring.range(start, end)
        assert list(zip(ts.tolist(), vals.tolist(), strict=True)) == ref_range(kept, start, end)
        assert_aggregate_matches(
            ring.aggregate(start, end, interval), ref_aggregate(kept, start, end, interval)
        )
