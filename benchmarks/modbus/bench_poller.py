"""Poller throughput: tag values per second polled from simulated PLCs, and the CPU it costs.

Each simulated PLC runs in its own process (our SimPLC); the poller (this process, one core,
the Twisted asyncio reactor, pymodbus clients) polls every device as fast as it can: 2000
UInt16 holding registers and 1000 Float32 input registers per device, one store.apply per
poll, one store subscriber counting changes (a northbound consumer). Two plans are compared:
block reads (125 registers per request) and one request per tag, which is what a poller
without block planning does.

Run: ``python benchmarks/modbus/bench_poller.py [--plcs 2] [--seconds 5]``.
"""

from __future__ import annotations

import argparse
import resource
import time
from typing import Any

from common import ROOT, free_port, start, stop


def _config(ports: list[int], per_tag: bool) -> Any:
    from iotserver import config

    parts = []
    for i, port in enumerate(ports):
        parts.append(f"""
[[modbus.devices]]
name = "plc{i}"
endpoint = "127.0.0.1:{port}"
interval = 0.001
timeout = 2
max_registers = 125
""")
        for a in range(2000):
            parts.append(f'[[modbus.devices.tags]]\npath = "PLC{i}/H{a}"\ntable = "holding"\n'
                         f'address = {a}\ntype = "uint16"\n')
        for a in range(0, 2000, 2):
            parts.append(f'[[modbus.devices.tags]]\npath = "PLC{i}/F{a}"\ntable = "input"\n'
                         f'address = {a}\ntype = "float32"\n')
    return config.parse("\n".join(parts), source="bench").sections["modbus"]


def run(ports: list[int], seconds: float, per_tag: bool,
        report: Any = None) -> tuple[float, float, float, int]:
    """(values/s, CPU s per s, requests/s, blocks per poll) for one plan."""
    from twisted.internet import asyncioreactor

    asyncioreactor.install()
    from twisted.internet import defer, reactor, task

    from iotserver.lifecycle import as_deferred
    from iotserver.modbus.poller import Device
    from iotserver.tags.store import TagStore

    cfg = _config(ports, per_tag)
    store = TagStore(reactor)
    for t in cfg.tag_defs():
        store.define(t)
    seen = [0]
    store.subscribe("**", lambda changes: seen.__setitem__(0, seen[0] + len(changes)),
                    initial=False)
    devices = [Device(d, store) for d in cfg.devices]
    if per_tag:  # what a poller without block planning does
        from iotserver.modbus.planner import plan_blocks

        for dev in devices:
            for g in dev.groups:
                g.blocks = [plan_blocks([t])[0] for b in g.blocks for t in b.tags]
    result: dict[str, Any] = {}

    async def main() -> None:
        try:
            await measure()
        finally:
            reactor.stop()  # type: ignore[attr-defined]

    async def measure() -> None:
        for d in devices:
            d.start()
        await task.deferLater(reactor, 1.0, lambda: None)  # connect, warm up
        v0 = sum(d.stats.values for d in devices)
        r0 = sum(d.stats.requests for d in devices)
        u0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        await task.deferLater(reactor, seconds, lambda: None)
        dt = time.perf_counter() - t0
        u1 = resource.getrusage(resource.RUSAGE_SELF)
        result["values"] = (sum(d.stats.values for d in devices) - v0) / dt
        result["requests"] = (sum(d.stats.requests for d in devices) - r0) / dt
        result["cpu"] = ((u1.ru_utime - u0.ru_utime) + (u1.ru_stime - u0.ru_stime)) / dt
        result["blocks"] = len(devices[0].blocks)
        if report is not None:  # child process: report and leave (no orderly shutdown needed)
            report(result)
        for d in devices:
            await as_deferred(d.stop())

    reactor.callWhenRunning(lambda: defer.ensureDeferred(main()))  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return result["values"], result["cpu"], result["requests"], result["blocks"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plcs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--per-tag", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ports", default="", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a short run: one PLC, 1 s")
    args = parser.parse_args()
    if args.quick:
        args.plcs, args.seconds = 1, min(args.seconds, 1.0)
    if args.ports:  # child: one plan, one reactor per process
        import os

        def report(r: dict[str, Any]) -> None:
            print(f"{r['values']:.0f} {r['cpu']:.3f} {r['requests']:.0f} {r['blocks']}",
                  flush=True)
            os._exit(0)

        run([int(p) for p in args.ports.split(",")], args.seconds, args.per_tag, report)
        return
    import os
    import subprocess
    import sys

    plcs = [(port, start("simplc", str(port), "2000")) for port in
            (free_port() for _ in range(args.plcs))]
    rows = []
    try:
        ports = ",".join(str(p) for p, _ in plcs)
        for per_tag in (False, True):
            cmd = [sys.executable, __file__, "--ports", ports, "--seconds", str(args.seconds)]
            env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}"
                       f"{os.environ.get('PYTHONPATH', '')}")
            out = subprocess.run(cmd + (["--per-tag"] if per_tag else []), check=True,
                                 capture_output=True, text=True, env=env,
                                 timeout=args.seconds + 120).stdout.split()
            rows.append(("one request per tag" if per_tag else "block reads (125 regs)",
                         float(out[0]), float(out[1]), float(out[2]), int(out[3])))
    finally:
        for _, proc in plcs:
            stop(proc)
    print(f"\nModbus poller, {args.plcs} simulated PLCs (own processes), 3000 tags each, "
          f"{args.seconds:g} s")
    print(f"{'plan':<24} {'reads/poll':>10} {'values/s':>10} {'requests/s':>11} "
          f"{'poller CPU s/s':>15} {'values per CPU s':>17}")
    for name, values, cpu, reqs, blocks in rows:
        print(f"{name:<24} {blocks:>10} {values:>10.0f} {reqs:>11.0f} {cpu:>15.2f} "
              f"{values / cpu if cpu else 0:>17.0f}")
    print(f"block reads vs one request per tag: {rows[0][1] / rows[1][1]:.1f}x values/s")


if __name__ == "__main__":
    main()
