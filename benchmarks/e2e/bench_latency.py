"""Latency, end to end: a PLC register change to OPC UA and MQTT, and writes back to the PLC.

Setup (all on loopback, free ports):

* the server in its own process (``server_child.py``: ``app.build`` on the asyncio reactor, as
  twistd runs it) with the OPC UA server (policy None, user login), the MQTT broker and tag
  bridge, and two polled devices:

  - a background PLC (``iotserver sim-plc`` process, ``--bg-tags`` registers changing every
    50 ms) polled every 100 ms: 10,000 tags/s by default, every value a change, all of it
    published to OPC UA and MQTT (retained, persisted);
  - the probe PLC (a SimPLC in this process, nothing ticking) polled every ``--poll`` seconds:
    ``Probe/Seq`` (holding 100, read) and ``Probe/Setpoint`` (holding 200, read-write);

* clients in this process (one asyncio loop, the Twisted asyncio reactor): an asyncua client
  subscribed to ``Probe/Seq`` (publishing interval 10 ms, the server's minimum) and a raw-socket
  MQTT 3.1.1 client subscribed to ``iotserver/tags/Probe/Seq`` and the ``/set/result`` topic.

Measured (CLOCK_MONOTONIC in this one process):

* change latency: the register is set to a new sequence number at t0 (at a random phase of the
  poll cycle); the OPC UA notification and the MQTT message carrying that number arrive at t1:
  t1 - t0 ("from the change", bounded below by the wait for the next poll: on average half
  the poll interval) and t1 - t_read, where t_read is when the PLC answered the read that
  carried the new value ("from the poll": the server's own share);
* write latency: an OPC UA Write (``Node.write_value``) and an MQTT QoS 1 publish on
  ``.../Probe/Setpoint/set`` at t0; the PLC's register holds the value at t_plc (the SimPLC's
  write hook): t_plc - t0; and the client's answer (Write response, ``{"ok":true}`` on
  ``/set/result``): the round trip.

Peers in the same run (no load on them):

* Modbus: a pymodbus ``AsyncModbusTcpClient`` writing the probe PLC directly (what the poller
  does for a write, without the server);
* OPC UA: a plain asyncua server in its own process: Write round trip of the same client, and a
  value change (``write_attribute_value`` on a line sent to its stdin) to the notification;
* MQTT: one publish -> subscriber hop (QoS 0, own subscription) through our broker and through
  mosquitto (when installed), same raw client.

    python benchmarks/e2e/bench_latency.py [--quick] [--samples 200] [--poll 0.1]
        [--bg-tags 1000] [--bg-poll 0.1]

Target (the project's): write path p99 < 20 ms with 10k tags/s of background polling.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

SEQ_REG, SET_REG = 100, 200

PLAIN_SERVER = r"""
import asyncio, sys
from asyncua import Server, ua

async def main(port):
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/plain")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    idx = await server.register_namespace("urn:bench:plain")
    folder = await server.nodes.objects.add_folder(ua.NodeId("Peer", idx), "Peer")
    var = await folder.add_variable(ua.NodeId("Peer/X", idx), "X",
                                    ua.Variant(0, ua.VariantType.UInt16))
    await var.set_writable()
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def on_line():
        line = sys.stdin.readline()
        if not line:
            done.set_result(None)
            return
        v = int(line.split()[1])
        r = server.write_attribute_value(var.nodeid,
                                         ua.DataValue(ua.Variant(v, ua.VariantType.UInt16)))
        if asyncio.iscoroutine(r):
            asyncio.ensure_future(r)

    async with server:
        loop.add_reader(sys.stdin.fileno(), on_line)
        print("READY", flush=True)
        await done

asyncio.run(main(int(sys.argv[1])))
"""


def make_config(data: Path, opcua_port: int, mqtt_port: int, probe_port: int, bg_port: int,
                bg_tags: int, bg_poll: float, poll: float) -> str:
    text = common.base_config(data, opcua_port=opcua_port, mqtt_port=mqtt_port,
                              extra_mqtt=f'[[mqtt.acl]]\nuser = "{common.USER}"\n'
                                         'topic = "bench/#"\naccess = "readwrite"\n')
    text += f"""
