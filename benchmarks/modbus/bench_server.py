"""Modbus TCP server throughput: ours vs pymodbus (and libmodbus), measured in the same run.

Scenarios: read 100 holding registers (FC03) and write one register (FC06), with 1 and 10
client connections, each a plain request/response loop. The load client is C (libmodbus, one
thread per connection), so it is not the bottleneck; it is compiled on first use, and so is a
libmodbus C server (``libmodbus_server.c``, one select() loop) shown as a third reference.

With one connection only one request is ever in flight: client and server take turns to sleep
and wake, and on a small VM a wake-up across CPUs costs tens of microseconds, whatever the
server does. So the 1-connection cells are measured twice: as scheduled by the kernel, and
with the server and the client pinned to one CPU (``same CPU`` rows), which leaves the
servers' own cost per request. Every server is measured under the same conditions.

A second table writes one register (FC06) at line rate to persisted memory tags (SQLite,
fsynced) while a probe connection reads every 2 ms: requests/s, and the probe's read latency,
which shows whether the event loop stays responsive. "group commit" is the server as it is
(commits on a writer thread); "fsync on the loop" commits each write on the event loop before
answering (as persisted writes worked before); "not persisted" is the plain memory tag.

Needs gcc and libmodbus: ``apt-get install -y gcc libmodbus-dev`` (Debian package names).
Run: ``python benchmarks/modbus/bench_server.py [--seconds 3] [--no-pinned] [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import HERE, cpu_seconds, free_port, start, stop

SERVERS = ("ours", "pymodbus", "libmodbus")


def build(directory: Path) -> tuple[Path, Path]:
    """(load client, libmodbus server) compiled against Debian's libmodbus."""
    if shutil.which("gcc") is None or not Path("/usr/include/modbus/modbus.h").exists():
        raise SystemExit("the load client needs gcc and libmodbus: "
                         "apt-get install -y gcc libmodbus-dev")
    out = []
    for name, extra in (("load_client", ["-lpthread"]), ("libmodbus_server", [])):
        exe = directory / name
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(HERE / f"{name}.c"),
                        "-I/usr/include/modbus", "-lmodbus", *extra], check=True)
        out.append(exe)
    return out[0], out[1]


def measure(client: Path, c_server: Path, server: str, conns: int, op: str, seconds: float,
            cpu: int | None) -> tuple[float, float]:
    """(requests/s, server CPU seconds per 1000 requests); ``cpu``: pin both to that CPU."""
    port = free_port()
    if server == "libmodbus":
        proc = start(command=[str(c_server), str(port)])
    else:
        proc = start(server, str(port))
    pin = None
    if cpu is not None:
        os.sched_setaffinity(proc.pid, {cpu})

        def pin() -> None:
            os.sched_setaffinity(0, {cpu})
    try:
        cpu0 = cpu_seconds(proc.pid)
        res = subprocess.run([str(client), "127.0.0.1", str(port), str(conns), str(seconds), op],
                             capture_output=True, text=True, check=True, preexec_fn=pin)
        used = cpu_seconds(proc.pid) - cpu0
    finally:
        stop(proc)
    requests, errors = (int(x) for x in res.stdout.split())
    if errors:
        print(f"  ({server} {op} x{conns}: {errors} errors)", file=sys.stderr)
    return requests / seconds, used / max(requests, 1) * 1000


