"""Tag store throughput: updates/s applied in batches with 0, 1 and 10 subscribers.

Beside it, in the same run, the cost of the bare minimum per update (a dict assignment of a
tuple), so the figure can be read against what this machine does at all.

    python benchmarks/bench_store.py [--tags 10000] [--batch 1000] [--seconds 2]

Target (the project's): >= 500k tag updates/s with one subscriber.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from twisted.internet.task import Clock

from iotserver.tags.model import DataType, Quality, TagDef, Update
from iotserver.tags.store import TagStore


def run(n_tags: int, batch: int, subscribers: int, seconds: float) -> tuple[float, int]:
    clock = Clock()
    store = TagStore(clock)
    paths = [f"Plant/Area{i // 100}/Tag{i}" for i in range(n_tags)]
    for p in paths:
        store.define(TagDef(path=p, data_type=DataType.FLOAT64))
    delivered = [0]

    def sink(changes: list[Any]) -> None:
        delivered[0] += len(changes)

    for _ in range(subscribers):
        store.subscribe("Plant/**", sink, initial=False)
    # Pre-built batches with changing values so every update is a real change.
    batches = [
        [Update(paths[(k * batch + j) % n_tags], float(k * batch + j)) for j in range(batch)]
        for k in range(64)
    ]
    done = 0
    start = time.perf_counter()
    k = 0
    while time.perf_counter() - start < seconds:
        store.apply(batches[k % 64])
        clock.advance(0)  # one reactor turn: the batch is delivered
        done += batch
        k += 1
    elapsed = time.perf_counter() - start
    return done / elapsed, delivered[0]


def baseline(n_tags: int, batch: int, seconds: float) -> float:
    """A dict assignment of a 4-tuple per update: the floor any Python store pays."""
    paths = [f"Plant/Area{i // 100}/Tag{i}" for i in range(n_tags)]
    d: dict[str, Any] = dict.fromkeys(paths)
    batches = [[(paths[(k * batch + j) % n_tags], float(j)) for j in range(batch)]
               for k in range(64)]
    done = 0
    start = time.perf_counter()
    k = 0
    while time.perf_counter() - start < seconds:
        for p, v in batches[k % 64]:
            d[p] = (v, Quality.GOOD, 0, 0)
        done += batch
        k += 1
    return done / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--tags", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true",
                    help="a short run: 2,000 tags, 0.3 s per measurement")
    args = ap.parse_args()
    if args.quick:
        args.tags, args.seconds = min(args.tags, 2000), min(args.seconds, 0.3)
    base = baseline(args.tags, args.batch, args.seconds)
    print(f"tags={args.tags} batch={args.batch}")
    print(f"{'subscribers':>11} {'updates/s':>12} {'delivered':>10} {'vs dict floor':>14}")
    print(f"{'dict floor':>11} {base:>12,.0f} {'-':>10} {1.0:>14.2f}")
    for subs in (0, 1, 10):
        rate, delivered = run(args.tags, args.batch, subs, args.seconds)
        print(f"{subs:>11} {rate:>12,.0f} {delivered:>10,} {rate / base:>14.2f}")


if __name__ == "__main__":
    main()
