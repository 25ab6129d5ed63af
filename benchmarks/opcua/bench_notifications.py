"""OPC UA data-change notifications/s: iotserver's server vs a plain asyncua server.

Each server runs in a fresh process (no GC state carried over), on the Twisted asyncio reactor;
the subscribing clients run in child processes (one process and asyncua client per
subscriber, 100 ms publishing interval, a monitored item per tag with a queue of 100 so that
every change is delivered rather than replaced; the clients count notifications without
decoding them, so that they are not what limits the rate). The load changes every tag as fast
as the server takes it:

* plain asyncua: ``Server.write_attribute_value`` per tag (4x faster than write_value), yielding to
  the loop every 5 ms;
* iotserver: ``TagStore.apply`` batches of all tags; the OPC UA service's value pump writes them
  into the address space (and conflates when it cannot keep up).

Measured: notifications received per second by each client over a fixed window.

    python benchmarks/opcua/bench_notifications.py [--tags 1000 10000] [--clients 1 2]
        [--seconds 5] [--quick]

Target: >= 3x plain asyncua with one client; two clients without halving.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
import contextlib

PUBLISH_MS = 100
QUEUE = 100
FOLDER = 100  # tags per folder


def tag_path(i: int) -> str:
    return f"Bench/G{i // FOLDER:03d}/T{i:05d}"


# --------------------------------------------------------------------------- client process


def _lean_notification_decoding() -> None:
    """Make the client process cheap: DataChangeNotifications are counted, not decoded.

    asyncua's client spends ~7 us decoding each notification, so one client process could not
    receive faster than about 100k/s even with a core to itself, and the comparison would
    measure the client. Replaces ``ua_binary.extensionobject_from_binary`` (before any decoder
    captures it) with a version that reads only the MonitoredItems count.
    """
    from types import SimpleNamespace

    from asyncua import ua
    from asyncua.common.utils import Buffer
    from asyncua.ua import ua_binary

    original = ua_binary.extensionobject_from_binary
    dcn = ua.NodeId(ua.ObjectIds.DataChangeNotification_Encoding_DefaultBinary)

    def lean(data: Buffer) -> Any:
        peek = data.copy()
        if ua_binary.nodeid_from_binary(peek) != dcn:
            return original(data)
        ua_binary.nodeid_from_binary(data)
        data.read(1)
        length = ua_binary.Primitives.Int32.unpack(data)
        body = data.copy(length)
        data.skip(length)
        count = ua_binary.Primitives.Int32.unpack(body)
        return SimpleNamespace(MonitoredItems=range(max(count, 0)), DiagnosticInfos=[])

    ua_binary.extensionobject_from_binary = lean


async def _client_main(url: str, ns_uri: str, tags: int, clients: int, seconds: float,
                       warmup: float) -> None:
    from asyncua import Client, ua

    _lean_notification_decoding()

    counts = [0] * clients
    counting = [False]

    def counter(k: int) -> Any:
        """Replaces the subscription's publish callback: count, skip per-item dispatch.

        The client process only decodes, so that it is not what limits the measurement.
        """

        async def publish_callback(result: ua.PublishResult) -> None:
            if counting[0]:
                for notif in result.NotificationMessage.NotificationData or []:
                    items = getattr(notif, "MonitoredItems", None)
                    if items:
                        counts[k] += len(items)

        return publish_callback

    class Handler:
        def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
            pass

    conns = []
    for _ in range(clients):
        # the client's health probe must answer within watchdog_intervall (1 s by default); on
        # a loaded machine a server busy with the load misses that and the client drops the
        # connection, for either server: give it room
        c = Client(url, timeout=60, watchdog_intervall=30)
        await c.connect()
        ns = await c.get_namespace_index(ns_uri)
        sub = await c.create_subscription(PUBLISH_MS, Handler())
        nodes = [c.get_node(ua.NodeId(tag_path(i), ns)) for i in range(tags)]
        for j in range(0, tags, 1000):
            await sub.subscribe_data_change(nodes[j:j + 1000], queuesize=QUEUE,
                                            sampling_interval=0)  # every change
        conns.append((c, sub))
    for k, (c, sub) in enumerate(conns):
        c.uaclient._subscription_callbacks[sub.subscription_id] = counter(k)
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # "GO"
    await asyncio.sleep(warmup)
    counting[0] = True
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    counting[0] = False
    elapsed = time.perf_counter() - t0
    print(json.dumps({"rates": [n / elapsed for n in counts]}), flush=True)
    for c, _ in conns:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(c.disconnect(), 10)


# --------------------------------------------------------------------------- servers


class PlainServer:
    """A plain asyncua server with the same tags, and a writer loop."""

    name = "plain asyncua"

    async def start(self, port: int, tags: int) -> str:
        from asyncua import Server, ua

        self.server = Server()
        await self.server.init()
        self.server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/bench")
        self.server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        self.ns_uri = "urn:bench:plain"
        idx = await self.server.register_namespace(self.ns_uri)
        objects = self.server.nodes.objects
        root = await objects.add_folder(ua.NodeId("Bench", idx), "Bench")
        self.ids = []
        folder = None
        for i in range(tags):
            if i % FOLDER == 0:
                name = tag_path(i).rsplit("/", 1)[0]
                folder = await root.add_folder(ua.NodeId(name, idx), name.rsplit("/", 1)[1])
            assert folder is not None
            var = await folder.add_variable(ua.NodeId(tag_path(i), idx), f"T{i:05d}", 0.0)
            self.ids.append(var.nodeid)
        await self.server.start()
        self.applied = 0
        self._task = asyncio.ensure_future(self._load())
        return self.ns_uri

    async def _load(self) -> None:
        from asyncua import ua

        k = 0
        deadline = time.perf_counter() + 0.005
        while True:
            k += 1
            for nid in self.ids:
                await self.server.write_attribute_value(
                    nid, ua.DataValue(ua.Variant(float(k), ua.VariantType.Double)))
                self.applied += 1
                if time.perf_counter() >= deadline:
                    await asyncio.sleep(0)
                    deadline = time.perf_counter() + 0.005

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.server.stop()


class IotServer:
    """iotserver's OPC UA service over a tag store, with a source applying batches."""

    name = "iotserver"

    async def start(self, port: int, tags: int) -> str:
        from twisted.internet import reactor

        from iotserver import config
        from iotserver.app import Core
        from iotserver.opcua.service import OpcUaService
        from iotserver.tags.model import DataType, TagDef
        from iotserver.tags.ring import RingRegistry
        from iotserver.tags.signals import SignalHub
        from iotserver.tags.store import TagStore

        data = Path(tempfile.mkdtemp(prefix="bench-opcua-"))
        cfg = config.parse(f"""
[server]
data_dir = "{data}"
[opcua]
endpoint = "opc.tcp://127.0.0.1:{port}/bench"
security_policies = ["None"]
allow_anonymous = true
""")
        store = TagStore(reactor)
        rings = RingRegistry()
        self.paths = [tag_path(i) for i in range(tags)]
        for p in self.paths:
            store.define(TagDef(p, DataType.FLOAT64, initial=0.0))
        core = Core(config=cfg, clock=reactor, store=store, rings=rings,
                    signals=SignalHub(store, rings))
        self.store = store
        self.service = OpcUaService(core, cfg.sections["opcua"])
        await self.service._astart()
        self.applied = 0
        self._task = asyncio.ensure_future(self._load())
        return cfg.sections["opcua"].namespace

    async def _load(self) -> None:
        from iotserver.tags.model import Update

        k = 0
        while True:
            k += 1
            v = float(k)
            self.store.apply([Update(p, v) for p in self.paths])
            self.applied += len(self.paths)
            await asyncio.sleep(0.001)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.service._astop()


