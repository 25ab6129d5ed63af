"""HistoryRead over ring buffers: raw (bounds, reverse, paging), processed, at-time."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import pytest_twisted
from asyncua import ua
from helpers import free_port
from helpers.opcua import TAGS, Running, aio, client, make_config, start

from iotserver.opcua.history import HistoryReader, Series
from iotserver.tags.model import Update
from iotserver.tags.ring import RingRegistry

S = 1_000_000_000
T0 = 1_800_000_000 * S  # sample k at T0 + k seconds, value k


def at(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp((T0 + int(seconds * S)) / S, dt.UTC)


def secs(dv: ua.DataValue) -> float:
    return round((dv.SourceTimestamp.timestamp() * S - T0) / S, 3)


@pytest.fixture
def reader() -> tuple[HistoryReader, Series]:
    rings = RingRegistry()
    ring = rings.create("tag:X", 1000)
    ring.append_block(np.arange(T0, T0 + 10 * S, S, dtype=np.int64), np.arange(10.0))
    return HistoryReader(rings, max_values=4), Series("tag:X", ring, ua.VariantType.Double, False)


def raw(start: float | None, end: float | None, num: int = 0, bounds: bool = False
        ) -> ua.ReadRawModifiedDetails:
    d = ua.ReadRawModifiedDetails()
    d.StartTime = at(start) if start is not None else None
    d.EndTime = at(end) if end is not None else None
    d.NumValuesPerNode = num
    d.ReturnBounds = bounds
    d.IsReadModified = False
    return d


def read(reader: HistoryReader, series: Series, details: Any, cp: bytes | None = None,
         aggregate: int | None = None) -> ua.HistoryReadResult:
    rv = ua.HistoryReadValueId()
    rv.ContinuationPoint = cp
    agg = ua.NodeId(aggregate) if aggregate else None
    return reader.read(details, series, rv, ua.TimestampsToReturn.Source, False, agg)


def read_all(reader: HistoryReader, series: Series, details: Any) -> list[ua.DataValue]:
    out: list[ua.DataValue] = []
    cp = None
    for _ in range(20):
        res = read(reader, series, details, cp)
        assert res.StatusCode.is_good(), res.StatusCode
        out += res.HistoryData.DataValues
        cp = res.ContinuationPoint
        if not cp:
            return out
    raise AssertionError("continuation points never ended")


def test_raw_forward_pages_with_continuation_points(reader: Any) -> None:
    r, s = reader
    first = read(r, s, raw(2, 9))
    assert [secs(v) for v in first.HistoryData.DataValues] == [2, 3, 4, 5]
    assert first.ContinuationPoint
    values = read_all(r, s, raw(2, 9))
    assert [v.Value.Value for v in values] == [2, 3, 4, 5, 6, 7, 8]  # end excluded


def test_raw_reverse_bounds_and_num_values(reader: Any) -> None:
    r, s = reader
    rev = read_all(r, s, raw(7, 2))  # endTime < startTime: newest first, start included
    assert [v.Value.Value for v in rev] == [7, 6, 5, 4, 3]
    only_start = read(r, s, raw(5, None, num=3)).HistoryData.DataValues
    assert [v.Value.Value for v in only_start] == [5, 6, 7]
    only_end = read(r, s, raw(None, 5, num=2)).HistoryData.DataValues
    assert [v.Value.Value for v in only_end] == [5, 4]
    bounded = read_all(r, s, raw(2.5, 5.5, bounds=True))
    assert [(secs(v), v.Value.Value) for v in bounded] == [(2, 2), (3, 3), (4, 4), (5, 5), (6, 6)]
    outside = read_all(r, s, raw(-5, -1, bounds=True))
    assert [v.StatusCode.value for v in outside] == [ua.StatusCodes.BadBoundNotFound, 0]
    assert secs(outside[0]) == -5 and outside[1].Value.Value == 0


def test_raw_invalid_and_empty(reader: Any) -> None:
    r, s = reader
    assert read(r, s, raw(None, None)).StatusCode.value == ua.StatusCodes.BadHistoryOperationInvalid
    assert read(r, s, raw(3, None)).StatusCode.value == ua.StatusCodes.BadHistoryOperationInvalid
    empty = read(r, s, raw(20, 30))
    assert empty.StatusCode.value == ua.StatusCodes.GoodNoData
    assert empty.HistoryData.DataValues == []
    bad = read(r, s, raw(2, 9), cp=b"garbage")
    assert bad.StatusCode.value == ua.StatusCodes.BadContinuationPointInvalid


def test_equal_timestamps_are_not_lost_across_pages() -> None:
    rings = RingRegistry()
    ring = rings.create("tag:Y", 100)
    ring.append_block(np.array([T0, T0 + S, T0 + S, T0 + S, T0 + S, T0 + S, T0 + 2 * S]),
                      np.arange(7.0))
    r, s = HistoryReader(rings, 2), Series("tag:Y", ring, ua.VariantType.Double, False)
    assert [v.Value.Value for v in read_all(r, s, raw(0, 10))] == list(range(7))
    assert [v.Value.Value for v in read_all(r, s, raw(10, -1))] == list(range(6, -1, -1))


def processed(start: float, end: float, interval_s: float, n: int = 1
              ) -> ua.ReadProcessedDetails:
    d = ua.ReadProcessedDetails()
    d.StartTime, d.EndTime = at(start), at(end)
    d.ProcessingInterval = interval_s * 1000
    return d


@pytest.mark.parametrize(("aggregate", "expected"), [
    (ua.ObjectIds.AggregateFunction_Average, [0.5, 2.5, 4.5]),
    (ua.ObjectIds.AggregateFunction_Minimum, [0, 2, 4]),
    (ua.ObjectIds.AggregateFunction_Maximum, [1, 3, 5]),
    (ua.ObjectIds.AggregateFunction_Count, [2, 2, 2]),
    (ua.ObjectIds.AggregateFunction_Start, [0, 2, 4]),
    (ua.ObjectIds.AggregateFunction_End, [1, 3, 5]),
    (ua.ObjectIds.AggregateFunction_Interpolative, [0, 2, 4]),
    (ua.ObjectIds.AggregateFunction_Total, [2.0, 6.0, 10.0]),  # trapezoids, value x seconds
])
def test_processed_aggregates(reader: Any, aggregate: int, expected: list[float]) -> None:
    r, s = reader
    res = read(r, s, processed(0, 6, 2), aggregate=aggregate)
    assert res.StatusCode.is_good()
    assert [v.Value.Value for v in res.HistoryData.DataValues] == pytest.approx(expected)
    stamps = [secs(v) for v in res.HistoryData.DataValues]
    if aggregate == ua.ObjectIds.AggregateFunction_End:
        assert stamps == [1, 3, 5]  # time of the raw value (Part 13 5.4.3.26)
    else:
        assert stamps == [0, 2, 4]


def test_processed_status_bits_empty_intervals_and_errors(reader: Any) -> None:
    r, s = reader
    res = read(r, s, processed(8, 14, 2), aggregate=ua.ObjectIds.AggregateFunction_Average)
    codes = [v.StatusCode.value for v in res.HistoryData.DataValues]
    assert codes[0] == 0x0401  # Good, Calculated
    assert codes[1] == codes[2] == ua.StatusCodes.BadNoData
    count = read(r, s, processed(8, 14, 2), aggregate=ua.ObjectIds.AggregateFunction_Count)
    assert [v.Value.Value for v in count.HistoryData.DataValues] == [2, 0, 0]
    partial = read(r, s, processed(0, 5, 2), aggregate=ua.ObjectIds.AggregateFunction_Average)
    assert partial.HistoryData.DataValues[-1].StatusCode.value & 0x4  # Partial interval
    stddev = ua.ObjectIds.AggregateFunction_StandardDeviationSample
    unknown = read(r, s, processed(0, 6, 2), aggregate=stddev)
    assert unknown.StatusCode.value == ua.StatusCodes.BadAggregateNotSupported
    same = read(r, s, processed(3, 3, 1), aggregate=ua.ObjectIds.AggregateFunction_Average)
    assert same.StatusCode.value == ua.StatusCodes.BadInvalidArgument
    # ten intervals with max_values 4: continuation points
    pages = read(r, s, processed(0, 10, 1), aggregate=ua.ObjectIds.AggregateFunction_Maximum)
    assert len(pages.HistoryData.DataValues) == 4 and pages.ContinuationPoint


def test_read_at_time_interpolates(reader: Any) -> None:
    r, s = reader
    d = ua.ReadAtTimeDetails()
    d.ReqTimes = [at(3), at(3.25), at(-1), at(20)]
    values = read(r, s, d).HistoryData.DataValues
    assert values[0].Value.Value == 3 and values[0].StatusCode.value == 0
    assert values[1].Value.Value == pytest.approx(3.25)
    assert values[1].StatusCode.value == 0x0402  # Good, Interpolated
    assert values[2].StatusCode.value == ua.StatusCodes.BadNoData
    assert values[3].Value.Value == 9  # extrapolated with the last value: Uncertain
    assert values[3].StatusCode.value & 0xC0000000 == 0x40000000


# -- through the server ---------------------------------------------------------------------


@pytest_twisted.async_yield_fixture(scope="module")
async def srv(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    signals = """
[[signals]]
name = "Plant/Line1/Pump1/Vibration"
sample_rate = 10240
block_size = 1024
capacity = 65536
"""
    running = await start(make_config(tmp_path_factory.mktemp("hist") / "data", free_port(),
                                      simulator=True, tags=TAGS + signals))
    for k in range(50):
        running.store.apply([Update("Line1/Temp", float(k), source_ns=T0 + k * S)])
    yield running
    await running.root.stopService()


@pytest.mark.interop
@pytest_twisted.ensureDeferred
async def test_history_read_through_asyncua(srv: Running) -> None:
    async def body() -> None:
        async with client(srv, user="bob") as c:
            ns = int(await c.get_namespace_index(srv.namespace))
            node = c.get_node(ua.NodeId("Line1/Temp", ns))
            values = await node.read_raw_history(at(10), at(20))  # with bounds by default
            assert [v.Value.Value for v in values] == [float(k) for k in range(10, 21)]
            params = ua.HistoryReadParameters()
            details = ua.ReadProcessedDetails()
            details.StartTime, details.EndTime = at(0), at(50)
            details.ProcessingInterval = 10_000
            details.AggregateType = [ua.NodeId(ua.ObjectIds.AggregateFunction_Average)]
            params.HistoryReadDetails = details
            params.TimestampsToReturn = ua.TimestampsToReturn.Source
            params.ReleaseContinuationPoints = False
            rv = ua.HistoryReadValueId()
            rv.NodeId = node.nodeid
            params.NodesToRead = [rv]
            (result,) = await c.uaclient.history_read(params)
            assert [v.Value.Value for v in result.HistoryData.DataValues] == \
                pytest.approx([4.5, 14.5, 24.5, 34.5, 44.5])
            # a tag without history answers per item, not with a fault
            sp = c.get_node(ua.NodeId("Line1/Setpoint", ns))
            rv2 = ua.HistoryReadValueId()
            rv2.NodeId = sp.nodeid
            params.NodesToRead = [rv, rv2]
            details.AggregateType = [details.AggregateType[0]] * 2
            res = await c.uaclient.history_read(params)
            assert res[1].StatusCode.value == ua.StatusCodes.BadNotReadable
            # the raw waveform of the simulated vibration channel
            wave = c.get_node(ua.NodeId("Plant/Line1/Pump1/Vibration", ns))
            now = dt.datetime.now(dt.UTC)
            samples = await wave.read_raw_history(now - dt.timedelta(seconds=30), now,
                                                  numvalues=500)
            assert len(samples) == 500
            assert samples[-1].Value.VariantType == ua.VariantType.Float  # [0] is a bound
            latest = await wave.read_data_value()
            assert latest.StatusCode.is_good() and isinstance(latest.Value.Value, float)
            rms = c.get_node(ua.NodeId("Plant/Line1/Pump1/Vibration/RMS", ns))
            assert (await rms.read_browse_name()).Name == "RMS"
    await aio(body())
