"""One plant through all three protocols, with real clients.

A simulated Modbus PLC is polled by the server; an OPC UA client (asyncua), an MQTT client
(paho-mqtt) and a Modbus client (pymodbus) are connected at once. Changes, writes, refusals and
an outage must look the same through each of them.
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred

from iotserver import app, config
from iotserver.security.users import Role, User, hash_password, save_users
from iotserver.sim.plc import SimPLC
from iotserver.tags.model import Quality

pytestmark = pytest.mark.interop

ENGINEER = ("eng", "engineer-pw")
SETPOINT_REG = 1000  # PLC register behind PLC1/Setpoint (the upper range keeps written values)
LEVEL_REG = 1001  # a register the test changes in the PLC directly
SERVED_SETPOINT = 10  # where our Modbus server serves PLC1/Setpoint
SERVED_LEVEL = 11


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def aio(coro: Coroutine[Any, Any, Any]) -> Deferred[Any]:
    return Deferred.fromFuture(asyncio.ensure_future(coro))


def sleep(seconds: float) -> Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


async def eventually(check: Any, timeout: float = 5.0, what: str = "") -> Any:
    """Poll ``check()`` (truthy result wins) while the reactor runs."""
    deadline = reactor.seconds() + timeout
    while True:
        result = check()
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await sleep(0.02)


def plant_config(tmp: Path, plc_port: int, ports: dict[str, int]) -> config.Config:
    text = f"""
[server]
data_dir = "{tmp / 'data'}"

[simulator]
enabled = false

[modbus.server]
endpoints = ["tcp:{ports['modbus']}:interface=127.0.0.1"]
bad_quality = "exception"

[[modbus.server.map]]
path = "PLC1/Setpoint"
table = "holding"
address = {SERVED_SETPOINT}
type = "uint16"

[[modbus.server.map]]
path = "PLC1/Level"
table = "holding"
address = {SERVED_LEVEL}
type = "uint16"

[[modbus.devices]]
name = "plc1"
endpoint = "127.0.0.1:{plc_port}"
interval = 0.1
timeout = 0.3
backoff = {{ initial = 0.1, max = 0.3 }}

[[modbus.devices.tags]]
path = "PLC1/Setpoint"
table = "holding"
address = {SETPOINT_REG}
type = "uint16"
access = "readwrite"
range = [0, 1000]

[[modbus.devices.tags]]
path = "PLC1/Level"
table = "holding"
address = {LEVEL_REG}
type = "uint16"

[opcua]
endpoint = "opc.tcp://127.0.0.1:{ports['opcua']}/iotserver"
security_policies = ["None"]