# --------------------------------------------------------------------------- driver


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def scenario(kind: type, tags: int, clients: int, seconds: float, warmup: float
                   ) -> dict[str, Any]:
    server = kind()
    port = free_port()
    ns_uri = await server.start(port, tags)
    # one process per client, as separate SCADA stations would be
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--client", f"opc.tcp://127.0.0.1:{port}/bench", ns_uri,
        str(tags), "1", str(seconds), str(warmup),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env) for _ in range(clients)]
    for proc in procs:  # all subscribed before anyone counts
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                await server.stop()
                raise RuntimeError("a client process died before subscribing")
            if line.strip() == b"READY":
                break
    applied_at_ready = server.applied
    t_ready = time.perf_counter()
    cpu_ready = time.process_time()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(b"GO\n")
        await proc.stdin.drain()
    rates: list[float] = []
    for proc in procs:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line or line.startswith(b"{"):
                rates += json.loads(line)["rates"] if line else [0.0]
                break
    wall = time.perf_counter() - t_ready
    result: dict[str, Any] = {
        "rates": rates,
        "changes": (server.applied - applied_at_ready) / wall,
        "server_cpu": (time.process_time() - cpu_ready) / wall,
    }
    await server.stop()
    for proc in procs:
        await proc.wait()
    return result


