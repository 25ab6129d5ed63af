"""Scale, end to end: 100,000 polled tags at 1 s and 10,000 tags at 100 ms through the server.

Setup (all on loopback, free ports), per scenario:

* simulated PLCs: ``iotserver sim-plc`` processes (our SimPLC), each with ``--registers`` holding
  registers that all change every tick (the PLC ticks at half the poll interval, so every poll
  reads new values and every polled value is a change);
* the server in its own process (``server_child.py``: ``app.build`` on the asyncio reactor, as
  twistd runs it), polling every register as a uint16 tag (``P<plc>/G<nnn>/R<nnnnn>``, 100
  tags per folder; the poller's planner merges them into 125-register reads), with the OPC UA
  server (policy None, user login) and the MQTT broker and tag bridge on (defaults: retained
  tag messages, persistence on; the tag store answers for the retained tag topics);
* one OPC UA subscriber process (asyncua client, 100 ms publishing interval, one monitored item
  per tag for ``--opcua-items`` tags, default 10,000: creating 100,000 monitored items through
  asyncua takes minutes, so the rate is measured on a subset and the per-item cost given);
* one MQTT subscriber process (raw socket, MQTT 3.1.1, QoS 0, ``iotserver/tags/#``) counting
  messages.

Measured over a window after everything is connected: the server process's CPU (utime + stime
from /proc/<pid>/stat) per wall second (1.00 = one core), its RSS at the end and peak (VmHWM),
values ingested per second (the poller devices' value counters), changes delivered per second
to the OPC UA subscriber (notifications it received) and to the MQTT subscriber (messages it
received), and the startup time. The CPU of the PLC and subscriber processes is shown too
(they share the machine's cores with the server).

No peer is measured: no comparable open-source gateway (Modbus poller + OPC UA server + MQTT
broker in one) runs on this machine. Context (published): Neuron, commercial edition on 4 cores,
100k Modbus points/s at 30 % CPU and 497 MB.

    python benchmarks/e2e/bench_scale.py [--quick] [--seconds 20] [--opcua-items 10000]

Targets (the project's): 100k values/s ingested using < 1 core and < 500 MB RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


@dataclass
class Scenario:
    name: str
    plcs: int
    registers: int
    poll: float
    opcua_items: int
    north: str = "all"  # ingest (poller only) | mqtt | opcua | all

    @property
    def opcua(self) -> bool:
        return self.north in ("opcua", "all")

    @property
    def mqtt(self) -> bool:
        return self.north in ("mqtt", "all")

    @property
    def label(self) -> str:
        what = {"ingest": "poller only", "mqtt": "+ MQTT subscriber",
                "opcua": "+ OPC UA subscriber", "all": "+ OPC UA and MQTT subscribers"}
        return f"{self.name}, {what[self.north]}"

    @property
    def tags(self) -> int:
        return self.plcs * self.registers


def tag_path(plc: int, a: int) -> str:
    return f"P{plc}/G{a // 100:03d}/R{a:05d}"


def make_config(data_dir: Path, ports: list[int], sc: Scenario, opcua_port: int | None,
                mqtt_port: int | None) -> str:
    parts = [common.base_config(data_dir, opcua_port=opcua_port, mqtt_port=mqtt_port,
                                extra_mqtt=os.environ.get("BENCH_EXTRA_MQTT", ""))]
    for i, port in enumerate(ports):
        parts.append(f'\n[[modbus.devices]]\nname = "plc{i}"\nendpoint = "127.0.0.1:{port}"\n'
                     f'interval = {sc.poll}\ntimeout = 2\n')
        for a in range(sc.registers):
            parts.append(f'[[modbus.devices.tags]]\npath = "{tag_path(i, a)}"\n'
                         f'table = "holding"\naddress = {a}\ntype = "uint16"\n')
    return "".join(parts)


# --------------------------------------------------------------------------- subscribers


def mqtt_subscriber(port: int, counter: Any, ready: Any, stop: Any, results: Any) -> None:
    """Counts PUBLISH packets on iotserver/tags/# (QoS 0); publishes its count in ``counter``."""
    out: dict[str, Any] = {}
    try:
        sock = common.mqtt_connect(port, "scale-sub")
        buf = common.mqtt_subscribe(sock, "iotserver/tags/#", 0)
        sock.setblocking(False)
        ready.set()
        count = 0
        split = common.split_packet
        while not stop.is_set():
            r, _, _ = select.select([sock], [], [], 0.2)
            if not r:
                continue
            while True:
                try:
                    data = sock.recv(1 << 20)
                except (BlockingIOError, InterruptedError):
                    break
                if not data:
                    raise ConnectionError("broker closed the connection")
                buf += data
            pos = 0
            while True:
                pkt = split(buf, pos)
                if pkt is None:
                    break
                if pkt[0] & 0xF0 == 0x30:
                    count += 1
                pos = pkt[2]
            del buf[:pos]
            counter.value = count
        sock.close()
        out["received"] = count
    except Exception as exc:
        out["error"] = f"mqtt subscriber: {type(exc).__name__}: {exc}"
        ready.set()
    out["cpu"] = _cpu()
    results.put(("mqtt", out))


