"""Modbus TCP server throughput: ours vs pymodbus, measured in the same run.

Scenarios: read 100 holding registers (FC03) and write one register (FC06), with 1 and 10
client connections, each a plain request/response loop. The load client is C (libmodbus, one
thread per connection), so it is not the bottleneck; it is compiled on first use.

Needs gcc and libmodbus: ``apt-get install -y gcc libmodbus-dev`` (Debian package names).
Run: ``python benchmarks/modbus/bench_server.py [--seconds 3]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import HERE, cpu_seconds, free_port, start, stop


def build_client(directory: Path) -> Path:
    if shutil.which("gcc") is None or not Path("/usr/include/modbus/modbus.h").exists():
        raise SystemExit("the load client needs gcc and libmodbus: "
                         "apt-get install -y gcc libmodbus-dev")
    out = directory / "load_client"
    subprocess.run(["gcc", "-O2", "-o", str(out), str(HERE / "load_client.c"),
                    "-I/usr/include/modbus", "-lmodbus", "-lpthread"], check=True)
    return out


def measure(client: Path, server: str, conns: int, op: str, seconds: float) -> tuple[float, float]:
    """(requests/s, server CPU seconds per 1000 requests)."""
    port = free_port()
    proc = start(server, str(port))
    try:
        cpu0 = cpu_seconds(proc.pid)
        res = subprocess.run([str(client), "127.0.0.1", str(port), str(conns), str(seconds), op],
                             capture_output=True, text=True, check=True)
        cpu = cpu_seconds(proc.pid) - cpu0
    finally:
        stop(proc)
    requests, errors = (int(x) for x in res.stdout.split())
    if errors:
        print(f"  ({server} {op} x{conns}: {errors} errors)", file=sys.stderr)
    return requests / seconds, cpu / max(requests, 1) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        client = build_client(Path(tmp))
        rows = []
        for op in ("read100", "write1"):
            for conns in (1, 10):
                ours, ours_cpu = measure(client, "ours", conns, op, args.seconds)
                theirs, theirs_cpu = measure(client, "pymodbus", conns, op, args.seconds)
                rows.append((op, conns, ours, theirs, ours_cpu, theirs_cpu))
    print(f"\nModbus TCP server, loopback, C load client, {args.seconds:g} s per cell")
    print(f"{'request':<9} {'conns':>5} {'ours req/s':>11} {'pymodbus req/s':>15} {'ratio':>6}"
          f" {'ours cpu ms/1k':>15} {'pymodbus cpu ms/1k':>19}")
    for op, conns, ours, theirs, oc, tc in rows:
        ratio = ours / theirs if theirs else float("inf")
        print(f"{op:<9} {conns:>5} {ours:>11.0f} {theirs:>15.0f} {ratio:>5.1f}x"
              f" {oc * 1000:>15.0f} {tc * 1000:>19.0f}")


if __name__ == "__main__":
    main()
