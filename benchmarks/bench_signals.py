"""Signal ingest with window analytics: how many 51.2 kS/s channels one core sustains.

Feeds blocks of float32 samples straight into the SignalHub (ring append + RMS, peak,
peak-to-peak, crest factor, kurtosis and three FFT band energies per window, published as tags)
and reports the CPU cost per channel. The MQTT ingest path adds its parsing on top; see
benchmarks/mqtt for that.

    python benchmarks/bench_signals.py [--channels 64] [--seconds 3]

Target (the project's): >= 64 channels at 51.2 kS/s using < 50% of one core, no samples lost.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from twisted.internet.task import Clock

from iotserver.config import SignalConfig
from iotserver.tags.ring import RingRegistry
from iotserver.tags.signals import SignalHub
from iotserver.tags.store import TagStore

RATE = 51200.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--block", type=int, default=5120, help="samples per block (0.1 s)")
    ap.add_argument("--window", type=int, default=8192)
    ap.add_argument("--hop", type=int, default=4096)
    ap.add_argument("--seconds", type=float, default=3.0, help="signal time to simulate")
    ap.add_argument("--quick", action="store_true", help="a short run: 8 channels, 1 s of signal")
    args = ap.parse_args()
    if args.quick:
        args.channels, args.seconds = min(args.channels, 8), min(args.seconds, 1.0)
    store = TagStore(Clock())
    hub = SignalHub(store, RingRegistry(max_bytes=4 << 30))
    bands = ((10.0, 1000.0), (1000.0, 5000.0), (5000.0, 20000.0))
    names = [f"Plant/M{i}/Vib" for i in range(args.channels)]
    for n in names:
        hub.add(SignalConfig(n, RATE, 1 << 20, args.block, "g", "", args.window, args.hop,
                             bands, 0))
    rng = np.random.default_rng(1)
    blocks = [rng.normal(0, 1, args.block).astype(np.float32) for _ in range(8)]
    period = round(1e9 / RATE)
    n_blocks = int(args.seconds * RATE / args.block)
    start_ns = 1_700_000_000 * 10**9
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for b in range(n_blocks):
        t = start_ns + b * args.block * period
        for n in names:
            hub.ingest(n, t, blocks[b % 8])
    cpu = time.process_time() - cpu0
    wall = time.perf_counter() - wall0
    samples = sum(ch.stats.samples for ch in hub.channels.values())
    windows = sum(ch.stats.windows for ch in hub.channels.values())
    expected = n_blocks * args.block * args.channels
    signal_seconds = n_blocks * args.block / RATE
    core_share = cpu / signal_seconds
    print(f"channels={args.channels} rate={RATE:.0f} S/s block={args.block} "
          f"window={args.window} hop={args.hop}")
    print(f"samples ingested   {samples:,} (expected {expected:,}, lost {expected - samples})")
    print(f"windows analysed   {windows:,}")
    print(f"ingest rate        {samples / wall / 1e6:.1f} M samples/s (wall)")
    print(f"CPU per real-time second: {core_share * 100:.1f}% of one core "
          f"(target < 50% for 64 channels)")
    print(f"channels one core sustains at this rate: {args.channels / core_share:.0f}")


if __name__ == "__main__":
    main()