def opcua_subscriber(url: str, paths: list[str], publish_ms: float, counter: Any, ready: Any,
                     stop: Any, results: Any) -> None:
    """One asyncua client, one subscription, a monitored item per path; counts notifications."""
    out: dict[str, Any] = {}

    async def main() -> None:
        from asyncua import Client, ua

        c = Client(url, timeout=120)
        c.set_user(common.USER)
        c.set_password(common.PASSWORD)
        await c.connect()
        try:
            ns = await c.get_namespace_index(common.NS_URI)

            class Handler:
                def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
                    pass

            sub = await c.create_subscription(publish_ms, Handler())
            t0 = time.monotonic()
            nodes = [c.get_node(ua.NodeId(p, ns)) for p in paths]
            for j in range(0, len(nodes), 1000):
                await sub.subscribe_data_change(nodes[j:j + 1000], queuesize=1,
                                                sampling_interval=0)  # every change
            out["create_s"] = time.monotonic() - t0
            count = [0]

            async def publish_callback(result: ua.PublishResult) -> None:
                for notif in result.NotificationMessage.NotificationData or []:
                    items = getattr(notif, "MonitoredItems", None)
                    if items:
                        count[0] += len(items)
                counter.value = count[0]

            # count only: skip asyncua's per-item dispatch so the client is not the limit
            c.uaclient._subscription_callbacks[sub.subscription_id] = publish_callback
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.1)
            out["received"] = count[0]
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.disconnect(), 10)

    try:
        asyncio.run(main())
    except Exception as exc:
        out["error"] = f"opcua subscriber: {type(exc).__name__}: {exc}"
        ready.set()
    out["cpu"] = _cpu()
    results.put(("opcua", out))


def _cpu() -> float:
    import os

    t = os.times()
    return t.user + t.system


# --------------------------------------------------------------------------- one scenario


