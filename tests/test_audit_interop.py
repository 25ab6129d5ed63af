"""The audit trail with real clients: paho (MQTT set), pymodbus (Modbus write), asyncua
(OPC UA write), each also failing a login where the protocol has one (the console: see
tests/test_console.py)."""

from __future__ import annotations

import asyncio
import json
import queue
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from helpers import aio, free_port
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from iotserver import app, config
from iotserver.security.users import Role, User, hash_password, save_users

pytestmark = pytest.mark.interop

ENGINEER = ("eng", "engineer-pw")
OPERATOR = ("olga", "operator-pw")


def in_thread(fn: Any, *args: Any) -> Deferred[Any]:
    return aio(asyncio.get_running_loop().run_in_executor(None, fn, *args))


def server_config(tmp: Path, ports: dict[str, int]) -> config.Config:
    return config.parse(f"""
[server]
data_dir = "{tmp / 'data'}"

[[tags]]
path = "Plant/Count"
type = "uint16"
access = "readwrite"
range = [0, 1000]
initial = 1

[modbus.server]
endpoints = ["tcp:{ports['modbus']}:interface=127.0.0.1"]

[[modbus.server.map]]
path = "Plant/Count"
table = "holding"
address = 5
type = "uint16"

[opcua]
endpoint = "opc.tcp://127.0.0.1:{ports['opcua']}/iotserver"
security_policies = ["None"]

[mqtt]
[[mqtt.listeners]]
endpoint = "tcp:{ports['mqtt']}:interface=127.0.0.1"

[audit]
flush_interval = 0.05
""", source="audit.toml")


def mqtt_session(port: int, user: tuple[str, str], actions: Any) -> Any:
    """Connect with paho (blocking, in a thread), run ``actions(client)``, disconnect."""
    from paho.mqtt import client as paho

    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"audit-{user[0]}",
                    protocol=paho.MQTTv5)
    c.username_pw_set(*user)
    connected: queue.Queue[Any] = queue.Queue()
    c.on_connect = lambda _c, _u, _f, rc, _p: connected.put(rc)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        rc = connected.get(timeout=10)
        return rc if rc.is_failure else actions(c)
    finally:
        c.disconnect()
        c.loop_stop()
        c._reset_sockets()


def publish_set(c: Any) -> int:
    info = c.publish("iotserver/tags/Plant/Count/set", b"42", qos=1)
    info.wait_for_publish(10)
    return int(info.rc)


@pytest_twisted.ensureDeferred
async def test_writes_and_failed_logins_of_every_protocol_are_audited(tmp_path: Path) -> None:
    from asyncua import Client, ua
    from pymodbus.client import AsyncModbusTcpClient

    ports = {"modbus": free_port(), "opcua": free_port(), "mqtt": free_port()}
    cfg = server_config(tmp_path, ports)
    cfg.server.data_dir.mkdir(parents=True, exist_ok=True)
    save_users(cfg.server.users_file, [
        User(ENGINEER[0], Role.ENGINEER, hash_password(ENGINEER[1], n=2**10)),
        User(OPERATOR[0], Role.OPERATOR, hash_password(OPERATOR[1], n=2**10))])
    root, core = app.build(cfg, reactor)
    root.startService()
    try:
        for name in ("opcua", "mqtt", "modbus"):
            await core.services[name].started
        # MQTT: a write, a refused write (operator), a failed login
        assert await in_thread(mqtt_session, ports["mqtt"], ENGINEER, publish_set) == 0
        await in_thread(mqtt_session, ports["mqtt"], OPERATOR, publish_set)
        bad = await in_thread(mqtt_session, ports["mqtt"], ("eng", "wrong"), publish_set)
        assert bad.is_failure
        # Modbus: a register write
        mb = AsyncModbusTcpClient("127.0.0.1", port=ports["modbus"], timeout=2, retries=0)
        await aio(mb.connect())
        rr = await aio(mb.write_register(5, 43, device_id=1))
        assert not rr.isError()
        mb.close()
        # OPC UA: a write, then a failed login
        url = f"opc.tcp://127.0.0.1:{ports['opcua']}/iotserver"
        c = Client(url, timeout=10)
        c.set_user(ENGINEER[0])
        c.set_password(ENGINEER[1])
        await aio(c.connect())
        ns = await aio(c.get_namespace_index(cfg.sections["opcua"].namespace))
        node = c.get_node(f"ns={ns};s=Plant/Count")
        await aio(node.write_value(ua.DataValue(ua.Variant(44, ua.VariantType.UInt16))))
        await aio(c.disconnect())
        intruder = Client(url, timeout=10)
        intruder.set_user(ENGINEER[0])
        intruder.set_password("wrong")
        with pytest.raises(Exception, match="UserAccessDenied"):
            await aio(intruder.connect())
        await core.audit.sync()
    finally:
        await root.stopService()
    path = cfg.server.data_dir / "audit.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    writes = [(r["principal"], r["protocol"], r["tag"], r["value"], r["result"])
              for r in records if r["event"] == "write"]
    assert writes == [
        ("eng", "mqtt", "Plant/Count", 42, "Good"),
        ("olga", "mqtt", "Plant/Count", "42", "BadUserAccessDenied"),
        ("", "modbus", "Plant/Count", 43, "Good"),
        ("eng", "opcua", "Plant/Count", 44, "Good"),
    ]
    assert all(r["peer"].startswith("127.0.0.1:") for r in records if r["event"] == "write")
    failed = {(r["protocol"], r["principal"]) for r in records
              if r["event"] == "login" and r["result"] == "failed"}
    assert failed == {("mqtt", "eng"), ("opcua", "eng")}
    ok = {(r["protocol"], r["principal"]) for r in records
          if r["event"] == "login" and r["result"] == "ok"}
    assert {("mqtt", "eng"), ("mqtt", "olga"), ("opcua", "eng")} <= ok
