"""High-rate signals through MQTT, end to end: N channels at 51.2 kS/s into a running server.

Setup (all on loopback, free ports):

* the server runs in its own process (``server_child.py``: ``app.build`` on the asyncio reactor,
  as twistd runs it) with N ``[[signals]]`` channels (51.2 kS/s, window 8192, hop 4096, three
  FFT bands, ring capacity ``--capacity`` samples) and an MQTT listener; a user with the
  engineer role (signal blocks need it);
* publisher processes (``multiprocessing``, fork), each one MQTT 3.1.1 connection over a raw
  socket carrying its share of the channels, send one SIG1 block per channel every 0.1 s
  (``--block`` 5120 samples) in real time, QoS 1, encoded with ``iotserver.mqtt.codec.
  encode_publish``. The broker sends a PUBACK only after the block has been ingested
  (synchronously: ring append and the window analytics), so the PUBACK delay of each 0.1 s tick
  shows whether the server keeps up.

Measured: the server process's CPU (utime + stime from /proc/<pid>/stat) over the publishing
window, divided by the wall time (so 50 % = half of one core); its RSS (VmRSS) at the end and
peak (VmHWM); the samples the server's channels hold at the end (its ``SignalHub`` channel
stats, reported by the child on SIGUSR1) against the samples sent: lost = sent - ingested,
plus rejected blocks; the PUBACK delay per tick (p50 / p99 / max).

Reference in the same run: the analytics alone (``SignalHub.ingest`` of the same blocks in this
process, no MQTT, like ``benchmarks/bench_signals.py``), CPU per real-time second for N channels.
The difference is the cost of the broker path (sockets, MQTT decoding, the bridge).

Then the channel count is raised in steps until a run is not sustained (samples lost, a
rejected block, PUBACK delay p99 over one second, or the server over 90 % of one core): the
largest sustained count is reported.

    python benchmarks/e2e/bench_signals_mqtt.py [--quick] [--channels 64] [--seconds 10]
        [--sweep 128,192,256,320,384,448,512] [--sweep-seconds 8]

Target (the project's): >= 64 channels with the server under 50 % of one core, no samples lost.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import select
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

RATE = 51200.0
DT = 0.1  # seconds of signal per block at the default block size
BANDS = "[[10, 1000], [1000, 5000], [5000, 20000]]"
WINDOW, HOP = 8192, 4096


def channel_name(i: int) -> str:
    return f"Bench/M{i:03d}/Vib"


def make_config(data_dir: Path, mqtt_port: int, channels: int, capacity: int,
                block: int) -> str:
    text = common.base_config(data_dir, mqtt_port=mqtt_port)
    # rings: capacity * (4 + 8) bytes per channel, plus the derived tags' history
    need = channels * (capacity * 12 + 8 * 3600 * 16) + (64 << 20)
    text += f"\n[history]\nmax_bytes = {max(need, 512 << 20)}\n"
    for i in range(channels):
        text += f"""