def run(sc: Scenario, seconds: float, tmp: Path, pyspy: str = "") -> dict[str, Any]:
    procs = common.Procs()
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    stop = ctx.Event()
    workers: list[Any] = []
    server: common.ServerProcess | None = None
    res: dict[str, Any] = {"scenario": sc}
    try:
        work = tmp / f"{sc.name}-{sc.north}".replace(" ", "_").replace("@", "at")
        work.mkdir()
        ports = common.start_sim_plcs(procs, sc.plcs, sc.registers, sc.poll / 2, work)
        data = work / "data"
        common.write_users(data)
        opcua_port = common.free_port() if sc.opcua else None
        mqtt_port = common.free_port() if sc.mqtt else None
        cfg = work / "server.toml"
        cfg.write_text(make_config(data, ports, sc, opcua_port, mqtt_port))
        server = common.ServerProcess(cfg, work / "server.log")
        t_start = time.monotonic()
        ready_msg = server.start(timeout=300)
        res["startup_s"] = time.monotonic() - t_start
        res["rss_ready"] = common.ProcStat(server.pid).rss()

        mqtt_count, opc_count = ctx.Value("q", 0, lock=False), ctx.Value("q", 0, lock=False)
        mqtt_ready, opc_ready = ctx.Event(), ctx.Event()
        paths = [tag_path(i, a) for i in range(sc.plcs) for a in range(sc.registers)]
        step = max(1, len(paths) // sc.opcua_items)
        chosen = paths[::step][: sc.opcua_items]
        url = f"opc.tcp://127.0.0.1:{opcua_port}/iotserver"
        workers = []
        events = []
        if sc.mqtt:
            workers.append(ctx.Process(target=mqtt_subscriber, args=(
                mqtt_port, mqtt_count, mqtt_ready, stop, results), daemon=True))
            events.append(mqtt_ready)
        if sc.opcua:
            workers.append(ctx.Process(target=opcua_subscriber, args=(
                url, chosen, 100.0, opc_count, opc_ready, stop, results), daemon=True))
            events.append(opc_ready)
        for w in workers:
            w.start()
        t_sub = time.monotonic()
        for ev in events:
            if not ev.wait(600):
                raise RuntimeError("subscriber not ready")
        res["subscribe_s"] = time.monotonic() - t_sub
        time.sleep(max(2.0, 2 * sc.poll))  # settle: retained burst delivered, polls in phase
        st = common.ProcStat(server.pid)
        plc_pids = [p.pid for p in procs.procs]
        s0 = server.stats()
        cpu0, wall0 = st.cpu(), time.monotonic()
        m0, o0 = mqtt_count.value, opc_count.value
        side0 = common.children_cpu(plc_pids + [w.pid for w in workers])
        spy = None
        if pyspy:  # sample the server's stacks over the window (py-spy, raw folded stacks)
            spy = procs.popen(["py-spy", "record", "--pid", str(server.pid), "--duration",
                               str(int(seconds)), "--rate", "200", "--format", "raw", "--output",
                               f"{pyspy}.{sc.name.split()[0]}-{sc.north}.txt", "--nonblocking"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(seconds)
        if spy is not None:
            spy.wait(timeout=60)
        s1 = server.stats()
        cpu1, wall1 = st.cpu(), time.monotonic()
        m1, o1 = mqtt_count.value, opc_count.value
        side1 = common.children_cpu(plc_pids + [w.pid for w in workers])
        mem = st.mem()
        dt = wall1 - wall0
        values = (sum(d["values"] for d in s1["modbus"].values())
                  - sum(d["values"] for d in s0["modbus"].values()))
        timeouts = (sum(d["timeouts"] for d in s1["modbus"].values())
                    - sum(d["timeouts"] for d in s0["modbus"].values()))
        polls = (sum(d["polls"] for d in s1["modbus"].values())
                 - sum(d["polls"] for d in s0["modbus"].values()))
        requests = (sum(d["requests"] for d in s1["modbus"].values())
                    - sum(d["requests"] for d in s0["modbus"].values()))
        rtt = (sum(d["rtt_sum"] for d in s1["modbus"].values())
               - sum(d["rtt_sum"] for d in s0["modbus"].values()))

        def delivered(stats: dict[str, Any], name: str) -> tuple[int, int]:
            for s in stats["subscriptions"]:
                if s["name"] == name:
                    return s["delivered"], s["conflated"]
            return 0, 0

        od = [a - b for a, b in zip(delivered(s1, "opcua"), delivered(s0, "opcua"), strict=True)]
        md = [a - b for a, b in zip(delivered(s1, "mqtt-bridge"), delivered(s0, "mqtt-bridge"),
                                    strict=True)]
        res.update(
            cpu=(cpu1 - cpu0) / dt,
            rss=mem.get("VmRSS", 0),
            hwm=mem.get("VmHWM", 0),
            values_s=values / dt,
            expected_s=sc.tags / sc.poll,
            polls_s=polls / dt,
            rtt_ms=rtt / requests * 1000 if requests else 0.0,
            timeouts=timeouts,
            opc_rx_s=(o1 - o0) / dt,
            opc_items=len(chosen) if sc.opcua else 0,
            mqtt_rx_s=(m1 - m0) / dt,
            opc_store_s=od[0] / dt, opc_conflated_s=od[1] / dt,
            mqtt_store_s=md[0] / dt, mqtt_conflated_s=md[1] / dt,
            side_cpu=(side1 - side0) / dt,
            ready_startup_s=ready_msg.get("startup_s", 0.0),
            dropped={k: v - s0.get("broker", {}).get("dropped", {}).get(k, 0)
                     for k, v in s1.get("broker", {}).get("dropped", {}).items()},
            dropped_total=s1.get("broker", {}).get("dropped", {}),
            gc_share=[(a - b) / dt for a, b in zip(s1["gc_seconds"], s0["gc_seconds"],
                                                    strict=True)],
            gc_count=[a - b for a, b in zip(s1["gc"], s0["gc"], strict=True)],
        )
        stop.set()
        for _ in workers:
            with contextlib.suppress(Exception):
                kind, out = results.get(timeout=30)
                res[kind] = out
    finally:
        stop.set()
        for w in workers:
            w.join(15)
            if w.is_alive():
                w.terminate()
                w.join(5)
        if server is not None:
            server.stop()
        procs.stop_all()
    return res


HEADERS = ["scenario", "startup s", "server CPU (cores)", "RSS / peak MB", "values ingested/s",
           "OPC UA notifications/s (items subscribed)", "MQTT messages/s",
           "PLCs + subscribers CPU (cores)", "100k/s, < 1 core, < 500 MB"]


def fmt(r: dict[str, Any]) -> list[Any]:
    sc: Scenario = r["scenario"]
    per_item = r["opc_rx_s"] / max(r["opc_items"], 1)
    met = r["values_s"] >= 0.97 * r["expected_s"] and r["cpu"] < 1.0 and r["rss"] < 500e6
    return [
        sc.label,
        f"{r['startup_s']:.0f}",
        f"{r['cpu']:.2f}",
        f"{r['rss'] / 1e6:.0f} / {r['hwm'] / 1e6:.0f}",
        f"{r['values_s']:,.0f} (of {r['expected_s']:,.0f})",
        f"{r['opc_rx_s']:,.0f} ({r['opc_items']:,}: {per_item:.2f}/item/s)" if sc.opcua else "-",
        f"{r['mqtt_rx_s']:,.0f}" if sc.mqtt else "-",
        f"{r['side_cpu']:.2f}",
        ("yes" if met else "NO") if r["expected_s"] >= 99_000 else "",
    ]


SCENARIOS = {
    "100k": ("100k tags @ 1 s", 10, 10_000, 1.0),
    "20k": ("20k tags @ 1 s", 2, 10_000, 1.0),
    "10k": ("10k tags @ 100 ms", 1, 10_000, 0.1),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="about 45 s: 20,000 tags at 1 s and 10,000 at 100 ms, 6 s windows")
    ap.add_argument("--seconds", type=float, default=15.0, help="measured window per run")
    ap.add_argument("--opcua-items", type=int, default=10_000)
    ap.add_argument("--pyspy", metavar="PREFIX", default="",
                    help="record the server with py-spy over each window to PREFIX.<run>.txt "
                         "(folded stacks)")
    ap.add_argument("--runs", default="100k:ingest,100k:all,10k:ingest,10k:all",
                    help="comma-separated SCENARIO:NORTH, SCENARIO in 100k, 20k, 10k and NORTH "
                         "in ingest (poller only), mqtt, opcua, all")
    args = ap.parse_args()
    if args.quick:
        args.runs = "20k:all,10k:ingest,10k:all"
        args.seconds = min(args.seconds, 6.0)
    scenarios = []
    for item in args.runs.split(","):
        key, _, north = item.strip().partition(":")
        name, plcs, regs, poll = SCENARIOS[key]
        scenarios.append(Scenario(name, plcs, regs, poll, args.opcua_items, north or "all"))
    common.print_header("scale: polled tags through the server to one OPC UA and one MQTT "
                        "subscriber")
    rows = []
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmpdir:
        for sc in scenarios:
            r = run(sc, args.seconds, Path(tmpdir), args.pyspy)
            results.append(r)
            rows.append(fmt(r))
            print("| " + " | ".join(str(c) for c in rows[-1]) + " |", flush=True)
            for kind in ("opcua", "mqtt"):
                if "error" in r.get(kind, {}):
                    print("  ", r[kind]["error"])
    print()
    print(common.table(HEADERS, rows))
    print()
    for r in results:
        sc = r["scenario"]
        print(f"{sc.label}: {sc.plcs} sim-plc x {sc.registers} registers, poll {sc.poll} s; "
              f"ready after {r['ready_startup_s']:.1f} s (RSS {r['rss_ready'] / 1e6:.0f} MB); "
              f"{r['polls_s']:.1f} polls/s (of {sc.plcs / sc.poll:.0f}), "
              f"{r['timeouts']} timeouts, read round trip {r['rtt_ms']:.2f} ms on average; "
              f"garbage collector "
              f"{sum(r['gc_share']) * 100:.0f} % of a core (collections per generation "
              f"{r['gc_count']}, time share {[round(x * 100, 1) for x in r['gc_share']]} %)")
        if sc.opcua or sc.mqtt:
            print(f"  store -> OPC UA pump {r['opc_store_s']:,.0f}/s (conflated "
                  f"{r['opc_conflated_s']:,.0f}/s), store -> MQTT bridge "
                  f"{r['mqtt_store_s']:,.0f}/s (conflated {r['mqtt_conflated_s']:,.0f}/s); "
                  f"broker drops in the window {r['dropped'] or 'none'}, "
                  f"since start {r['dropped_total'] or 'none'}")
        opc = r.get("opcua", {})
        if "create_s" in opc:
            print(f"  OPC UA: {r['opc_items']:,} monitored items created in "
                  f"{opc['create_s']:.1f} s ({opc['create_s'] / r['opc_items'] * 1e3:.2f} ms "
                  f"per item, so about {opc['create_s'] / r['opc_items'] * 1e5:.0f} s for "
                  f"100,000); {r['opc_rx_s'] / max(r['opc_items'], 1):.2f} changes/item/s "
                  f"received, {1 / sc.poll:.0f}/item/s polled")


if __name__ == "__main__":
    main()
