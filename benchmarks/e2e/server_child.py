"""The server under test, in its own process: ``app.build(config)`` on the asyncio reactor.

This is what ``twistd -n --reactor=asyncio iotserver --config FILE`` runs (same ``app.build``,
same services, stdlib logging forwarded, the GC tuning of ``ServerRoot`` once ready), plus a
small control channel for the benchmarks on stdout, one JSON object per line:

* ``{"kind": "ready", ...}`` once every service has started;
* ``{"kind": "stats", ...}`` on SIGUSR1: counters of the store, the poller devices, the signal
  channels, the MQTT bridge and broker, the OPC UA value pump, and this process's CPU time;
* ``{"kind": "final", ...}`` on SIGTERM, before the services stop.

``--profile FILE``: cProfile from the first SIGUSR1 to the second (the measured window),
written to FILE (``python -m pstats FILE``).

The log (warnings and errors only, to keep logging off the hot paths) goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def collect(core: Any, kind: str, started: float) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": kind, "mono": time.monotonic(), "uptime": time.monotonic()
                           - started}
    t = os.times()
    out["cpu"] = t.user + t.system
    store = core.store
    out["store"] = dataclasses.asdict(store.stats)
    out["store"]["tags"] = len(store)
    out["subscriptions"] = [
        {"name": s.name, "pattern": s.pattern, "delivered": s.delivered,
         "conflated": s.conflated, "failures": s.failures, "busy": s.busy,
         "pending": len(s.pending)}
        for s in store.subscriptions
    ]
    logins = getattr(core, "logins", None)
    if logins is not None:
        out["logins"] = dict(logins.stats)
    services = core.services
    modbus = services.get("modbus")
    if modbus is not None:
        devs = {}
        for name, d in getattr(modbus, "devices", {}).items():
            st = dataclasses.asdict(d.stats)
            st["state"] = d.state
            devs[name] = st
        out["modbus"] = devs
    if core.signals.channels:
        chans = [c.stats for c in core.signals.channels.values()]
        out["signals"] = {
            "channels": len(chans),
            "blocks": sum(c.blocks for c in chans),
            "samples": sum(c.samples for c in chans),
            "rejected_blocks": sum(c.rejected_blocks for c in chans),
            "windows": sum(c.windows for c in chans),
            "per_channel_samples": [c.samples for c in chans],
        }
    mqtt = services.get("mqtt")
    if mqtt is not None:
        bridge = getattr(mqtt, "bridge", None)
        if bridge is not None:
            out["bridge"] = dataclasses.asdict(bridge.stats)
        broker = getattr(mqtt, "broker", None)
        if broker is not None:
            bs = broker.stats
            out["broker"] = {k: (dict(getattr(bs, k)) if k == "dropped" else getattr(bs, k))
                             for k in type(bs).__slots__}
            out["broker"]["retained"] = len(broker.retained)
    opcua = services.get("opcua")
    if opcua is not None and getattr(opcua, "pump", None) is not None:
        p = opcua.pump
        out["opcua"] = {"changes": p.changes, "batches": p.batches, "slices": p.slices}
    import gc

    out["gc"] = [g["collections"] for g in gc.get_stats()]
    out["gc_seconds"] = list(_GC_TIME)
    return out


_GC_TIME = [0.0, 0.0, 0.0]  # seconds spent in collections of each generation
_gc_start = [0.0]


def _gc_callback(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_start[0] = time.perf_counter()
    else:
        _GC_TIME[info["generation"]] += time.perf_counter() - _gc_start[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--profile", default=None)
    args = ap.parse_args()

    from twisted.internet import asyncioreactor

    asyncioreactor.install()
    from twisted.internet import defer, reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    from iotserver import app, config
    from iotserver.lifecycle import AsyncService
    from iotserver.logs import forward_stdlib_logging

    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])],
        redirectStandardIO=False)
    forward_stdlib_logging()
    import gc

    gc.callbacks.append(_gc_callback)
    started = time.monotonic()
    cfg = config.load(args.config)
    root, core = app.build(cfg, reactor, stop_reactor=reactor.stop)  # type: ignore[attr-defined]
    root.shutdown_timeout = cfg.server.shutdown_timeout
    profiler: list[Any] = []
    usr1 = [0]

    def emit(msg: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    def on_usr1() -> None:
        usr1[0] += 1
        if args.profile:
            import cProfile

            if usr1[0] == 1:
                prof = cProfile.Profile()
                profiler.append(prof)
                prof.enable()
            elif usr1[0] == 2 and profiler:
                profiler[0].disable()
                profiler[0].dump_stats(args.profile)
        emit(collect(core, "stats", started))

    def before_shutdown() -> None:
        emit(collect(core, "final", started))

    async def ready() -> None:
        children = [c for c in root if isinstance(c, AsyncService) and c.started is not None]
        for c in children:
            await c.started
            sys.stderr.write(f"[server_child] {c.name} started after "
                             f"{time.monotonic() - started:.1f} s\n")
        failed = [c.name for c in children if c.failure is not None]
        if failed:
            sys.stderr.write(f"services failed to start: {failed}\n")
            reactor.stop()  # type: ignore[attr-defined]
            return
        loop = asyncio.get_event_loop()
        loop.add_signal_handler(signal.SIGUSR1, on_usr1)
        msg = collect(core, "ready", started)
        msg["startup_s"] = time.monotonic() - started
        emit(msg)

    def go() -> None:
        root.startService()
        d = defer.ensureDeferred(ready())
        d.addErrback(lambda f: (sys.stderr.write(f.getTraceback()), reactor.stop()))

    reactor.addSystemEventTrigger("before", "shutdown", before_shutdown)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", root.stopService)  # type: ignore[attr-defined]
    reactor.callWhenRunning(go)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