[[modbus.devices]]
name = "probe"
endpoint = "127.0.0.1:{probe_port}"
interval = {poll}
timeout = 1
backoff = {{ initial = 0.1, max = 0.5 }}

[[modbus.devices.tags]]
path = "Probe/Seq"
table = "holding"
address = {SEQ_REG}
type = "uint16"

[[modbus.devices.tags]]
path = "Probe/Setpoint"
table = "holding"
address = {SET_REG}
type = "uint16"
access = "readwrite"
range = [0, 65535]

[[modbus.devices]]
name = "bg"
endpoint = "127.0.0.1:{bg_port}"
interval = {bg_poll}
timeout = 2
"""
    for a in range(bg_tags):
        text += (f'[[modbus.devices.tags]]\npath = "Bg/G{a // 100:03d}/R{a:05d}"\n'
                 f'table = "holding"\naddress = {a}\ntype = "uint16"\n')
    return text


# --------------------------------------------------------------------------- asyncio MQTT client


class MqttClient(asyncio.Protocol):
    """Minimal MQTT 3.1.1 client on the running loop; ``on_message(topic, payload, t_ns)``."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: Any = None
        self.waiters: dict[int, asyncio.Future[bytes]] = {}  # first byte >> 4 -> future
        self.on_message: Any = lambda topic, payload, t: None
        self.pid = 0

    @classmethod
    async def connect(cls, port: int, client_id: str, user: str | None,
                      password: str | None) -> MqttClient:
        from iotserver.mqtt.codec import encode
        from iotserver.mqtt.packets import MQTT_3_1_1, Connect

        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(cls, "127.0.0.1", port)
        sock = proto.transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        body = await proto.request(encode(Connect(
            client_id=client_id, keepalive=0, username=user,
            password=password.encode() if password else None), MQTT_3_1_1), 2)
        if body[1] != 0:
            raise ConnectionError(f"CONNACK {body!r}")
        return proto

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        t = time.monotonic_ns()
        self.buf += data
        pos = 0
        while True:
            pkt = common.split_packet(self.buf, pos)
            if pkt is None:
                break
            first, start, end = pkt
            kind = first >> 4
            if kind == 3:
                topic, payload = common.publish_topic_payload(self.buf, first, start, end)
                if first & 0x06:
                    self.transport.write(b"\x40\x02" + bytes(self.buf[start + 2 + (
                        (self.buf[start] << 8) | self.buf[start + 1]):][:2]))
                self.on_message(topic.decode(), payload, t)
            else:
                fut = self.waiters.pop(kind, None)
                if fut is not None and not fut.done():
                    fut.set_result(bytes(self.buf[start:end]))
            pos = end
        del self.buf[:pos]

    async def request(self, data: bytes, reply_kind: int) -> bytes:
        fut = asyncio.get_running_loop().create_future()
        self.waiters[reply_kind] = fut
        self.transport.write(data)
        return await asyncio.wait_for(fut, 10)

    async def subscribe(self, topic_filter: str, qos: int = 0) -> None:
        from iotserver.mqtt.codec import encode
        from iotserver.mqtt.packets import MQTT_3_1_1, Subscribe, SubscriptionOptions

        self.pid += 1
        body = await self.request(encode(Subscribe(self.pid, (
            (topic_filter, SubscriptionOptions(qos=qos)),)), MQTT_3_1_1), 9)
        if body[-1] & 0x80:
            raise ConnectionError(f"SUBACK refused for {topic_filter}")

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        from iotserver.mqtt.codec import encode_publish

        pid = None
        if qos:
            self.pid = self.pid % 65535 + 1
            pid = self.pid
        self.transport.write(encode_publish(topic, payload, qos=qos, packet_id=pid))

    def close(self) -> None:
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.write(b"\xe0\x00")
            self.transport.close()


# --------------------------------------------------------------------------- measurements


class Waiter:
    """Futures keyed by (what, value), resolved with the arrival time."""

    def __init__(self) -> None:
        self.futs: dict[tuple[str, Any], asyncio.Future[int]] = {}

    def expect(self, what: str, value: Any) -> asyncio.Future[int]:
        fut = asyncio.get_running_loop().create_future()
        self.futs[(what, value)] = fut
        return fut

    def arrived(self, what: str, value: Any, t: int) -> None:
        fut = self.futs.pop((what, value), None)
        if fut is not None and not fut.done():
            fut.set_result(t)