[[signals]]
name = "{channel_name(i)}"
sample_rate = {RATE}
block_size = {block}
capacity = {capacity}
window = {WINDOW}
hop = {HOP}
bands = {BANDS}
"""
    return text


# --------------------------------------------------------------------------- publisher process


def publisher(port: int, index: int, channels: list[int], block: int, ticks: int,
              t0_mono: float, t0_ns: int, results: Any) -> None:
    import numpy as np

    from iotserver.mqtt.codec import encode_publish

    out: dict[str, Any] = {"index": index}
    try:
        sock = common.mqtt_connect(port, f"sigpub-{index}")
        sock.setblocking(False)
        rng = np.random.default_rng(index)
        variants = [(rng.normal(0, 1, block) * (1 + j)).astype("<f4").tobytes()
                    for j in range(4)]
        topics = [f"iotserver/signals/{channel_name(c)}" for c in channels]
        dt_ns = round(block / RATE * 1e9)
        dt = block / RATE
        sent = acked = 0
        tail = bytearray()
        ticks_sent: list[tuple[int, float]] = []  # (cumulative publishes, send start)
        ack_delays: list[float] = []
        lateness: list[float] = []
        next_tick_ack = 0

        def drain(timeout: float) -> None:
            nonlocal acked, next_tick_ack
            r, _, _ = select.select([sock], [], [], max(0.0, timeout))
            if not r:
                return
            while True:
                try:
                    data = sock.recv(1 << 16)
                except (BlockingIOError, InterruptedError):
                    break
                if not data:
                    raise ConnectionError("broker closed the connection")
                tail.extend(data)
            n = len(tail) // 4  # only 4-byte PUBACKs come to a publisher
            if n:
                if tail[0] != 0x40:
                    raise ConnectionError(f"unexpected packet {bytes(tail[:8])!r}")
                acked += n
                del tail[: n * 4]
                now = time.monotonic()
                while next_tick_ack < len(ticks_sent) and acked >= ticks_sent[next_tick_ack][0]:
                    ack_delays.append(now - ticks_sent[next_tick_ack][1])
                    next_tick_ack += 1

        def send(data: bytes) -> None:
            view = memoryview(data)
            while view:
                try:
                    view = view[sock.send(view):]
                except BlockingIOError:
                    select.select([sock], [sock], [], 0.05)
                    drain(0)

        for k in range(ticks):
            target = t0_mono + k * dt
            while True:
                now = time.monotonic()
                if now >= target:
                    break
                drain(target - now)
            lateness.append(now - target)
            header = common.SIG_HEADER.pack(b"SIG1", 1, 1, 0, t0_ns + k * dt_ns, RATE, block)
            frames = []
            for j, topic in enumerate(topics):
                sent += 1
                frames.append(encode_publish(topic, header + variants[(k + j) % 4], qos=1,
                                             packet_id=sent % 65535 + 1))
            ticks_sent.append((sent, now))
            send(b"".join(frames))
            drain(0)
        deadline = time.monotonic() + 20
        while acked < sent and time.monotonic() < deadline:
            drain(0.05)
        sock.setblocking(True)
        with contextlib.suppress(OSError):
            sock.sendall(b"\xe0\x00")
        sock.close()
        out.update(sent=sent, acked=acked, ack_delays=ack_delays, lateness=lateness,
                   samples=sent * block)
    except Exception as exc:  # reported by the parent
        out["error"] = f"{type(exc).__name__}: {exc}"
    import os

    t = os.times()
    out["cpu"] = t.user + t.system
    results.put(out)


# --------------------------------------------------------------------------- one run


def run(channels: int, seconds: float, block: int, capacity: int, tmp: Path,
        procs_per_run: int | None = None, warmup: float = 1.0) -> dict[str, Any]:
    data = tmp / f"data-{channels}"
    common.write_users(data)
    port = common.free_port()
    cfg = tmp / f"signals-{channels}.toml"
    cfg.write_text(make_config(data, port, channels, capacity, block))
    server = common.ServerProcess(cfg, tmp / f"server-{channels}.log")
    ready = server.start()
    nproc = procs_per_run or max(2, min(4, (channels + 63) // 64))
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    ticks = round(seconds * RATE / block)
    dt = block / RATE
    t0_mono = time.monotonic() + 0.5
    t0_ns = time.time_ns() + 500_000_000
    shares = [list(range(channels))[i::nproc] for i in range(nproc)]
    workers = [ctx.Process(target=publisher, args=(port, i, shares[i], block, ticks, t0_mono,
                                                   t0_ns, results), daemon=True)
               for i in range(nproc)]
    st = common.ProcStat(server.pid)
    outs: list[dict[str, Any]] = []
    try:
        for w in workers:
            w.start()
        # measured window: from warm-up to the last tick
        time.sleep(max(0.0, t0_mono + warmup - time.monotonic()))
        cpu0, wall0 = st.cpu(), time.monotonic()
        time.sleep(max(0.0, t0_mono + ticks * dt - time.monotonic()))
        cpu1, wall1 = st.cpu(), time.monotonic()
        mem = st.mem()
        for _ in workers:
            outs.append(results.get(timeout=60))
        for w in workers:
            w.join(10)
        stats = server.stats()
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
                w.join(5)
        final = server.stop()
    errors = [o["error"] for o in outs if "error" in o]
    sent_samples = sum(o.get("samples", 0) for o in outs)
    sig = stats.get("signals", {})
    ingested = sig.get("samples", 0)
    delays = [d for o in outs for d in o.get("ack_delays", [])]
    late = [x for o in outs for x in o.get("lateness", [])]
    per_channel = ticks * block
    windows_expected = channels * ((per_channel - WINDOW) // HOP + 1)
    res = {
        "channels": channels,
        "seconds": ticks * dt,
        "startup_s": ready.get("startup_s", 0.0),
        "server_cpu": (cpu1 - cpu0) / (wall1 - wall0),
        "rss": mem.get("VmRSS", 0),
        "hwm": mem.get("VmHWM", 0),
        "sent": sent_samples,
        "ingested": ingested,
        "lost": sent_samples - ingested,
        "rejected": sig.get("rejected_blocks", 0),
        "windows": sig.get("windows", 0),
        "windows_expected": windows_expected,
        "unacked": sum(o.get("sent", 0) - o.get("acked", 0) for o in outs),
        "ack_p50": common.pct(delays, 50),
        "ack_p99": common.pct(delays, 99),
        "ack_max": max(delays) if delays else float("nan"),
        "late_max": max(late) if late else float("nan"),
        "pub_cpu": sum(o.get("cpu", 0.0) for o in outs) / max(ticks * dt, 1e-9),
        "publishers": nproc,
        "errors": errors,
        "final_ok": final is not None,
    }
    res["sustained"] = (not errors and res["lost"] == 0 and res["rejected"] == 0
                        and res["unacked"] == 0 and res["ack_p99"] < 1.0
                        and res["server_cpu"] < 0.9)
    return res


def analytics_reference(channels: int, block: int, capacity: int,
                        signal_seconds: float = 2.0) -> float:
    """CPU s per real-time second of SignalHub.ingest alone for ``channels`` channels."""
    import numpy as np
    from twisted.internet.task import Clock

    from iotserver.config import SignalConfig
    from iotserver.tags.ring import RingRegistry
    from iotserver.tags.signals import SignalHub
    from iotserver.tags.store import TagStore

    store = TagStore(Clock())
    hub = SignalHub(store, RingRegistry(max_bytes=None))
    bands = ((10.0, 1000.0), (1000.0, 5000.0), (5000.0, 20000.0))
    names = [channel_name(i) for i in range(channels)]
    for n in names:
        hub.add(SignalConfig(n, RATE, capacity, block, "g", "", WINDOW, HOP, bands, 3600))
    rng = np.random.default_rng(1)
    blocks = [rng.normal(0, 1, block).astype(np.float32) for _ in range(4)]
    period = round(1e9 / RATE)
    n_blocks = int(signal_seconds * RATE / block)
    start = 1_700_000_000 * 10**9
    # one warm-up pass over a few blocks, then the measured ones
    t_cpu = time.process_time()
    for b in range(n_blocks):
        for n in names:
            hub.ingest(n, start + b * block * period, blocks[b % 4])
    cpu = time.process_time() - t_cpu
    return cpu / (n_blocks * block / RATE)


def fmt_row(r: dict[str, Any], ref: float | None = None) -> list[Any]:
    return [
        r["channels"],
        f"{r['channels'] * RATE / 1e6:.2f}",
        f"{r['server_cpu'] * 100:.0f} %",
        f"{ref * 100:.0f} %" if ref is not None else "",
        f"{r['rss'] / 2**20:.0f} / {r['hwm'] / 2**20:.0f}",
        f"{r['sent']:,}",
        f"{r['lost']:,}",
        r["rejected"],
        f"{r['windows']:,} / {r['windows_expected']:,}",
        f"{r['ack_p50'] * 1000:.0f} / {r['ack_p99'] * 1000:.0f} / {r['ack_max'] * 1000:.0f}",
        f"{r['pub_cpu'] * 100:.0f} %",
        "yes" if r["sustained"] else "NO",
    ]


HEADERS = ["channels", "MS/s", "server CPU (1 core = 100 %)", "analytics alone (same run)",
           "RSS / peak MiB", "samples sent", "lost", "rejected blocks",
           "windows / expected", "PUBACK delay p50/p99/max ms", "publishers' CPU", "sustained"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="about 30 s: 5 s at --channels, "
                    "one sweep step")
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--block", type=int, default=5120, help="samples per block (0.1 s)")
    ap.add_argument("--capacity", type=int, default=1 << 17,
                    help="ring capacity per channel in samples (default 131072, 2.56 s)")
    ap.add_argument("--sweep", default="128,192,256,320,384,448,512",
                    help="channel counts tried after the main run, until one is not sustained")
    ap.add_argument("--sweep-seconds", type=float, default=6.0)
    args = ap.parse_args()
    if args.quick:
        args.seconds = 5.0
        args.sweep = "256"
        args.sweep_seconds = 5.0
    common.print_header("signals through MQTT: N channels x 51.2 kS/s, server in its own process")
    print(f"block {args.block} samples ({args.block / RATE * 1000:.0f} ms), window {WINDOW}, "
          f"hop {HOP}, 3 FFT bands, ring {args.capacity} samples/channel, QoS 1\n", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-signals-") as tmpdir:
        tmp = Path(tmpdir)
        main_run = run(args.channels, args.seconds, args.block, args.capacity, tmp)
        ref = analytics_reference(args.channels, args.block, args.capacity)
        rows.append(fmt_row(main_run, ref))
        print(common.table(HEADERS, rows), flush=True)
        for e in main_run["errors"]:
            print("  publisher error:", e)
        best = main_run["channels"] if main_run["sustained"] else 0
        last = main_run
        for n in [int(x) for x in args.sweep.split(",") if x.strip()]:
            if n <= args.channels:
                continue
            r = run(n, args.sweep_seconds, args.block, args.capacity, tmp)
            last = r
            rows.append(fmt_row(r))
            print("| " + " | ".join(str(c) for c in rows[-1]) + " |", flush=True)
            for e in r["errors"]:
                print("  publisher error:", e)
            if not r["sustained"]:
                break
            best = n
    print()
    print(common.table(HEADERS, rows))
    print()
    print(f"analytics alone (SignalHub.ingest in this process, no MQTT) for "
          f"{args.channels} channels: {ref * 100:.1f} % of one core "
          f"({ref / args.channels * 100:.2f} % per channel)")
    mr = main_run
    overhead = mr["server_cpu"] - ref
    print(f"server process for {args.channels} channels: {mr['server_cpu'] * 100:.1f} % of one "
          f"core; MQTT path on top of the analytics: {overhead * 100:.1f} % "
          f"({overhead / args.channels * 100:.2f} % per channel)")
    target = mr["sustained"] and mr["server_cpu"] < 0.5 and mr["lost"] == 0
    print(f"target >= 64 channels under 50 % of one core, no samples lost: "
          f"{'MET' if target and args.channels >= 64 else 'NOT MET'}")
    stop_note = "" if not last["sustained"] or last is main_run else " (sweep ended sustained)"
    print(f"largest channel count sustained: {best}{stop_note}"
          + ("" if last["sustained"] else
             f"; {last['channels']} was not (CPU {last['server_cpu'] * 100:.0f} %, "
             f"lost {last['lost']:,}, PUBACK p99 {last['ack_p99'] * 1000:.0f} ms)"))


if __name__ == "__main__":
    main()
