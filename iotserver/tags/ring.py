"""Preallocated numpy ring buffers for historized tags and high-rate signal channels.

A ring holds two fixed arrays, timestamps (int64 ns since the epoch) and values, written in time
order. Time order is an invariant (appends older than the newest stored sample are rejected), so
every history query is a ``np.searchsorted`` on at most two chronological segments followed by
slices and ``ufunc.reduceat`` reductions: no Python loop runs over samples or buckets.

Memory is bounded: a ring never grows, and a :class:`RingRegistry` refuses to create rings beyond
its byte cap.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "MAX_BUCKETS",
    "OutOfOrderError",
    "RingBuffer",
    "RingMemoryError",
    "RingRegistry",
]

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

#: Upper bound on the number of buckets one aggregate/envelope query may produce (bounded memory).
MAX_BUCKETS = 1 << 20

_STEP_CACHE_LEN = 1 << 16  # entries per cached period (512 KiB)
_STEP_CACHE_PERIODS = 8  # distinct periods kept, least recently used evicted

TsArray = npt.NDArray[np.int64]
AnyArray = npt.NDArray[Any]


class OutOfOrderError(ValueError):
    """An append would break the time order of a ring (older than the newest stored sample)."""


class RingMemoryError(MemoryError):
    """Creating a ring would take a registry above its byte cap."""

    def __init__(self, name: str, requested: int, in_use: int, max_bytes: int) -> None:
        self.name = name
        self.requested = requested
        self.in_use = in_use
        self.max_bytes = max_bytes
        super().__init__(
            f"ring {name!r} needs {requested} bytes but the registry already holds {in_use} of "
            f"max_bytes={max_bytes} ({max(max_bytes - in_use, 0)} free)"
        )


class _StepCache:
    """Process-wide ``period * arange(n)`` arrays, shared by all rings.

    Timestamps of a start+period block are then one ``np.add`` straight into the ring (one pass,
    no temporary), which measured about 1.3x faster than ``np.arange`` plus a copy for blocks of
    8192. Bounded: at most ``_STEP_CACHE_PERIODS`` arrays of ``_STEP_CACHE_LEN`` int64 (4 MiB).
    """

    def __init__(self) -> None:
        self._steps: OrderedDict[int, TsArray] = OrderedDict()

    def get(self, period_ns: int, n: int) -> TsArray:
        """A read-only array of at least ``min(n, _STEP_CACHE_LEN)`` multiples of ``period_ns``."""
        steps = self._steps.get(period_ns)
        if steps is not None and len(steps) >= n:
            self._steps.move_to_end(period_ns)
            return steps
        # grow in powers of two so a stream of equal blocks builds its array once
        size = min(_STEP_CACHE_LEN, 1 << max(n - 1, 0).bit_length())
        if steps is not None and len(steps) >= size:
            return steps
        steps = np.arange(size, dtype=np.int64)
        np.multiply(steps, period_ns, out=steps)
        steps.flags.writeable = False
        self._steps[period_ns] = steps
        self._steps.move_to_end(period_ns)
        while len(self._steps) > _STEP_CACHE_PERIODS:
            self._steps.popitem(last=False)
        return steps

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._steps.values())


_step_cache = _StepCache()


@lru_cache(maxsize=256)
def _castable(src: np.dtype[Any], dst: np.dtype[Any]) -> bool:
    """``np.can_cast(..., "same_kind")``, memoised: it cost about 15% of a 64-sample append."""
    return bool(np.can_cast(src, dst, "same_kind"))


def _clamp(ns: int) -> int:
    """Clamp a query bound to the int64 range so searchsorted never sees an overflowing int."""
    return _INT64_MIN if ns < _INT64_MIN else _INT64_MAX if ns > _INT64_MAX else ns


class RingBuffer:
    """A fixed-capacity ring of (timestamp ns, value) samples in non-decreasing time order.

    Appends older than the newest stored timestamp raise :class:`OutOfOrderError` (a
    ``ValueError``): time order is what makes the ``searchsorted`` queries valid. Equal timestamps
    are allowed. When full, the oldest samples are overwritten and counted in :attr:`dropped`.
    """

    __slots__ = ("_cap", "_ts", "_vals", "_head", "_count", "_total", "_last_ts")

    _VALUE_KINDS = "biuf"  # bool, signed, unsigned, float

    def __init__(self, capacity: int, dtype: npt.DTypeLike = np.float64) -> None:
        if not isinstance(capacity, (int, np.integer)) or isinstance(capacity, bool):
            raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        dt = self._check_dtype(dtype)
        self._cap = int(capacity)
        self._ts: TsArray = np.zeros(self._cap, dtype=np.int64)
        self._vals: AnyArray = np.zeros(self._cap, dtype=dt)
        self._head = 0  # next write index
        self._count = 0
        self._total = 0
        self._last_ts = _INT64_MIN  # newest stored timestamp; the sentinel accepts anything

    @classmethod
    def _check_dtype(cls, dtype: npt.DTypeLike) -> np.dtype[Any]:
        dt = np.dtype(dtype)
        if dt.kind not in cls._VALUE_KINDS:
            raise TypeError(f"ring values must be bool, integer or float, not {dt}")
        return dt

    @classmethod
    def bytes_for(cls, capacity: int, dtype: npt.DTypeLike = np.float64) -> int:
        """Bytes a ring of this capacity and dtype allocates (what :attr:`nbytes` will report)."""
        return int(capacity) * (8 + cls._check_dtype(dtype).itemsize)

    # -- state -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (
            f"<RingBuffer {self._count}/{self._cap} {self._vals.dtype} "
            f"total={self._total} dropped={self.dropped}>"
        )

    @property
    def capacity(self) -> int:
        return self._cap

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._vals.dtype

    @property
    def total_appended(self) -> int:
        """Samples ever appended, including those overwritten or skipped from oversize blocks."""
        return self._total

    @property
    def dropped(self) -> int:
        """Samples appended but no longer held (overwritten, or cut from an oversize block)."""
        return self._total - self._count

    @property
    def nbytes(self) -> int:
        """Bytes held by the timestamp and value arrays."""
        return self._ts.nbytes + self._vals.nbytes

    # -- writing -----------------------------------------------------------------------------

    def append(self, ts_ns: int, value: Any) -> None:
        """Append one sample. ``value`` is converted as numpy item assignment does."""
        if ts_ns < self._last_ts:
            raise OutOfOrderError(
                f"timestamp {ts_ns} is older than the newest stored one {self._last_ts}"
            )
        i = self._head
        self._ts[i] = ts_ns
        self._vals[i] = value
        i += 1
        self._head = 0 if i == self._cap else i
        self._last_ts = ts_ns
        self._total += 1
        if self._count < self._cap:
            self._count += 1

    def append_block(
        self,
        ts: TsArray | None,
        values: AnyArray,
        *,
        start_ns: int | None = None,
        period_ns: int | None = None,
    ) -> None:
        """Append a block of samples, with explicit timestamps or as ``start_ns`` + ``period_ns``.

        Explicit timestamps must be integers in non-decreasing order; ``period_ns`` must be >= 0.
        The block's first timestamp must not be older than the newest stored one, otherwise
        :class:`OutOfOrderError` (a ``ValueError``) is raised and nothing is written. Values are
        cast to the ring dtype under ``same_kind`` rules (float into an int ring is a TypeError).
        A block larger than the capacity keeps its newest ``capacity`` samples.
        """
        if not isinstance(values, np.ndarray):
            values = np.asarray(values)
        if values.ndim != 1:
            raise ValueError(f"values must be one-dimensional, got shape {values.shape}")
        # checked before anything is written, so a rejected block leaves the ring untouched
        if not _castable(values.dtype, self._vals.dtype):
            raise TypeError(f"cannot store {values.dtype} values in a {self._vals.dtype} ring")
        n = values.shape[0]
        cap = self._cap
        if ts is not None:
            if start_ns is not None or period_ns is not None:
                raise TypeError("give either ts or start_ns/period_ns, not both")
            if not isinstance(ts, np.ndarray):
                ts = np.asarray(ts)
            if ts.shape != values.shape:
                raise ValueError(f"ts shape {ts.shape} differs from values shape {values.shape}")
            if ts.dtype.kind not in "iu":
                raise TypeError(f"timestamps must be integer nanoseconds, not {ts.dtype}")
            if n == 0:
                return
            first = int(ts[0])
            last = int(ts[-1])
            if first < self._last_ts:
                raise OutOfOrderError(
                    f"block starts at {first}, older than the newest stored timestamp "
                    f"{self._last_ts}"
                )
            if n > 1 and bool((ts[1:] < ts[:-1]).any()):
                raise OutOfOrderError("timestamps inside the block are not in non-decreasing order")
            if first < _INT64_MIN or last > _INT64_MAX:
                raise OverflowError("timestamps outside the int64 range")
            if n > cap:
                ts = ts[n - cap :]
                values = values[n - cap :]
            total = n
            n = len(values)
            self._write_ts_explicit(ts, n)
        else:
            if start_ns is None or period_ns is None:
                raise TypeError("append_block needs ts, or both start_ns and period_ns")
            if period_ns < 0:
                raise ValueError(f"period_ns must be >= 0, got {period_ns}")
            if n == 0:
                return
            first = start_ns = int(start_ns)
            period_ns = int(period_ns)
            last = start_ns + (n - 1) * period_ns
            if first < self._last_ts:
                raise OutOfOrderError(
                    f"block starts at {first}, older than the newest stored timestamp "
                    f"{self._last_ts}"
                )
            if last > _INT64_MAX:
                raise OverflowError(f"block ends at {last}, beyond the int64 range")
            total = n
            if n > cap:
                first += (n - cap) * period_ns
                values = values[n - cap :]
                n = cap
            self._write_ts_period(first, period_ns, n)
        h = self._head
        k = cap - h
        if n <= k:
            self._vals[h : h + n] = values
        else:
            self._vals[h:] = values[:k]
            self._vals[: n - k] = values[k:]
        h += n
        self._head = h - cap if h >= cap else h
        self._last_ts = last
        self._total += total
        self._count = min(self._count + n, cap)

    def _write_ts_explicit(self, ts: AnyArray, n: int) -> None:
        h = self._head
        k = self._cap - h
        if n <= k:
            self._ts[h : h + n] = ts
        else:
            self._ts[h:] = ts[:k]
            self._ts[: n - k] = ts[k:]

    def _write_ts_period(self, first: int, period_ns: int, n: int) -> None:
        steps = _step_cache.get(period_ns, n)
        chunk = len(steps)
        h = self._head
        cap = self._cap
        if n <= chunk and h + n <= cap:  # the common case: one addition, no wrap
            np.add(steps[:n], first, self._ts[h : h + n])
            return
        done = 0
        # at most two segments (wrap) times ceil(n / chunk) cached-step additions
        while done < n:
            k = min(n - done, cap - h, chunk)
            np.add(steps[:k], first + done * period_ns, out=self._ts[h : h + k])
            done += k
            h += k
            if h == cap:
                h = 0

    # -- reading -----------------------------------------------------------------------------

    def _segments(self) -> list[tuple[int, int]]:
        """Index ranges ``[a, b)`` of the stored samples in chronological order (at most two)."""
        a = self._head - self._count
        if a >= 0:
            return [(a, self._head)] if self._count else []
        return [(a + self._cap, self._cap), (0, self._head)]

    def latest(self) -> tuple[int, Any] | None:
        """The newest sample as Python scalars, or None when empty."""
        if not self._count:
            return None
        i = self._head - 1 if self._head else self._cap - 1
        return int(self._ts[i]), self._vals[i].item()

    def last_n(self, n: int) -> tuple[TsArray, AnyArray]:
        """The newest ``n`` samples (fewer if fewer are held), as chronological copies."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        n = min(n, self._count)
        a = self._head - n
        if a >= 0:
            return self._ts[a : self._head].copy(), self._vals[a : self._head].copy()
        a += self._cap
        return (
            np.concatenate((self._ts[a:], self._ts[: self._head])),
            np.concatenate((self._vals[a:], self._vals[: self._head])),
        )

    def _range_parts(self, start_ns: int, end_ns: int) -> list[tuple[int, int]]:
        """Index ranges of the samples with ``start_ns <= ts < end_ns``, chronological."""
        lo_t = _clamp(start_ns)
        hi_t = _clamp(end_ns)
        parts = []
        for a, b in self._segments():
            seg = self._ts[a:b]
            lo, hi = np.searchsorted(seg, (lo_t, hi_t), side="left")
            if hi > lo:
                parts.append((a + int(lo), a + int(hi)))
        return parts

    def _gather(self, parts: list[tuple[int, int]], copy: bool) -> tuple[TsArray, AnyArray]:
        """The samples of ``parts`` as one chronological pair of arrays.

        One segment gives views into the ring unless ``copy``; two are concatenated (a copy).
        """
        if not parts:
            return np.empty(0, np.int64), np.empty(0, self._vals.dtype)
        if len(parts) == 1:
            a, b = parts[0]
            ts, vals = self._ts[a:b], self._vals[a:b]
            return (ts.copy(), vals.copy()) if copy else (ts, vals)
        (a1, b1), (a2, b2) = parts
        return (
            np.concatenate((self._ts[a1:b1], self._ts[a2:b2])),
            np.concatenate((self._vals[a1:b1], self._vals[a2:b2])),
        )

    def range(self, start_ns: int, end_ns: int) -> tuple[TsArray, AnyArray]:
        """Samples with ``start_ns <= ts < end_ns`` as chronological copies (empty if none)."""
        return self._gather(self._range_parts(start_ns, end_ns), copy=True)

    def aggregate(self, start_ns: int, end_ns: int, interval_ns: int) -> dict[str, AnyArray]:
        """Per-interval statistics of the samples in ``[start_ns, end_ns)``.

        Buckets start at ``start_ns + k * interval_ns``; the last one is cut at ``end_ns``.
        Returns arrays keyed ``start`` (int64), ``count`` (int64) and ``min``, ``max``, ``mean``,
        ``rms``, ``first``, ``last`` (float64, NaN for empty buckets; int64 values beyond 2**53
        lose precision). ``start_ns == end_ns`` gives zero buckets.
        """
        if interval_ns <= 0:
            raise ValueError(f"interval_ns must be > 0, got {interval_ns}")
        if end_ns < start_ns:
            raise ValueError(f"end_ns {end_ns} is before start_ns {start_ns}")
        nb = -(-(end_ns - start_ns) // interval_ns)
        _check_buckets(nb)
        starts = np.arange(nb, dtype=np.int64)
        np.multiply(starts, interval_ns, out=starts)
        np.add(starts, start_ns, out=starts)
        ts, vals = self._gather(self._range_parts(start_ns, end_ns), copy=False)
        lo, counts = _bucket_bounds(ts, starts)
        nonempty = counts > 0
        firsts = lo[nonempty]
        ns = counts[nonempty]
        out: dict[str, AnyArray] = {"start": starts, "count": counts}
        if len(firsts):
            sums = np.add.reduceat(vals, firsts, dtype=np.float64)
            squares = vals.astype(np.float64)
            np.square(squares, out=squares)
            sq_sums = np.add.reduceat(squares, firsts)
            stats = {
                "min": np.minimum.reduceat(vals, firsts),
                "max": np.maximum.reduceat(vals, firsts),
                "mean": sums / ns,
                "rms": np.sqrt(sq_sums / ns),
                "first": vals[firsts],
                "last": vals[firsts + ns - 1],
            }
        else:
            stats = dict.fromkeys(("min", "max", "mean", "rms", "first", "last"), vals[:0])
        for key, reduced in stats.items():
            out[key] = _scatter(nb, nonempty, reduced)
        return out

    def envelope(
        self, start_ns: int, end_ns: int, buckets: int
    ) -> tuple[TsArray, AnyArray, AnyArray]:
        """Min/max decimation of ``[start_ns, end_ns)`` into ``buckets`` near-equal buckets.

        Returns ``(bucket_start_ts, mins, maxs)``; mins/maxs are float64 with NaN for empty
        buckets. Bucket ``k`` starts at ``start_ns + floor(k * span / buckets)``.
        """
        if buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {buckets}")
        if end_ns < start_ns:
            raise ValueError(f"end_ns {end_ns} is before start_ns {start_ns}")
        _check_buckets(buckets)
        span = end_ns - start_ns
        # floor(k * span / buckets) split so that no intermediate overflows int64
        q, r = divmod(span, buckets)
        k = np.arange(buckets, dtype=np.int64)
        starts = k * q
        starts += (k * r) // buckets
        starts += start_ns
        ts, vals = self._gather(self._range_parts(start_ns, end_ns), copy=False)
        lo, counts = _bucket_bounds(ts, starts)
        nonempty = counts > 0
        firsts = lo[nonempty]
        if len(firsts):
            mins = np.minimum.reduceat(vals, firsts)
            maxs = np.maximum.reduceat(vals, firsts)
        else:
            mins = maxs = vals[:0]
        return starts, _scatter(buckets, nonempty, mins), _scatter(buckets, nonempty, maxs)


def _check_buckets(nb: int) -> None:
    if nb > MAX_BUCKETS:
        raise ValueError(f"query would produce {nb} buckets, more than MAX_BUCKETS={MAX_BUCKETS}")


def _bucket_bounds(ts: TsArray, starts: TsArray) -> tuple[TsArray, TsArray]:
    """First sample index and sample count per bucket; ``ts`` holds only in-range samples."""
    lo = np.searchsorted(ts, starts, side="left").astype(np.int64, copy=False)
    counts = np.empty_like(lo)
    counts[:-1] = lo[1:] - lo[:-1]
    counts[-1:] = len(ts) - lo[-1:]
    return lo, counts


def _scatter(nb: int, nonempty: npt.NDArray[np.bool_], reduced: AnyArray) -> AnyArray:
    """Per-bucket float64 array: reduced values where non-empty, NaN elsewhere."""
    out = np.full(nb, np.nan)
    out[nonempty] = reduced
    return out


class RingRegistry:
    """Named rings (per historized tag path and per signal channel) under one byte cap.

    ``max_bytes`` of None means no cap. The cap counts the ring arrays
    (:meth:`RingBuffer.bytes_for`); the process-wide timestamp step cache (at most 4 MiB) is
    reported separately.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
        self._max_bytes = max_bytes
        self._rings: dict[str, RingBuffer] = {}
        self._total = 0

    @property
    def max_bytes(self) -> int | None:
        return self._max_bytes

    @property
    def total_bytes(self) -> int:
        """Bytes held by all rings in this registry."""
        return self._total

    def create(self, name: str, capacity: int, dtype: npt.DTypeLike = np.float64) -> RingBuffer:
        """Create and register a ring; ValueError if the name exists, RingMemoryError over cap."""
        if name in self._rings:
            raise ValueError(f"ring {name!r} already exists")
        need = RingBuffer.bytes_for(capacity, dtype)
        if self._max_bytes is not None and self._total + need > self._max_bytes:
            raise RingMemoryError(name, need, self._total, self._max_bytes)
        ring = RingBuffer(capacity, dtype)
        self._rings[name] = ring
        self._total += ring.nbytes
        return ring

    def get(self, name: str) -> RingBuffer:
        """The ring called ``name``; KeyError if there is none."""
        return self._rings[name]

    def remove(self, name: str) -> None:
        """Forget the ring called ``name`` (its memory goes once nothing else refers to it)."""
        ring = self._rings.pop(name)
        self._total -= ring.nbytes

    def names(self) -> list[str]:
        return sorted(self._rings)

    def __contains__(self, name: object) -> bool:
        return name in self._rings

    def __len__(self) -> int:
        return len(self._rings)

    def memory_report(self) -> dict[str, Any]:
        """Bytes per ring, their total, the cap, and the shared step cache."""
        return {
            "total_bytes": self._total,
            "max_bytes": self._max_bytes,
            "rings": {name: ring.nbytes for name, ring in sorted(self._rings.items())},
            "step_cache_bytes": _step_cache.nbytes,
        }