async def measure(args: argparse.Namespace, env: dict[str, Any]) -> dict[str, Any]:
    from asyncua import Client, ua
    from pymodbus.client import AsyncModbusTcpClient

    from iotserver.modbus.codec import ReadRegisters, Table, parse_request

    res: dict[str, Any] = {}
    from twisted.internet.defer import Deferred

    loop = asyncio.get_running_loop()
    plc = env["plc"]
    await Deferred.fromCoroutine(plc.start()).asFuture(loop)
    t_begin = time.monotonic()

    def progress(what: str) -> None:
        print(f"  [{time.monotonic() - t_begin:5.1f} s] {what}", flush=True)

    waiter = Waiter()

    # the probe PLC notes when it answers a read covering the sequence register, and writes
    reads: list[int] = []
    writes: dict[int, int] = {}
    orig_answer = plc.answer

    def answer(tid: int, unit: int, pdu: bytes) -> bytes | None:
        with contextlib.suppress(Exception):
            req = parse_request(pdu)
            if isinstance(req, ReadRegisters) and req.table is Table.HOLDING_REGISTERS \
                    and req.address <= SEQ_REG < req.address + req.count:
                reads.append(time.monotonic_ns())
        return orig_answer(tid, unit, pdu)

    plc.answer = answer

    def on_write(table: Any, address: int, count: int) -> None:
        if address == SET_REG:
            writes[int(plc.holding[SET_REG])] = time.monotonic_ns()

    plc.on_write = on_write

    # ---- clients
    url = f"opc.tcp://127.0.0.1:{env['opcua_port']}/iotserver"
    ua_client = Client(url, timeout=30)
    ua_client.set_user(common.USER)
    ua_client.set_password(common.PASSWORD)
    await ua_client.connect()
    ns = await ua_client.get_namespace_index(common.NS_URI)
    seq_node = ua_client.get_node(ua.NodeId("Probe/Seq", ns))
    set_node = ua_client.get_node(ua.NodeId("Probe/Setpoint", ns))

    class Handler:
        def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
            waiter.arrived("opcua", val, time.monotonic_ns())

    sub = await ua_client.create_subscription(10, Handler())
    await sub.subscribe_data_change(seq_node, queuesize=10, sampling_interval=0)

    mq = await MqttClient.connect(env["mqtt_port"], "latency", common.USER, common.PASSWORD)

    def on_message(topic: str, payload: bytes, t: int) -> None:
        if topic == "iotserver/tags/Probe/Seq":
            waiter.arrived("mqtt", json.loads(payload)["v"], t)
        elif topic.endswith("/set/result"):
            waiter.arrived("result", payload, t)
        elif topic == "bench/hop":
            waiter.arrived("hop", payload, t)

    mq.on_message = on_message
    await mq.subscribe("iotserver/tags/Probe/Seq")
    await mq.subscribe("iotserver/tags/Probe/Setpoint/set/result", 1)
    await mq.subscribe("bench/hop")
    # wait for the probe to be polled Good
    deadline = time.monotonic() + 20
    while True:
        dv = await seq_node.read_data_value(raise_on_bad_status=False)
        if dv.StatusCode.is_good():
            break
        if time.monotonic() > deadline:
            raise RuntimeError("probe PLC never polled Good")
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    progress("clients connected, probe Good")

    server = env["server"]
    st = common.ProcStat(server.pid)
    s0 = server.stats()
    cpu0, wall0 = st.cpu(), time.monotonic()

    # ---- change latency
    n = args.samples
    ch_opc, ch_mqtt, ch_opc_poll, ch_mqtt_poll = [], [], [], []
    missed = 0
    for i in range(n):
        value = 1 + (i % 60000)
        await asyncio.sleep(random.uniform(0, args.poll))
        f_opc, f_mqtt = waiter.expect("opcua", value), waiter.expect("mqtt", value)
        nreads = len(reads)
        t0 = time.monotonic_ns()
        plc.holding[SEQ_REG] = value
        try:
            t_opc, t_mqtt = await asyncio.wait_for(asyncio.gather(f_opc, f_mqtt), 5)
        except TimeoutError:
            missed += 1
            continue
        t_read = next((t for t in reads[nreads:] if t >= t0), None)
        ch_opc.append((t_opc - t0) / 1e6)
        ch_mqtt.append((t_mqtt - t0) / 1e6)
        if t_read is not None:
            ch_opc_poll.append((t_opc - t_read) / 1e6)
            ch_mqtt_poll.append((t_mqtt - t_read) / 1e6)
    progress(f"change latency: {len(ch_opc)} samples, {missed} missed")
    res["change"] = dict(opc=ch_opc, mqtt=ch_mqtt, opc_poll=ch_opc_poll, mqtt_poll=ch_mqtt_poll,
                         missed=missed)

    # ---- writes through OPC UA
    w_opc_plc, w_opc_rtt, w_mqtt_plc, w_mqtt_rtt = [], [], [], []
    bad = []
    for i in range(n):
        value = 1000 + i
        await asyncio.sleep(random.uniform(0, args.poll))
        t0 = time.monotonic_ns()
        try:
            await set_node.write_value(ua.DataValue(ua.Variant(value, ua.VariantType.UInt16)))
        except Exception as exc:
            bad.append(f"opcua write: {exc}")
            continue
        t1 = time.monotonic_ns()
        w_opc_rtt.append((t1 - t0) / 1e6)
        if value in writes:
            w_opc_plc.append((writes[value] - t0) / 1e6)
    progress(f"OPC UA writes: {len(w_opc_rtt)} done")
    # ---- writes through MQTT
    for i in range(n):
        value = 20000 + i
        await asyncio.sleep(random.uniform(0, args.poll))
        fut = waiter.expect("result", b'{"ok":true}')
        t0 = time.monotonic_ns()
        mq.publish("iotserver/tags/Probe/Setpoint/set", str(value).encode(), qos=1)
        try:
            t1 = await asyncio.wait_for(fut, 5)
        except TimeoutError:
            bad.append("mqtt write: no result")
            continue
        w_mqtt_rtt.append((t1 - t0) / 1e6)
        if value in writes:
            w_mqtt_plc.append((writes[value] - t0) / 1e6)
    progress(f"MQTT writes: {len(w_mqtt_rtt)} done")
    res["write"] = dict(opc_plc=w_opc_plc, opc_rtt=w_opc_rtt, mqtt_plc=w_mqtt_plc,
                        mqtt_rtt=w_mqtt_rtt, errors=bad)
    # ---- MQTT hop through our broker (under the same load)
    res["hop_ours"] = await mqtt_hop(mq, waiter, n)
    progress("MQTT hops done")
    cpu1, wall1 = st.cpu(), time.monotonic()
    s1 = server.stats()
    values = {k: s1["modbus"][k]["values"] - s0["modbus"][k]["values"] for k in s1["modbus"]}
    res["server"] = dict(cpu=(cpu1 - cpu0) / (wall1 - wall0),
                         bg_values_s=values.get("bg", 0) / (wall1 - wall0),
                         rss=st.rss())
    mq.close()
    await ua_client.disconnect()

    # ---- peers
    peer: dict[str, Any] = {}
    mb = AsyncModbusTcpClient("127.0.0.1", port=plc.port, timeout=2, retries=0)
    await mb.connect()
    mb_plc, mb_rtt = [], []
    for i in range(n):
        value = 40000 + i
        t0 = time.monotonic_ns()
        rr = await mb.write_register(SET_REG, value, device_id=1)
        t1 = time.monotonic_ns()
        if not rr.isError():
            mb_rtt.append((t1 - t0) / 1e6)
            if value in writes:
                mb_plc.append((writes[value] - t0) / 1e6)
    mb.close()
    peer["modbus"] = dict(plc=mb_plc, rtt=mb_rtt)

    progress("peer pymodbus done")
    peer["opcua"] = await plain_asyncua(env, n)
    progress("peer asyncua done")
    if env.get("mosquitto_port"):
        mo = await MqttClient.connect(env["mosquitto_port"], "latency-mosq", None, None)
        mwait = Waiter()
        mo.on_message = lambda topic, payload, t: mwait.arrived("hop", payload, t)
        await mo.subscribe("bench/hop")
        peer["hop_mosquitto"] = await mqtt_hop(mo, mwait, n)
        mo.close()
    res["peer"] = peer
    await Deferred.fromCoroutine(plc.stop()).asFuture(loop)
    return res