[mqtt]
[[mqtt.listeners]]
endpoint = "tcp:{ports['mqtt']}:interface=127.0.0.1"
"""
    return config.parse(text, source="e2e.toml")


class Plant:
    """The running server, the PLC, and the three clients."""

    def __init__(self) -> None:
        self.root: Any = None
        self.core: Any = None
        self.plc: SimPLC | None = None
        self.opcua: Any = None
        self.ns = 0
        self.mqtt: Any = None
        self.mqtt_msgs: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.modbus: Any = None
        self.ports: dict[str, int] = {}

    def plc_reg(self, address: int) -> int:
        assert self.plc is not None
        return int(self.plc.holding[address])

    def mqtt_latest(self, topic: str) -> dict[str, Any] | None:
        """Drain received messages; return the newest JSON payload on ``topic``."""
        latest = None
        while True:
            try:
                t, payload = self.mqtt_msgs.get_nowait()
            except queue.Empty:
                break
            self.seen[t] = payload
        if topic in self.seen:
            latest = json.loads(self.seen[topic])
        return latest

    seen: dict[str, bytes] = {}


async def start_plant(tmp: Path) -> Plant:
    p = Plant()
    p.seen = {}
    p.plc = SimPLC(0, registers=100, interval=0.05)
    plc_port = await p.plc.start()
    p.plc.holding[SETPOINT_REG] = 500
    p.plc.holding[LEVEL_REG] = 7
    p.ports = {"modbus": free_port(), "opcua": free_port(), "mqtt": free_port()}
    cfg = plant_config(tmp, plc_port, p.ports)
    cfg.server.data_dir.mkdir(parents=True, exist_ok=True)
    save_users(cfg.server.users_file,
               [User(ENGINEER[0], Role.ENGINEER, hash_password(ENGINEER[1], n=2**10))])
    p.root, p.core = app.build(cfg, reactor)
    p.root.startService()
    for name in ("opcua", "mqtt", "modbus"):
        service = p.core.services[name]
        if getattr(service, "started", None) is not None:
            await service.started
        assert getattr(service, "failure", None) is None, f"{name} failed to start"
    await eventually(lambda: p.core.store.read("PLC1/Level").quality is Quality.GOOD,
                     what="first poll")
    return p


async def connect_clients(p: Plant) -> None:
    from asyncua import Client
    from paho.mqtt import client as paho
    from pymodbus.client import AsyncModbusTcpClient

    c = Client(f"opc.tcp://127.0.0.1:{p.ports['opcua']}/iotserver", timeout=10)
    c.set_user(ENGINEER[0])
    c.set_password(ENGINEER[1])
    await aio(c.connect())
    p.opcua = c
    p.ns = await aio(c.get_namespace_index(p.core.config.sections["opcua"].namespace))

    m = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="e2e-sub",
                    protocol=paho.MQTTv5)
    m.username_pw_set(*ENGINEER)
    m.on_message = lambda _c, _u, msg: p.mqtt_msgs.put((msg.topic, msg.payload))
    connected: queue.Queue[Any] = queue.Queue()
    m.on_connect = lambda _c, _u, _f, rc, _p: connected.put(rc)
    m.connect("127.0.0.1", p.ports["mqtt"])
    m.loop_start()
    p.mqtt = m
    rc = await aio(asyncio.get_running_loop().run_in_executor(None, connected.get, True, 10))
    assert not rc.is_failure, rc
    m.subscribe("iotserver/tags/PLC1/#", qos=1)

    mb = AsyncModbusTcpClient("127.0.0.1", port=p.ports["modbus"], timeout=2, retries=0)
    await aio(mb.connect())
    p.modbus = mb


async def stop_plant(p: Plant) -> None:
    if p.opcua is not None:
        await aio(p.opcua.disconnect())
    if p.mqtt is not None:
        p.mqtt.disconnect()
        p.mqtt.loop_stop()
        p.mqtt._reset_sockets()  # paho keeps a wake-up socketpair open until it is collected
    if p.modbus is not None:
        p.modbus.close()
    if p.root is not None:
        await p.root.stopService()
    if p.plc is not None:
        await p.plc.stop()
    await sleep(0.05)


async def opcua_value(p: Plant, path: str) -> Any:
    node = p.opcua.get_node(f"ns={p.ns};s={path}")
    return await aio(node.read_data_value(raise_on_bad_status=False))


async def modbus_read(p: Plant, address: int) -> Any:
    return await aio(p.modbus.read_holding_registers(address, count=1, device_id=1))


@pytest_twisted.ensureDeferred
async def test_plc_change_reaches_every_protocol_and_writes_reach_the_plc(tmp_path: Path) -> None:
    p = await start_plant(tmp_path)
    try:
        await connect_clients(p)
        from asyncua import ua

        # -- an OPC UA subscription sees a PLC register change --------------------------------
        changes: list[Any] = []

        class Handler:
            def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
                changes.append(val)

        sub = await aio(p.opcua.create_subscription(50, Handler()))
        await aio(sub.subscribe_data_change(p.opcua.get_node(f"ns={p.ns};s=PLC1/Level")))
        assert p.plc is not None
        p.plc.holding[LEVEL_REG] = 4321
        await eventually(lambda: 4321 in changes, what="OPC UA notification of 4321")
        await eventually(lambda: (p.mqtt_latest("iotserver/tags/PLC1/Level") or {}).get("v")
                         == 4321, what="MQTT message with 4321")
        msg = p.mqtt_latest("iotserver/tags/PLC1/Level")
        assert msg is not None and msg["q"] == "Good" and msg["t"].endswith("Z")
        rr = await modbus_read(p, SERVED_LEVEL)
        assert not rr.isError() and rr.registers == [4321]

        # -- a write from each protocol reaches the PLC and reports its result ---------------
        node = p.opcua.get_node(f"ns={p.ns};s=PLC1/Setpoint")
        await aio(node.write_value(ua.DataValue(ua.Variant(111, ua.VariantType.UInt16))))
        assert p.plc_reg(SETPOINT_REG) == 111

        result_topic = "iotserver/tags/PLC1/Setpoint/set/result"
        p.mqtt.subscribe(result_topic, qos=1)
        await sleep(0.1)
        p.mqtt.publish("iotserver/tags/PLC1/Setpoint/set", b"222", qos=1)
        await eventually(lambda: p.mqtt_latest(result_topic), what="MQTT write result")
        assert p.mqtt_latest(result_topic) == {"ok": True}
        assert p.plc_reg(SETPOINT_REG) == 222

        wr = await aio(p.modbus.write_register(SERVED_SETPOINT, 333, device_id=1))
        assert not wr.isError()
        assert p.plc_reg(SETPOINT_REG) == 333

        # -- a refused write is refused everywhere and changes nothing -----------------------
        with pytest.raises(ua.UaStatusCodeError) as info:
            await aio(node.write_value(ua.DataValue(ua.Variant(5000, ua.VariantType.UInt16))))
        assert info.value.code == Quality.BAD_OUT_OF_RANGE.value
        p.seen.pop(result_topic, None)
        p.mqtt.publish("iotserver/tags/PLC1/Setpoint/set", b"5000", qos=1)
        await eventually(lambda: p.mqtt_latest(result_topic), what="MQTT refusal")
        assert p.mqtt_latest(result_topic) == {"ok": False, "status": "BadOutOfRange"}
        wr = await aio(p.modbus.write_register(SERVED_SETPOINT, 5000, device_id=1))
        assert wr.isError() and wr.exception_code == 3
        await sleep(0.2)
        assert p.plc_reg(SETPOINT_REG) == 333
        assert (await opcua_value(p, "PLC1/Setpoint")).Value.Value == 333
    finally:
        await stop_plant(p)


@pytest_twisted.ensureDeferred
async def test_plc_outage_is_bad_everywhere_and_recovers(tmp_path: Path) -> None:
    p = await start_plant(tmp_path)
    try:
        await connect_clients(p)
        assert p.plc is not None
        await p.plc.stop()
        await eventually(lambda: p.core.store.read("PLC1/Level").quality.is_bad, timeout=3,
                         what="Bad quality after the PLC stopped")
        dv = await opcua_value(p, "PLC1/Level")
        assert dv.StatusCode.value in (Quality.BAD_NOT_CONNECTED.value,
                                       Quality.BAD_COMMUNICATION_ERROR.value)
        await eventually(lambda: (p.mqtt_latest("iotserver/tags/PLC1/Level") or {}).get("q", "")
                         .startswith("Bad"), what="MQTT Bad quality")
        rr = await modbus_read(p, SERVED_LEVEL)
        assert rr.isError() and rr.exception_code == 4

        await p.plc.start()
        await eventually(lambda: p.core.store.read("PLC1/Level").quality is Quality.GOOD,
                         timeout=5, what="Good again after the PLC returned")
        assert (await opcua_value(p, "PLC1/Level")).StatusCode.is_good()
        await eventually(lambda: (p.mqtt_latest("iotserver/tags/PLC1/Level") or {}).get("q")
                         == "Good", what="MQTT Good again")
        assert not (await modbus_read(p, SERVED_LEVEL)).isError()

        # -- an operator forces a reconnect of the PLC from OPC UA (a method on its folder) --
        from asyncua import ua

        device = p.core.services["modbus"].devices["plc1"]
        before = device.stats.reconnects
        folder = p.opcua.get_node(ua.NodeId("PLC1", p.ns))
        await aio(folder.call_method(ua.NodeId("PLC1#Reconnect", p.ns)))
        await eventually(lambda: device.stats.reconnects > before, what="reconnect")
        await eventually(lambda: p.core.store.read("PLC1/Level").quality is Quality.GOOD,
                         what="Good after the forced reconnect")
    finally:
        await stop_plant(p)
