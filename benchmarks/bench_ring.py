"""Ring buffer ingest rate against a raw numpy copy of the same bytes, measured in the same run.

Run: ``python benchmarks/bench_ring.py [--quick]``. For each block size it times
``RingBuffer.append_block`` (start+period timestamps, and explicit timestamps) into a ring of
2**22 float32 samples, and beside it the raw copy ``dst[...] = src`` of the same timestamp and
value bytes into equally large arrays. Runs are interleaved; the best of several repeats is
reported (median in brackets). Target: ours/raw >= 50% for blocks of 8192 and more.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from iotserver.tags.ring import RingBuffer

CAPACITY = 2**22
BLOCK_SIZES = (64, 256, 1024, 4096, 8192, 65536)
PERIOD_NS = 19_531  # about 51.2 kS/s
REPEATS = 9
TARGET = 0.5


def _calls_for(block: int) -> int:
    """Calls per repeat: about one ring's worth of samples, bounded for small blocks."""
    return max(64, min(20_000, CAPACITY // block))


def _time_once(step: Callable[[], None], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        step()
    return time.perf_counter() - t0


def _measure(steps: dict[str, Callable[[], None]], calls: int) -> dict[str, list[float]]:
    """Seconds per call for each step, repeats interleaved so all see the same machine state."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm-up
        _time_once(step, max(1, calls // 8))
    for _ in range(REPEATS):
        for name, step in steps.items():
            times[name].append(_time_once(step, calls) / calls)
    return times


def bench_blocks(block: int) -> dict[str, tuple[float, float]]:
    """(best, median) samples/s for ours (period, explicit ts) and the raw copy."""
    rng = np.random.default_rng(block)
    values = rng.standard_normal(block).astype(np.float32)
    ts_block = np.arange(block, dtype=np.int64) * PERIOD_NS

    ring_p = RingBuffer(CAPACITY, np.float32)
    ring_x = RingBuffer(CAPACITY, np.float32)
    dst_ts = np.zeros(CAPACITY, np.int64)
    dst_v = np.zeros(CAPACITY, np.float32)
    # touch every page first so no run pays the first-write page faults
    dst_ts[:] = 1
    dst_v[:] = 1
    ring_p.append_block(None, np.zeros(CAPACITY, np.float32), start_ns=0, period_ns=1)
    ring_x.append_block(None, np.zeros(CAPACITY, np.float32), start_ns=0, period_ns=1)

    state = {"t_p": CAPACITY, "t_x": CAPACITY, "pos": 0}
    span = block * PERIOD_NS

    def ours_period() -> None:
        ring_p.append_block(None, values, start_ns=state["t_p"], period_ns=PERIOD_NS)
        state["t_p"] += span

    # explicit timestamps: one constant array reused for every call; all equal, so each block
    # starts at the newest stored timestamp (allowed) and the order check still runs in full
    ts_x = np.full(block, CAPACITY, dtype=np.int64)

    def ours_explicit() -> None:
        ring_x.append_block(ts_x, values)

    def raw_copy() -> None:
        p = state["pos"]
        if p + block > CAPACITY:
            p = 0
        dst_ts[p : p + block] = ts_block
        dst_v[p : p + block] = values
        state["pos"] = p + block

    times = _measure(
        {"period": ours_period, "explicit": ours_explicit, "raw": raw_copy}, _calls_for(block)
    )
    return {
        name: (block / min(ts), block / statistics.median(ts)) for name, ts in times.items()
    }


def bench_single(calls: int = 200_000) -> dict[str, tuple[float, float]]:
    """(best, median) calls/s for ``append`` and for two raw numpy item assignments."""
    ring = RingBuffer(CAPACITY, np.float32)
    dst_ts = np.zeros(CAPACITY, np.int64)
    dst_v = np.zeros(CAPACITY, np.float32)
    results: dict[str, list[float]] = {"append": [], "raw": []}
    t = 0
    for _ in range(5):
        append = ring.append
        t0 = time.perf_counter()
        for i in range(t, t + calls):
            append(i, 1.5)
        results["append"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(calls):
            dst_ts[i] = i
            dst_v[i] = 1.5
        results["raw"].append(time.perf_counter() - t0)
        t += calls
    return {k: (calls / min(v), calls / statistics.median(v)) for k, v in results.items()}


def main() -> int:
    import argparse

    global REPEATS, BLOCK_SIZES, CAPACITY
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true",
                    help="a short run: 2 repeats, blocks of 1024 and 8192, a 2**20 ring")
    args = ap.parse_args()
    single_calls = 200_000
    if args.quick:
        REPEATS, BLOCK_SIZES, CAPACITY, single_calls = 2, (1024, 8192), 2**20, 20_000
    t_start = time.perf_counter()
    print(f"numpy {np.__version__}, ring {CAPACITY} float32 samples + int64 ns timestamps")
    print("samples/s: best (median) of", REPEATS, "interleaved repeats; raw = dst[...] = src")
    header = (
        f"{'block':>6} | {'ours period':>16} | {'ours explicit ts':>16} | {'raw copy':>16} | "
        f"{'raw GB/s':>8} | {'period/raw':>10} | {'explicit/raw':>12}"
    )
    print(header)
    print("-" * len(header))
    ok = True
    for block in BLOCK_SIZES:
        r = bench_blocks(block)
        ratio_p = r["period"][0] / r["raw"][0]
        ratio_x = r["explicit"][0] / r["raw"][0]
        if block >= 8192 and ratio_p < TARGET:
            ok = False

        def cell(name: str, r: dict[str, tuple[float, float]] = r) -> str:
            best, med = r[name]
            return f"{best / 1e6:7.0f}M ({med / 1e6:5.0f}M)"

        print(
            f"{block:>6} | {cell('period'):>16} | {cell('explicit'):>16} | {cell('raw'):>16} | "
            f"{r['raw'][0] * 12 / 1e9:8.1f} | {ratio_p:10.0%} | {ratio_x:12.0%}"
        )
    s = bench_single(single_calls)
    print()
    print(
        f"one-sample append: {s['append'][0] / 1e6:.2f} M calls/s "
        f"(median {s['append'][1] / 1e6:.2f}); raw two item assignments in a loop: "
        f"{s['raw'][0] / 1e6:.2f} M/s; ratio {s['append'][0] / s['raw'][0]:.0%}"
    )
    verdict = "met" if ok else "NOT met"
    print(f"target period/raw >= {TARGET:.0%} for blocks >= 8192: {verdict}")
    print(f"total {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