async def mqtt_hop(client: MqttClient, waiter: Waiter, n: int) -> list[float]:
    out = []
    for i in range(n):
        payload = f"hop-{i}".encode()
        fut = waiter.expect("hop", payload)
        t0 = time.monotonic_ns()
        client.publish("bench/hop", payload)
        with contextlib.suppress(asyncio.TimeoutError):
            out.append((await asyncio.wait_for(fut, 5) - t0) / 1e6)
        await asyncio.sleep(0.002)
    return out


async def plain_asyncua(env: dict[str, Any], n: int) -> dict[str, Any]:
    from asyncua import Client, ua

    port = common.free_port()
    proc = env["procs"].popen([sys.executable, "-c", PLAIN_SERVER, str(port)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, proc.stdout.readline)
    if "READY" not in line:
        return {}
    client = Client(f"opc.tcp://127.0.0.1:{port}/plain", timeout=30)
    await client.connect()
    waiter = Waiter()
    try:
        ns = await client.get_namespace_index("urn:bench:plain")
        node = client.get_node(ua.NodeId("Peer/X", ns))

        class Handler:
            def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
                waiter.arrived("opcua", val, time.monotonic_ns())

        sub = await client.create_subscription(10, Handler())
        await sub.subscribe_data_change(node, queuesize=10, sampling_interval=0)
        await asyncio.sleep(0.3)
        rtt, note = [], []
        for i in range(n):
            t0 = time.monotonic_ns()
            await node.write_value(ua.DataValue(ua.Variant(30000 + i, ua.VariantType.UInt16)))
            rtt.append((time.monotonic_ns() - t0) / 1e6)
        await asyncio.sleep(0.3)
        for i in range(n):
            value = 50000 + i
            fut = waiter.expect("opcua", value)
            await asyncio.sleep(random.uniform(0, 0.01))
            t0 = time.monotonic_ns()
            proc.stdin.write(f"set {value}\n")
            proc.stdin.flush()
            with contextlib.suppress(asyncio.TimeoutError):
                note.append((await asyncio.wait_for(fut, 5) - t0) / 1e6)
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()
        proc.stdin.close()
    return {"rtt": rtt, "notify": note}


# --------------------------------------------------------------------------- main


def start_mosquitto(procs: common.Procs, tmp: Path) -> int | None:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto"
                                        if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        return None
    port = common.free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    procs.popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return port
        time.sleep(0.05)
    return None


def row(name: str, values: list[float], note: str = "") -> list[Any]:
    if not values:
        return [name, 0, "-", "-", "-", note]
    return [name, len(values), f"{common.pct(values, 50):.1f}", f"{common.pct(values, 99):.1f}",
            f"{max(values):.1f}", note]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="about 30 s: 50 samples per path")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--poll", type=float, default=0.1, help="probe poll interval, s")
    ap.add_argument("--bg-tags", type=int, default=1000)
    ap.add_argument("--bg-poll", type=float, default=0.1)
    args = ap.parse_args()
    if args.quick:
        args.samples = 50
    common.print_header("latency: PLC change -> OPC UA / MQTT, and OPC UA / MQTT write -> PLC")
    print(f"probe poll {args.poll * 1000:.0f} ms; background {args.bg_tags} tags every "
          f"{args.bg_poll * 1000:.0f} ms = {args.bg_tags / args.bg_poll:,.0f} tags/s; "
          f"{args.samples} samples per path\n", flush=True)

    from twisted.internet import asyncioreactor

    asyncioreactor.install()
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from iotserver.sim.plc import SimPLC

    procs = common.Procs()
    server = None
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            bg_port = common.start_sim_plcs(procs, 1, args.bg_tags, args.bg_poll / 2, tmp)[0]
            probe_port = common.free_port()
            plc = SimPLC(probe_port, registers=1, interval=0)
            data = tmp / "data"
            common.write_users(data)
            opcua_port, mqtt_port = common.free_port(), common.free_port()
            cfg = tmp / "server.toml"
            cfg.write_text(make_config(data, opcua_port, mqtt_port, probe_port, bg_port,
                                       args.bg_tags, args.bg_poll, args.poll))
            server = common.ServerProcess(cfg, tmp / "server.log")
            server.start()
            env = dict(plc=plc, server=server, opcua_port=opcua_port, mqtt_port=mqtt_port,
                       procs=procs, mosquitto_port=start_mosquitto(procs, tmp))

            def run() -> None:
                d = Deferred.fromFuture(asyncio.ensure_future(measure(args, env)))

                def done(r: Any) -> None:
                    result.update(r)

                def failed(f: Any) -> None:
                    result["error"] = f.getTraceback()

                d.addCallbacks(done, failed)
                d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

            reactor.callWhenRunning(run)  # type: ignore[attr-defined]
            reactor.run()  # type: ignore[attr-defined]
        finally:
            if server is not None:
                server.stop()
            procs.stop_all()
    if "error" in result:
        print(result["error"])
        raise SystemExit(1)
    ch, w, peer, srv = result["change"], result["write"], result["peer"], result["server"]
    p_ms = args.poll * 1000
    print(f"server under load: {srv['bg_values_s']:,.0f} background values/s polled, "
          f"server CPU {srv['cpu']:.2f} cores, RSS {srv['rss'] / 1e6:.0f} MB\n")
    headers = ["path", "n", "p50 ms", "p99 ms", "max ms", "note"]
    rows = [
        row("PLC change -> OPC UA notification", ch["opc"],
            f"poll {p_ms:.0f} ms: waiting for the poll adds U(0, {p_ms:.0f}) ms"),
        row("PLC change -> MQTT message", ch["mqtt"], ""),
        row("  poll reply -> OPC UA notification", ch["opc_poll"],
            "server share: from the PLC's answer to the read"),
        row("  poll reply -> MQTT message", ch["mqtt_poll"], ""),
        row("OPC UA Write -> PLC register", w["opc_plc"], "target p99 < 20 ms"),
        row("OPC UA Write round trip", w["opc_rtt"], "answered after the read-back"),
        row("MQTT /set -> PLC register", w["mqtt_plc"], "target p99 < 20 ms"),
        row("MQTT /set -> {\"ok\":true} on /set/result", w["mqtt_rtt"], ""),
        row("MQTT publish -> subscriber, our broker (loaded)", result["hop_ours"], ""),
        row("peer: pymodbus write -> PLC register", peer["modbus"]["plc"], "no server"),
        row("peer: pymodbus write round trip", peer["modbus"]["rtt"], ""),
        row("peer: plain asyncua Write round trip", peer.get("opcua", {}).get("rtt", []),
            "idle server"),
        row("peer: plain asyncua change -> notification", peer.get("opcua", {}).get("notify", []),
            "10 ms publishing interval"),
        row("peer: MQTT publish -> subscriber, mosquitto", peer.get("hop_mosquitto", []),
            "idle broker"),
    ]
    print(common.table(headers, rows))
    print()
    if ch["missed"] or w["errors"]:
        print(f"missed changes: {ch['missed']}; write errors: {w['errors'][:5]}")
    p99 = max(common.pct(w["opc_plc"], 99), common.pct(w["mqtt_plc"], 99))
    print(f"write path p99 (to the PLC register) {p99:.1f} ms at "
          f"{srv['bg_values_s']:,.0f} tags/s background: "
          f"{'MET' if p99 < 20 and srv['bg_values_s'] >= 9_500 else 'NOT MET'} (target < 20 ms)")
    print(f"change latency from the poll reply, p50: OPC UA {common.pct(ch['opc_poll'], 50):.1f} "
          f"ms, MQTT {common.pct(ch['mqtt_poll'], 50):.1f} ms; from the change it adds on "
          f"average half the poll interval ({p_ms / 2:.0f} ms)")


if __name__ == "__main__":
    main()