KINDS = {"plain": PlainServer, "iot": IotServer}


def run_isolated(kind: str, tags: int, clients: int, seconds: float, warmup: float
                 ) -> dict[str, Any]:
    """One scenario in a fresh process: no GC state or caches carried between servers."""
    out = subprocess.run(
        [sys.executable, __file__, "--scenario", kind, str(tags), str(clients), str(seconds),
         str(warmup)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines else {}
    if not result.get("rates"):
        print(f"{kind} {tags} tags {clients} clients failed: {out.stderr.strip()[-300:]}")
        return {"rates": [0.0] * clients}
    return dict(result)


def main_table(args: argparse.Namespace) -> None:
    rows = []
    for tags in args.tags:
        for clients in args.clients:
            res = {KINDS[k].name: run_isolated(k, tags, clients, args.seconds, args.warmup)
                   for k in ("plain", "iot")}
            rows.append((tags, clients, res))
    print()
    print(f"publishing interval {PUBLISH_MS} ms, queue size {QUEUE}, window {args.seconds} s")
    print(f"{'tags':>6} {'clients':>7} | {'asyncua notif/s/client':>23} | "
          f"{'iotserver notif/s/client':>25} | {'ratio':>5} | iotserver changes/s | "
          "server CPU asyncua/iotserver")
    for tags, clients, res in rows:
        plain = res["plain asyncua"]["rates"]
        ours = res["iotserver"]["rates"]
        p = sum(plain) / len(plain)
        o = sum(ours) / len(ours)
        ratio = o / p if p else float("inf")
        print(f"{tags:>6} {clients:>7} | {p:>23,.0f} | {o:>25,.0f} | {ratio:>5.1f} | "
              f"{res['iotserver'].get('changes', 0):>19,.0f} | "
              f"{res['plain asyncua'].get('server_cpu', 0):.0%} / "
              f"{res['iotserver'].get('server_cpu', 0):.0%}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        url, ns_uri, tags, clients, seconds, warmup = sys.argv[2:8]
        asyncio.run(_client_main(url, ns_uri, int(tags), int(clients), float(seconds),
                                 float(warmup)))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--scenario":
        kind, tags, clients, seconds, warmup = sys.argv[2:7]
        serve(KINDS[kind], int(tags), int(clients), float(seconds), float(warmup))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tags", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true",
                        help="10,000 tags only, 3 s windows (1 and 2 clients)")
    args = parser.parse_args()
    if args.quick:
        args.tags, args.seconds, args.warmup = [10000], 3.0, 1.0
    main_table(args)


def serve(kind: type, tags: int, clients: int, seconds: float, warmup: float) -> None:
    """Run one scenario on the Twisted asyncio reactor; print its result as JSON."""
    import logging

    logging.basicConfig(level=logging.ERROR)
    from twisted.internet import asyncioreactor

    asyncioreactor.install()
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    result: dict[str, Any] = {}

    async def go() -> None:
        result.update(await scenario(kind, tags, clients, seconds, warmup))

    def run() -> None:
        d = Deferred.fromFuture(asyncio.ensure_future(go()))
        d.addErrback(lambda f: f.printTraceback())
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
