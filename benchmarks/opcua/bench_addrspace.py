"""OPC UA address space cost at scale: memory per tag variable, build time, value pump CPU.

In process, no network. For each tag count (each in a fresh process, so RSS is not polluted by
an earlier run): a TagStore with N uint16 tags, 100 per folder (``P<p>/G<nnn>/R<nnnnn>``, as
benchmarks/e2e/bench_scale.py polls them), then the OPC UA service is started over it.

* memory: RSS after the service started minus RSS after the store was built; the 0-tag run
  gives the fixed cost of asyncua's standard address space, so
  ``(delta(N) - delta(0)) / N`` is the cost of one tag variable;
* build: the service start time (N tags) minus that of the 0-tag run;
* value pump: an in-process subscription with a monitored item on every ``N / monitored``-th
  tag; the pump's handling of full batches (every tag changes) is timed, the queued
  notifications dropped after each batch as a publish would. Reported as microseconds per
  change and as the share of one core at 100,000 changes/s.

No peer: this measures our adapter against its own budget (the project's target: about 1-1.5 KB per
variable, the pump well below 0.4 core at 100k changes/s).

    python benchmarks/opcua/bench_addrspace.py [--tags 100000] [--monitored 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tag_path(i: int) -> str:
    return f"P{i // 10_000}/G{i // 100:03d}/R{i:05d}"


async def measure(tags: int, monitored: int, batches: int) -> dict[str, Any]:
    import gc

    from twisted.internet import reactor

    from iotserver import config
    from iotserver.app import Core
    from iotserver.opcua.service import OpcUaService
    from iotserver.tags.model import Change, DataType, Quality, TagDef, TagValue
    from iotserver.tags.ring import RingRegistry
    from iotserver.tags.signals import SignalHub
    from iotserver.tags.store import TagStore

    data = Path(tempfile.mkdtemp(prefix="bench-aspace-"))
    cfg = config.parse(f"""
[server]
data_dir = "{data}"
[opcua]
endpoint = "opc.tcp://127.0.0.1:{free_port()}/bench"
security_policies = ["None"]
allow_anonymous = true
max_monitored_items = 200000
""")
    store = TagStore(reactor)
    defs = [TagDef(tag_path(i), DataType.UINT16, access=_rw(), initial=0) for i in range(tags)]
    for d in defs:
        store.define(d)
    core = Core(config=cfg, clock=reactor, store=store, rings=RingRegistry(),
                signals=SignalHub(store, RingRegistry()))
    gc.collect()
    rss0 = rss_kb()
    service = OpcUaService(core, cfg.sections["opcua"])
    t0 = time.perf_counter()
    await service._astart()
    build = time.perf_counter() - t0
    gc.collect()
    rss1 = rss_kb()
    out: dict[str, Any] = {"tags": tags, "rss_delta_kb": rss1 - rss0, "start_s": build}
    if tags and monitored:
        from asyncua import ua

        iserver = service.iserver
        assert iserver is not None and service.pump is not None
        params = ua.CreateSubscriptionParameters(RequestedPublishingInterval=100.0,
                                                 RequestedMaxKeepAliveCount=10,
                                                 RequestedLifetimeCount=30, PublishingEnabled=True)

        async def sink(*_: Any) -> None:
            return None

        res = await iserver.subscription_service.create_subscription(params, sink, ua.NodeId(1))
        sub = iserver.subscription_service.subscriptions[res.SubscriptionId]
        step = max(1, tags // monitored)
        idx = service.space.idx if service.space is not None else 2
        reqs = []
        for i in range(0, tags, step):
            req = ua.MonitoredItemCreateRequest()
            req.ItemToMonitor.NodeId = ua.NodeId(tag_path(i), idx)
            req.ItemToMonitor.AttributeId = ua.AttributeIds.Value
            req.MonitoringMode = ua.MonitoringMode.Reporting
            req.RequestedParameters.ClientHandle = i
            req.RequestedParameters.QueueSize = 1
            reqs.append(req)
        mparams = ua.CreateMonitoredItemsParameters(
            SubscriptionId=res.SubscriptionId, TimestampsToReturn=ua.TimestampsToReturn.Both,
            ItemsToCreate=reqs)
        gc.collect()
        rss2 = rss_kb()
        results = await sub.monitored_item_srv.create_monitored_items(mparams)
        assert all(r.StatusCode.is_good() for r in results)
        gc.collect()
        out["items"] = len(reqs)
        out["items_rss_kb"] = rss_kb() - rss2
        pump = service.pump
        pump.budget = 1e9  # one slice per batch: time the work, not the yielding
        spent = 0.0
        n = 0
        for k in range(batches):
            now = store.now_ns()
            changes = [Change(d, TagValue(k + 1, Quality.GOOD, now, now)) for d in defs]
            sub.datachanges = {}
            t = time.perf_counter()
            pump._apply(changes, 0)
            spent += time.perf_counter() - t
            n += len(changes)
        out["us_per_change"] = spent / n * 1e6
        out["core_at_100k"] = spent / n * 100_000
        out["queued"] = sum(len(q) for q in sub.datachanges.values())
        await iserver.subscription_service.delete_subscriptions([res.SubscriptionId])
    await service._astop()
    return out


def _rw() -> Any:
    from iotserver.tags.model import Access

    return Access.READ_WRITE


def run_child(tags: int, monitored: int, batches: int) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", str(tags), str(monitored),
                           str(batches)], capture_output=True, text=True, timeout=900)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        raise RuntimeError(proc.stderr[-2000:])
    return dict(json.loads(lines[-1]))


def child(tags: int, monitored: int, batches: int) -> None:
    from twisted.internet import asyncioreactor

    asyncioreactor.install()
    import logging

    logging.basicConfig(level=logging.WARNING)
    result = asyncio.get_event_loop().run_until_complete(measure(tags, monitored, batches))
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tags", type=int, default=100_000)
    parser.add_argument("--monitored", type=int, default=10_000)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true",
                        help="a short run: 10,000 tags, 1,000 monitored, 2 batches")
    args = parser.parse_args()
    if args.quick:
        args.tags, args.monitored, args.batches = (min(args.tags, 10_000),
                                                   min(args.monitored, 1000), 2)
    if args.child:
        child(*args.child)
        return
    base = run_child(0, 0, 0)
    res = run_child(args.tags, args.monitored, args.batches)
    per_tag = (res["rss_delta_kb"] - base["rss_delta_kb"]) * 1024 / max(1, args.tags)
    print(f"{'tags':>8} {'RSS delta':>10} {'per variable':>13} {'build':>8} "
          f"{'items':>6} {'RSS/item':>9} {'pump us/chg':>12} {'core@100k/s':>12}")
    print(f"{0:>8} {base['rss_delta_kb'] / 1024:>8.1f}MB {'-':>13} {base['start_s']:>7.2f}s")
    print(f"{args.tags:>8} {res['rss_delta_kb'] / 1024:>8.1f}MB {per_tag:>11.0f} B "
          f"{res['start_s'] - base['start_s']:>7.2f}s {res.get('items', 0):>6} "
          f"{res.get('items_rss_kb', 0) * 1024 / max(1, res.get('items', 1)):>7.0f} B "
          f"{res.get('us_per_change', 0):>12.3f} {res.get('core_at_100k', 0):>12.3f}")


if __name__ == "__main__":
    main()
