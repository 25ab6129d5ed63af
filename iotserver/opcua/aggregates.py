"""OPC UA aggregates (Part 13) over ring-buffer samples, one numpy pass per request.

Input: the raw samples ``ts`` (int64 ns, ascending) and ``vals`` of a range that also holds the
bounding samples just outside the requested time span (needed for interpolation), and the
intervals ``[a_k, b_k)``. Every aggregate is computed for all intervals at once with
``searchsorted`` / ``reduceat``; no Python loop runs over samples.

Ring buffers hold only Good samples (a Bad sample has no value), so the StatusCode rules of
Part 13 reduce to: Good (or Bad_NoData for an empty interval), the Partial bit for intervals cut
by the end of the request or by missing data, and the Calculated/Interpolated/Raw historian bits
(Part 4 7.39.1, Part 13 5.3.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from asyncua import ua

# Historian info bits (InfoType DataValue + historian bits), Part 4 7.39.1 Table 180
INFO_DATAVALUE = 0x0400
RAW = 0x0
CALCULATED = 0x1
INTERPOLATED = 0x2
PARTIAL = 0x4

GOOD = 0
BAD_NO_DATA = ua.StatusCodes.BadNoData
UNCERTAIN_SUB_NORMAL = ua.StatusCodes.UncertainDataSubNormal

AGGREGATES: dict[int, str] = {
    ua.ObjectIds.AggregateFunction_Average: "Average",
    ua.ObjectIds.AggregateFunction_TimeAverage: "TimeAverage",
    ua.ObjectIds.AggregateFunction_Total: "Total",
    ua.ObjectIds.AggregateFunction_Minimum: "Minimum",
    ua.ObjectIds.AggregateFunction_Maximum: "Maximum",
    ua.ObjectIds.AggregateFunction_Range: "Range",
    ua.ObjectIds.AggregateFunction_Count: "Count",
    ua.ObjectIds.AggregateFunction_Start: "Start",
    ua.ObjectIds.AggregateFunction_End: "End",
    ua.ObjectIds.AggregateFunction_Interpolative: "Interpolative",
}


@dataclass
class Result:
    """Per-interval results: value (NaN = none), timestamp, status code (with info bits)."""

    values: np.ndarray[Any, Any]
    times: np.ndarray[Any, Any]
    codes: np.ndarray[Any, Any]
    same_type: bool  # value has the source's data type (Minimum, Start...) rather than Double
    integer: bool = False  # Count


def intervals(start_ns: int, end_ns: int, interval_ns: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Interval bounds ``[a_k, b_k)`` per Part 13 5.4.2.2 and whether they run backwards.

    ``interval_ns`` 0 (or larger than the span) gives one interval; the last one may be shorter.
    Backwards (end < start), the first interval ends at ``start``: ``[start - Int, start)``.
    """
    span = abs(end_ns - start_ns)
    step = interval_ns if 0 < interval_ns < span else span
    n = -(-span // step)
    k = np.arange(n, dtype=np.int64)
    if end_ns > start_ns:
        a = start_ns + k * step
        b = np.minimum(a + step, end_ns)
        return a, b, False
    b = start_ns - k * step
    a = np.maximum(b - step, end_ns)
    return a, b, True


def interpolate(ts: np.ndarray, vals: np.ndarray, at: np.ndarray, stepped: bool
                ) -> tuple[np.ndarray, np.ndarray]:
    """Values at times ``at`` (Part 13 3.1.5/3.1.6) and their status codes.

    Raw value when a sample sits exactly at the time; interpolated between the surrounding
    samples (stepped: the earlier one); extrapolated with the last value (Uncertain) after the
    last sample; Bad_NoData before the first.
    """
    n = len(ts)
    out = np.full(len(at), np.nan)
    codes = np.full(len(at), BAD_NO_DATA, dtype=np.int64)
    if n == 0:
        return out, codes
    i = np.searchsorted(ts, at, side="right") - 1
    has_prev = i >= 0
    ip = np.clip(i, 0, n - 1)
    exact = has_prev & (ts[ip] == at)
    has_next = has_prev & (ip + 1 < n)
    inx = np.clip(ip + 1, 0, n - 1)
    fvals = vals.astype(np.float64)
    if stepped:
        interp = fvals[ip]
    else:
        t0, t1 = ts[ip].astype(np.float64), ts[inx].astype(np.float64)
        width = np.where(t1 > t0, t1 - t0, 1.0)
        frac = np.clip((at - ts[ip]) / width, 0.0, 1.0)
        interp = fvals[ip] + (fvals[inx] - fvals[ip]) * frac
    out = np.where(has_prev, np.where(exact | ~has_next, fvals[ip], interp), np.nan)
    codes = np.where(
        ~has_prev, BAD_NO_DATA,
        np.where(exact, GOOD,
                 np.where(has_next, GOOD | INFO_DATAVALUE | INTERPOLATED,
                          UNCERTAIN_SUB_NORMAL | INFO_DATAVALUE | INTERPOLATED)))
    return out, codes.astype(np.int64)


def _integral(ts: np.ndarray, vals: np.ndarray, x: np.ndarray, stepped: bool) -> np.ndarray:
    """Integral of the interpolated signal from ts[0] to each x (x within [ts[0], ts[-1]])."""
    t = ts.astype(np.float64) / 1e9
    v = vals.astype(np.float64)
    xs = x.astype(np.float64) / 1e9
    dt = np.diff(t)
    seg = dt * v[:-1] if stepped else dt * (v[:-1] + v[1:]) / 2.0
    cum = np.concatenate(([0.0], np.cumsum(seg)))
    j = np.clip(np.searchsorted(t, xs, side="right") - 1, 0, len(t) - 1)
    part = xs - t[j]
    if stepped:
        extra = part * v[j]
    else:
        vx = np.interp(xs, t, v)
        extra = part * (v[j] + vx) / 2.0
    return cum[j] + extra


def compute(name: str, ts: np.ndarray, vals: np.ndarray, a: np.ndarray, b: np.ndarray,
            interval_ns: int, stepped: bool) -> Result:
    """The aggregate ``name`` for contiguous intervals ``[a_k, b_k)`` (either direction)."""
    if len(a) > 1 and a[0] > a[-1]:  # backwards: compute ascending, hand back reversed
        r = compute(name, ts, vals, a[::-1], b[::-1], interval_ns, stepped)
        return Result(r.values[::-1], r.times[::-1], r.codes[::-1], r.same_type, r.integer)
    nb = len(a)
    lo = np.searchsorted(ts, a, side="left")
    hi = np.searchsorted(ts, b, side="left")
    counts = hi - lo
    nonempty = counts > 0
    short = (b - a) < interval_ns if interval_ns > 0 else np.zeros(nb, dtype=bool)
    partial = np.where(short, PARTIAL, 0)
    calc = INFO_DATAVALUE | CALCULATED
    if name == "Interpolative":
        values, codes = interpolate(ts, vals, a, stepped)
        return Result(values, a, codes, False)
    if name in ("Total", "TimeAverage"):
        return _time_weighted(name, ts, vals, a, b, stepped, partial)
    if name == "Count":
        return Result(counts.astype(np.float64), a, (calc | partial).astype(np.int64), False,
                      integer=True)
    values = np.full(nb, np.nan)
    times = a.copy()
    codes = np.where(nonempty, calc | partial, BAD_NO_DATA).astype(np.int64)
    fvals = vals.astype(np.float64)
    if nonempty.any():
        first = lo[nonempty]
        if name == "Average":
            values[nonempty] = _reduce(np.add, fvals, lo, hi, nonempty) / counts[nonempty]
        elif name in ("Minimum", "Maximum", "Range"):
            mins = _reduce(np.minimum, fvals, lo, hi, nonempty)
            maxs = _reduce(np.maximum, fvals, lo, hi, nonempty)
            values[nonempty] = {"Minimum": mins, "Maximum": maxs, "Range": maxs - mins}[name]
        elif name in ("Start", "End"):
            pick = first if name == "Start" else hi[nonempty] - 1
            values[nonempty] = fvals[pick]
            times[nonempty] = ts[pick]
            codes = np.where(nonempty, RAW | partial, BAD_NO_DATA).astype(np.int64)
        else:
            raise KeyError(name)
    same_type = name in ("Minimum", "Maximum", "Start", "End")
    return Result(values, times, codes, same_type)


def _reduce(ufunc: Any, vals: np.ndarray, lo: np.ndarray, hi: np.ndarray,
            nonempty: np.ndarray) -> np.ndarray:
    """ufunc over each non-empty ``vals[lo_k:hi_k]`` with one ``reduceat``.

    The intervals are contiguous and ascending, so each reduction runs from an interval's first
    sample to the next non-empty interval's first sample; cutting the array at the last
    interval's end keeps the bounding samples after it out.
    """
    reduced: np.ndarray = ufunc.reduceat(vals[: hi[nonempty][-1]], lo[nonempty])
    return reduced


def _time_weighted(name: str, ts: np.ndarray, vals: np.ndarray, a: np.ndarray, b: np.ndarray,
                   stepped: bool, partial: np.ndarray) -> Result:
    """Total (value x seconds) and TimeAverage over the part of each interval with data."""
    nb = len(a)
    values = np.full(nb, np.nan)
    codes = np.full(nb, BAD_NO_DATA, dtype=np.int64)
    if len(ts) == 0:
        return Result(values, a, codes, False)
    ca = np.clip(a, ts[0], ts[-1])
    cb = np.clip(b, ts[0], ts[-1])
    covered = cb > ca
    if len(ts) >= 2 and covered.any():
        total = _integral(ts, vals, cb, stepped) - _integral(ts, vals, ca, stepped)
        seconds = (cb - ca) / 1e9
        full = (ca == a) & (cb == b)
        values = np.where(covered, total if name == "Total" else total / np.where(
            covered, seconds, 1.0), np.nan)
        base = INFO_DATAVALUE | CALCULATED
        codes = np.where(covered, np.where(full, base | partial,
                                           UNCERTAIN_SUB_NORMAL | base | PARTIAL),
                         BAD_NO_DATA).astype(np.int64)
    return Result(values, a, codes, False)
