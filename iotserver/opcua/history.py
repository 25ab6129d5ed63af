"""HistoryRead from the ring buffers: raw, processed (aggregates) and at-time (Part 11).

Tag variables read ``tag:<path>`` rings, signal-channel variables read ``signal:<channel>``
(the raw waveform). Semantics (Part 11 6.4):

* ReadRaw: ``startTime <= t < endTime`` forward, or ``endTime < t <= startTime`` newest first
  when endTime < startTime; only one of them given needs numValuesPerNode > 0; returnBounds adds
  the bounding values (Bad_BoundNotFound when none); an empty range is Good_NoData.
* numValuesPerNode (0 = all) and ``max_history_values`` page the result with continuation
  points. They are stateless: the position (a timestamp and how many samples sharing it were
  already sent) travels in the point itself, authenticated with a per-server key, so an idle
  client holds no server memory and ReleaseContinuationPoints has nothing to free.
* ReadProcessed: the aggregates of :mod:`iotserver.opcua.aggregates`, one per node.
* ReadAtTime: interpolated values at the requested times (sloped for floats, stepped otherwise).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from typing import Any

import numpy as np
from asyncua import ua

from iotserver.opcua import aggregates as agg
from iotserver.opcua.convert import datetime_to_ns, ns_to_datetime, status
from iotserver.tags.model import DataType
from iotserver.tags.ring import RingBuffer, RingRegistry

_CP = struct.Struct("<BBqqq")  # kind, phase, next_ts, skip, index
_MAC_LEN = 12
RAW, PROCESSED = 1, 2
_MIN_NS = -(2**63)
_MAX_NS = 2**63 - 1


class HistoryError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(hex(code))
        self.code = code


class Series:
    """What HistoryRead needs to know about one historized node."""

    def __init__(self, key: str, ring: RingBuffer, vtype: ua.VariantType, stepped: bool) -> None:
        self.key = key
        self.ring = ring
        self.vtype = vtype
        self.stepped = stepped

    def to_python(self, value: Any) -> Any:
        if self.vtype == ua.VariantType.Boolean:
            return bool(value)
        if self.vtype in (ua.VariantType.Float, ua.VariantType.Double):
            return float(value)
        return int(value)


class HistoryReader:
    def __init__(self, rings: RingRegistry, max_values: int) -> None:
        self.rings = rings
        self.max_values = max_values
        self._key = secrets.token_bytes(32)

    # -- continuation points -------------------------------------------------------------
    def _pack(self, series: Series, kind: int, phase: int, next_ts: int, skip: int,
              index: int) -> bytes:
        body = _CP.pack(kind, phase, next_ts, skip, index)
        mac = hmac.new(self._key, series.key.encode() + body, hashlib.sha256).digest()
        return body + mac[:_MAC_LEN]

    def _unpack(self, series: Series, kind: int, point: bytes) -> tuple[int, int, int, int]:
        body, mac = point[: _CP.size], point[_CP.size:]
        good = hmac.new(self._key, series.key.encode() + body, hashlib.sha256).digest()
        if len(point) != _CP.size + _MAC_LEN or not hmac.compare_digest(mac, good[:_MAC_LEN]):
            raise HistoryError(ua.StatusCodes.BadContinuationPointInvalid)
        k, phase, next_ts, skip, index = _CP.unpack(body)
        if k != kind:
            raise HistoryError(ua.StatusCodes.BadContinuationPointInvalid)
        return phase, next_ts, skip, index

    # -- entry point ---------------------------------------------------------------------
    def read(self, details: Any, series: Series, rv: ua.HistoryReadValueId,
             timestamps: ua.TimestampsToReturn, release: bool, aggregate: ua.NodeId | None
             ) -> ua.HistoryReadResult:
        result = ua.HistoryReadResult()
        result.HistoryData = ua.HistoryData()
        if release and rv.ContinuationPoint:
            # Part 4 5.11.3: release the point (stateless: nothing to free), return no data.
            # Items without a point are read normally: asyncua clients send release=True by
            # default on every first request.
            return result
        try:
            if timestamps in (ua.TimestampsToReturn.Neither, ua.TimestampsToReturn.Invalid):
                raise HistoryError(ua.StatusCodes.BadTimestampsToReturnInvalid)
            if rv.IndexRange:
                raise HistoryError(ua.StatusCodes.BadIndexRangeInvalid)
            if isinstance(details, ua.ReadRawModifiedDetails):
                if details.IsReadModified:
                    raise HistoryError(ua.StatusCodes.BadHistoryOperationUnsupported)
                values, point = self._raw(details, series, rv.ContinuationPoint)
            elif isinstance(details, ua.ReadProcessedDetails):
                values, point = self._processed(details, series, rv.ContinuationPoint,
                                                aggregate)
            elif isinstance(details, ua.ReadAtTimeDetails):
                values, point = self._at_time(details, series), None
            else:
                raise HistoryError(ua.StatusCodes.BadHistoryOperationUnsupported)
        except HistoryError as exc:
            result.StatusCode = status(exc.code)
            return result
        if timestamps == ua.TimestampsToReturn.Server:
            values = [ua.DataValue(v.Value, v.StatusCode, None, v.SourceTimestamp)
                      for v in values]
        elif timestamps == ua.TimestampsToReturn.Both:
            values = [ua.DataValue(v.Value, v.StatusCode, v.SourceTimestamp, v.SourceTimestamp)
                      for v in values]
        result.HistoryData.DataValues = values
        result.ContinuationPoint = point
        if not values and not point:
            result.StatusCode = status(ua.StatusCodes.GoodNoData)
        return result

    # -- raw -----------------------------------------------------------------------------
    def _dv(self, series: Series, ts: int, value: Any, code: int = 0) -> ua.DataValue:
        variant = (ua.Variant(series.to_python(value), series.vtype) if value is not None
                   else ua.Variant(None, ua.VariantType.Null))
        return ua.DataValue(variant, status(code), ns_to_datetime(ts))

    def _raw(self, d: ua.ReadRawModifiedDetails, series: Series, point: bytes | None
             ) -> tuple[list[ua.DataValue], bytes | None]:
        start = datetime_to_ns(d.StartTime) if _given(d.StartTime) else None
        end = datetime_to_ns(d.EndTime) if _given(d.EndTime) else None
        num = int(d.NumValuesPerNode or 0)
        if start is None and end is None:
            raise HistoryError(ua.StatusCodes.BadHistoryOperationInvalid)
        if (start is None or end is None) and num == 0:
            raise HistoryError(ua.StatusCodes.BadHistoryOperationInvalid)
        forward = end is None or (start is not None and end > start)
        limit = min(num or self.max_values, self.max_values)
        ring = series.ring
        phase, next_ts, skip = 0, 0, 0
        if point:
            phase, next_ts, skip, _ = self._unpack(series, RAW, point)
        bounds = bool(d.ReturnBounds)
        out: list[ua.DataValue] = []
        if start is not None and end is not None and start == end:
            ts, vals = ring.range(start, start + 1)
            return [self._dv(series, int(t), v) for t, v in zip(ts, vals, strict=True)], None
        if forward:
            lo = start if start is not None else _MIN_NS
            hi = end if end is not None else _MAX_NS
            if phase == 0 and bounds and start is not None and not _has(ring, lo):
                out.append(self._bound(series, lo, before=True))
            if phase <= 1:
                ts, vals = ring.range(max(lo, next_ts) if phase == 1 else lo, hi)
                ts, vals = ts[skip if phase == 1 else 0:], vals[skip if phase == 1 else 0:]
                room = limit - len(out)
                for t, v in zip(ts[:room], vals[:room], strict=True):
                    out.append(self._dv(series, int(t), v))
                if len(ts) > room:
                    last = int(ts[room - 1]) if room else (next_ts if phase == 1 else lo)
                    already = (skip if phase == 1 and last == next_ts else 0) + \
                        int(np.count_nonzero(ts[:room] == last))
                    return out, self._pack(series, RAW, 1, last, already, 0)
            if bounds and end is not None:
                if len(out) >= limit:
                    return out, self._pack(series, RAW, 2, 0, 0, 0)
                out.append(self._bound(series, hi, before=False))
            return out, None
        # newest first: endTime < t <= startTime
        top = start if start is not None else end
        assert top is not None
        bottom = end if start is not None and end is not None else _MIN_NS
        if phase == 0 and bounds and start is not None and not _has(ring, top):
            out.append(self._bound(series, top, before=False))
        if phase <= 1:
            upper = (next_ts + 1) if phase == 1 else top + 1
            ts, vals = ring.range(bottom + 1 if bottom != _MIN_NS else _MIN_NS, upper)
            ts, vals = ts[::-1], vals[::-1]
            if phase == 1:
                ts, vals = ts[skip:], vals[skip:]
            room = limit - len(out)
            for t, v in zip(ts[:room], vals[:room], strict=True):
                out.append(self._dv(series, int(t), v))
            if len(ts) > room:
                last = int(ts[room - 1]) if room else (next_ts if phase == 1 else top)
                already = (skip if phase == 1 and last == next_ts else 0) + \
                    int(np.count_nonzero(ts[:room] == last))
                return out, self._pack(series, RAW, 1, last, already, 0)
        if bounds and start is not None and end is not None:
            if len(out) >= limit:
                return out, self._pack(series, RAW, 2, 0, 0, 0)
            out.append(self._bound(series, bottom, before=True))
        return out, None

    def _bound(self, series: Series, at: int, *, before: bool) -> ua.DataValue:
        """The bounding value at ``at`` (Part 11 6.4.3.2), or Bad_BoundNotFound.

        ``before``: the sample at or before ``at``, else the one at or after it. A sample
        exactly at a start time is already the first raw value, so callers skip the bound then.
        """
        ring = series.ring
        if before:
            ts, vals = ring.range(_MIN_NS, at + 1)
            if len(ts):
                return self._dv(series, int(ts[-1]), vals[-1])
        else:
            ts, vals = ring.range(at, _MAX_NS)
            if len(ts):
                return self._dv(series, int(ts[0]), vals[0])
        return self._dv(series, at, None, ua.StatusCodes.BadBoundNotFound)

    # -- processed -----------------------------------------------------------------------
    def _processed(self, d: ua.ReadProcessedDetails, series: Series, point: bytes | None,
                   aggregate: ua.NodeId | None) -> tuple[list[ua.DataValue], bytes | None]:
        if aggregate is None or aggregate.NamespaceIndex != 0 or \
                aggregate.Identifier not in agg.AGGREGATES:
            raise HistoryError(ua.StatusCodes.BadAggregateNotSupported)
        name = agg.AGGREGATES[aggregate.Identifier]
        if not _given(d.StartTime) or not _given(d.EndTime):
            raise HistoryError(ua.StatusCodes.BadInvalidArgument)
        start, end = datetime_to_ns(d.StartTime), datetime_to_ns(d.EndTime)
        if start == end or d.ProcessingInterval < 0:
            raise HistoryError(ua.StatusCodes.BadInvalidArgument)  # Part 13 5.4.2.2
        interval_ns = int(d.ProcessingInterval * 1_000_000)
        span = abs(end - start)
        count = -(-span // interval_ns) if 0 < interval_ns < span else 1
        if count > 1 << 22:
            raise HistoryError(ua.StatusCodes.BadTooManyOperations)
        a, b, _ = agg.intervals(start, end, interval_ns)
        first = 0
        if point:
            _, _, _, first = self._unpack(series, PROCESSED, point)
        a, b = a[first:first + self.max_values], b[first:first + self.max_values]
        if not len(a):
            return [], None
        lo_t, hi_t = int(min(a.min(), b.min())), int(max(a.max(), b.max()))
        ts, vals = self._with_bounds(series.ring, lo_t, hi_t)
        res = agg.compute(name, ts, vals, a, b, interval_ns, series.stepped)
        out = []
        for value, t, code in zip(res.values.tolist(), res.times.tolist(), res.codes.tolist(),
                                  strict=True):
            if code & 0x80000000 or value != value:  # Bad or NaN: no value
                variant = ua.Variant(None, ua.VariantType.Null)
            elif res.integer:
                variant = ua.Variant(int(value), ua.VariantType.Int32)
            elif res.same_type:
                variant = ua.Variant(series.to_python(value), series.vtype)
            else:
                variant = ua.Variant(float(value), ua.VariantType.Double)
            out.append(ua.DataValue(variant, status(code), ns_to_datetime(int(t))))
        nxt = first + len(a)
        more = nxt < count
        return out, self._pack(series, PROCESSED, 0, 0, 0, nxt) if more else None

    @staticmethod
    def _with_bounds(ring: RingBuffer, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Samples in [lo, hi) plus the one before lo and the one at/after hi."""
        ts, vals = ring.range(lo, hi)
        before_t, before_v = ring.range(_MIN_NS, lo)
        after_t, after_v = ring.range(hi, _MAX_NS)
        parts_t = [before_t[-1:], ts, after_t[:1]]
        parts_v = [before_v[-1:], vals, after_v[:1]]
        return np.concatenate(parts_t), np.concatenate(parts_v)

    # -- at time -------------------------------------------------------------------------
    def _at_time(self, d: ua.ReadAtTimeDetails, series: Series) -> list[ua.DataValue]:
        times = [datetime_to_ns(t) for t in d.ReqTimes or []]
        if len(times) > self.max_values:
            raise HistoryError(ua.StatusCodes.BadTooManyOperations)
        if not times:
            return []
        at = np.array(times, dtype=np.int64)
        ts, vals = self._with_bounds(series.ring, int(at.min()), int(at.max()) + 1)
        values, codes = agg.interpolate(ts, vals, at, series.stepped)
        out = []
        for value, t, code in zip(values.tolist(), times, codes.tolist(), strict=True):
            if code & 0x80000000:
                variant = ua.Variant(None, ua.VariantType.Null)
            else:
                variant = ua.Variant(series.to_python(value), series.vtype)
            out.append(ua.DataValue(variant, status(code), ns_to_datetime(t)))
        return out


def _has(ring: RingBuffer, at: int) -> bool:
    return len(ring.range(at, at + 1)[0]) > 0


def _given(when: Any) -> bool:
    """A DateTime parameter is "not specified" when null or the OPC UA minimum (Part 6 5.2.2.5)."""
    if when is None:
        return False
    return bool(when.year > 1601)


def stepped(data_type: DataType) -> bool:
    """Integers and booleans are stepped; floats sloped (Part 13 3.1.5, 3.1.6)."""
    return not data_type.is_numeric or data_type.is_integer