class Probe(threading.Thread):
    """Reads one register every ``every`` seconds on its own connection; keeps latencies."""

    def __init__(self, port: int, every: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.every = every
        self.latencies: list[float] = []
        self.stop_at = float("inf")
        self.failed = ""

    def run(self) -> None:
        request = struct.pack(">HHHBBHH", 1, 0, 6, 1, 3, 150, 1)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while time.monotonic() < self.stop_at:
                    t0 = time.perf_counter()
                    sock.sendall(request)
                    got = b""
                    while len(got) < 11:
                        chunk = sock.recv(64)
                        if not chunk:
                            raise ConnectionError("closed")
                        got += chunk
                    self.latencies.append(time.perf_counter() - t0)
                    time.sleep(self.every)
        except OSError as exc:
            self.failed = str(exc)


def persisted(client: Path, variant: str, conns: int, seconds: float,
              directory: Path) -> tuple[float, list[float]]:
    """FC06 at line rate to memory tags, persisted as ``variant``; (req/s, probe latencies)."""
    port = free_port()
    data = directory / f"{variant}-{conns}"
    data.mkdir()
    kind = {"group commit": "ours-persist", "fsync on the loop": "ours-persist-loop",
            "not persisted": "ours"}[variant]
    proc = start(kind, str(port), str(data)) if kind != "ours" else start(kind, str(port))
    probe = Probe(port)
    try:
        probe.start()
        res = subprocess.run([str(client), "127.0.0.1", str(port), str(conns), str(seconds),
                              "write1"], capture_output=True, text=True, check=True)
        probe.stop_at = 0
        probe.join(15)
    finally:
        stop(proc)
    if probe.failed:
        print(f"  (probe on {variant}: {probe.failed})", file=sys.stderr)
    requests, _errors = (int(x) for x in res.stdout.split())
    return requests / seconds, probe.latencies


def _ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--no-pinned", action="store_true",
                        help="skip the 1-connection rows with server and client on one CPU")
    parser.add_argument("--audit", action="store_true",
                        help="also measure ours with the audit trail attached (ours+audit)")
    parser.add_argument("--quick", action="store_true",
                        help="1 s per cell, no pinned rows")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.no_pinned = 1.0, True
    servers = SERVERS + (("ours+audit",) if args.audit else ())
    cells: list[tuple[str, int, int | None]] = []
    for op in ("read100", "write1"):
        cells += [(op, 1, None), (op, 10, None)]
        if not args.no_pinned:
            cells.append((op, 1, min(os.sched_getaffinity(0))))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        client, c_server = build(Path(tmp))
        for op, conns, cpu in cells:
            got = {s: measure(client, c_server, s, conns, op, args.seconds, cpu)
                   for s in servers}
            rows.append((op, conns, cpu, got))
        durable = []
        for conns in (1, 10):
            for variant in ("not persisted", "fsync on the loop", "group commit"):
                durable.append((conns, variant, *persisted(client, variant, conns,
                                                           args.seconds, Path(tmp))))
    print(f"\nModbus TCP server, loopback, C load client, {args.seconds:g} s per cell "
          f"(req/s; server CPU ms per 1000 requests in brackets)")
    audit_head = f" {'ours+audit':>14} {'audit/ours':>11}" if args.audit else ""
    print(f"{'request':<9} {'conns':<12} {'ours':>14} {'pymodbus':>14} {'libmodbus':>14}"
          f" {'ours/pymodbus':>14} {'ours/libmodbus':>15}{audit_head}")
    for op, conns, cpu, got in rows:
        label = f"{conns}" + (" same CPU" if cpu is not None else "")
        cols = " ".join(f"{got[s][0]:>7.0f} ({got[s][1] * 1000:>4.0f})" for s in SERVERS)
        ours, theirs, c = got["ours"][0], got["pymodbus"][0], got["libmodbus"][0]
        audit = ""
        if args.audit:
            a = got["ours+audit"]
            audit = f" {a[0]:>7.0f} ({a[1] * 1000:>4.0f}) {a[0] / ours:>10.2f}x"
        print(f"{op:<9} {label:<12} {cols} {ours / theirs:>13.1f}x {ours / c:>14.2f}x{audit}")
    print(f"\nFC06 to persisted memory tags at line rate, {args.seconds:g} s per cell, with a "
          "probe reading every 2 ms on another connection (its latency in ms)")
    print(f"{'conns':<6} {'persistence':<18} {'writes/s':>9} {'probe p50':>10} {'p99':>7}"
          f" {'max':>7} {'probe reads':>12}")
    base = {c: r for c, v, r, _ in durable if v == "fsync on the loop"}
    for conns, variant, rate, lat in durable:
        print(f"{conns:<6} {variant:<18} {rate:>9.0f} {_ms(lat, 0.5):>10.2f} {_ms(lat, 0.99):>7.2f}"
              f" {_ms(lat, 1.0):>7.2f} {len(lat):>12}   {rate / base[conns]:.2f}x fsync-on-loop")


if __name__ == "__main__":
    main()
