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

Needs gcc and libmodbus: ``apt-get install -y gcc libmodbus-dev`` (Debian package names).
Run: ``python benchmarks/modbus/bench_server.py [--seconds 3] [--no-pinned]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--no-pinned", action="store_true",
                        help="skip the 1-connection rows with server and client on one CPU")
    parser.add_argument("--quick", action="store_true", help="a short run: 1 s per measurement")
    args = parser.parse_args()
    if args.quick:
        args.seconds = min(args.seconds, 1.0)
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
                   for s in SERVERS}
            rows.append((op, conns, cpu, got))
    print(f"\nModbus TCP server, loopback, C load client, {args.seconds:g} s per cell "
          f"(req/s; server CPU ms per 1000 requests in brackets)")
    print(f"{'request':<9} {'conns':<12} {'ours':>14} {'pymodbus':>14} {'libmodbus':>14}"
          f" {'ours/pymodbus':>14} {'ours/libmodbus':>15}")
    for op, conns, cpu, got in rows:
        label = f"{conns}" + (" same CPU" if cpu is not None else "")
        cols = " ".join(f"{got[s][0]:>7.0f} ({got[s][1] * 1000:>4.0f})" for s in SERVERS)
        ours, theirs, c = got["ours"][0], got["pymodbus"][0], got["libmodbus"][0]
        print(f"{op:<9} {label:<12} {cols} {ours / theirs:>13.1f}x {ours / c:>14.2f}x")


if __name__ == "__main__":
    main()
