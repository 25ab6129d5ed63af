"""The OPC UA client source against a plain asyncua server standing in for a PLC."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from asyncua import Server, ua
from helpers import free_port
from helpers import wait_for_aio as wait_for
from helpers.opcua import aio, client, make_config, start

from iotserver.tags.model import Quality

pytestmark = pytest.mark.interop
PLC_NS = "urn:test:plc"


class Plc:
    """A plain asyncua server with a few variables (the southbound peer)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.server: Server | None = None

    async def start(self) -> None:
        server = Server()
        await server.init()
        server.set_endpoint(f"opc.tcp://127.0.0.1:{self.port}/plc")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        idx = await server.register_namespace(PLC_NS)
        line = await server.nodes.objects.add_folder(ua.NodeId("Line", idx), "Line")
        self.temp = await line.add_variable(ua.NodeId("Temp", idx), "Temp", 20.0)
        self.speed = await line.add_variable(ua.NodeId("Speed", idx), "Speed",
                                             ua.Variant(100, ua.VariantType.Int32))
        await self.speed.set_writable()
        motor = await line.add_folder(ua.NodeId("Motor", idx), "Motor")
        self.current = await motor.add_variable(ua.NodeId("Motor.Current", idx), "Current", 1.5)
        self.on = await motor.add_variable(ua.NodeId("Motor.On", idx), "On (cmd)", True)
        await self.on.set_writable()
        await server.start()
        self.server = server

    async def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            # asyncua keeps sessions with subscriptions after their connection (Part 4 6.7)
            # and Server.stop() leaves their tasks running: close them first
            for session in list(server.iserver._external_sessions.values()):
                await session.close_session(True)
            await server.stop()
            for _ in range(3):
                await asyncio.sleep(0)


def config_for(data: Path, plc_port: int) -> Any:
    extra = f"""
[[opcua.clients]]
name = "plc1"
endpoint = "opc.tcp://127.0.0.1:{plc_port}/plc"
publishing_interval_ms = 50
reconnect_min_s = 0.2
reconnect_max_s = 0.5
timeout_s = 2

[[opcua.clients.nodes]]
node_id = "nsu={PLC_NS};s=Temp"
path = "PLC1/Temp"
type = "float64"
unit = "degC"
history = 100

[[opcua.clients.nodes]]
node_id = "nsu={PLC_NS};s=Speed"
path = "PLC1/Speed"
type = "int32"
access = "readwrite"
range = [0, 3000]

[[opcua.clients.browse]]
node_id = "nsu={PLC_NS};s=Motor"
prefix = "PLC1/Motor"
writable = true
"""
    return make_config(data, free_port(), extra=extra, tags="")


@pytest_twisted.ensureDeferred
async def test_values_writes_and_reconnect_after_plc_restart(tmp_path: Path) -> None:
    plc = Plc(free_port())
    await aio(plc.start())
    running = await start(config_for(tmp_path / "data", plc.port))
    store = running.store

    async def body() -> None:
        source = running.service.clients["plc1"]
        await wait_for(lambda: store.read("PLC1/Temp").quality is Quality.GOOD)
        assert store.read("PLC1/Temp").value == 20.0
        assert store.tag("PLC1/Temp").owner == "opcua:plc1"
        # values, status and source timestamps flow in
        stamp = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).replace(microsecond=0)
        await plc.temp.write_value(ua.DataValue(ua.Variant(21.5, ua.VariantType.Double),
                                                SourceTimestamp=stamp))
        await wait_for(lambda: store.read("PLC1/Temp").value == 21.5)
        assert store.read("PLC1/Temp").source_ns == int(stamp.timestamp()) * 1_000_000_000
        await plc.temp.write_value(ua.DataValue(
            ua.Variant(21.5, ua.VariantType.Double),
            StatusCode=ua.StatusCode(ua.StatusCodes.BadSensorFailure)))
        await wait_for(lambda: store.read("PLC1/Temp").quality is Quality.BAD_SENSOR_FAILURE)
        assert store.read("PLC1/Temp").value == 21.5  # last value kept
        # browsed folder: variables became tags, names sanitized
        await wait_for(lambda: "PLC1/Motor/Current" in store and "PLC1/Motor/On _cmd_" in store)
        assert store.read("PLC1/Motor/Current").value == 1.5
        assert store.tag("PLC1/Motor/On _cmd_").writable
        # writes go to the PLC; the store shows what the PLC reports back
        assert await store.write("PLC1/Speed", 1200).asFuture(asyncio.get_running_loop()) \
            is Quality.GOOD
        assert await plc.speed.read_value() == 1200
        await wait_for(lambda: store.read("PLC1/Speed").value == 1200)
        q = await store.write("PLC1/Motor/On _cmd_", False).asFuture(asyncio.get_running_loop())
        assert q is Quality.GOOD and await plc.on.read_value() is False
        # PLC restart: Bad_NotConnected while away, values again after
        await plc.stop()
        await wait_for(lambda: store.read("PLC1/Speed").quality is Quality.BAD_NOT_CONNECTED)
        assert store.read("PLC1/Speed").value == 1200
        q = await store.write("PLC1/Speed", 5).asFuture(asyncio.get_running_loop())
        assert q is Quality.BAD_NOT_CONNECTED
        await plc.start()
        await wait_for(lambda: store.read("PLC1/Speed").quality is Quality.GOOD)
        assert store.read("PLC1/Speed").value == 100  # the restarted PLC's value
        await plc.speed.write_value(ua.Variant(7, ua.VariantType.Int32))
        await wait_for(lambda: store.read("PLC1/Speed").value == 7)
        assert source.connects >= 2

    try:
        await aio(body())
    finally:
        await running.root.stopService()
        await aio(plc.stop())
    assert store.read("PLC1/Temp").quality is Quality.BAD_OUT_OF_SERVICE


@pytest_twisted.ensureDeferred
async def test_reconnect_method_and_unreachable_server(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here yet
    running = await start(config_for(tmp_path / "data", port))
    store = running.store
    plc = Plc(port)

    async def body() -> None:
        await wait_for(lambda: store.read("PLC1/Temp").quality is Quality.BAD_NOT_CONNECTED)
        await plc.start()
        async with client(running, user="bob") as c:  # an operator may not reconnect
            ns = await c.get_namespace_index(running.namespace)
            folder = c.get_node(ua.NodeId("PLC1", ns))
            method = ua.NodeId("PLC1#Reconnect", ns)
            with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                await folder.call_method(method)
        async with client(running, user="alice") as c:
            ns = await c.get_namespace_index(running.namespace)
            folder = c.get_node(ua.NodeId("PLC1", ns))
            await folder.call_method(ua.NodeId("PLC1#Reconnect", ns))
            await wait_for(lambda: store.read("PLC1/Temp").quality is Quality.GOOD)

    try:
        await aio(body())
    finally:
        await running.root.stopService()
        with contextlib.suppress(Exception):
            await aio(plc.stop())


@pytest_twisted.ensureDeferred
async def test_secure_client_source_against_our_own_server(tmp_path: Path) -> None:
    """Gateway B subscribes to gateway A with Basic256Sha256/SignAndEncrypt and a password;
    each side rejects the other's certificate until an operator trusts it."""
    import shutil

    from iotserver.tags.model import Update

    a_cfg = make_config(tmp_path / "a", free_port(), policies='["Basic256Sha256"]',
                        extra='application_uri = "urn:test:gateway-a"')
    a = await start(a_cfg)
    b_extra = f"""application_uri = "urn:test:gateway-b"

[[opcua.clients]]
name = "gw-a"
endpoint = "{a.url}"
security_policy = "Basic256Sha256"
security_mode = "SignAndEncrypt"
username = "alice"
password = "alice-secret"
reconnect_min_s = 0.2
reconnect_max_s = 0.4

[[opcua.clients.nodes]]
node_id = "nsu={a.namespace};s=Line1/Setpoint"
path = "Remote/Setpoint"
type = "float32"
access = "readwrite"
"""
    b = await start(make_config(tmp_path / "b", free_port(), extra=b_extra, tags=""))

    async def body() -> None:
        # A refuses B's application certificate (CreateSession), then, once A trusts it, B
        # refuses A's server certificate: each lands in the other side's rejected folder
        for pki in (a.pki, b.pki):
            rejected = pki / "rejected" / "certs"
            await wait_for(lambda rejected=rejected: any(rejected.iterdir()))
            for cert in rejected.iterdir():
                shutil.move(str(cert), pki / "trusted" / "certs" / cert.name)
            b.service.clients["gw-a"].reconnect()
        await wait_for(lambda: b.store.read("Remote/Setpoint").quality is Quality.GOOD)
        assert b.store.read("Remote/Setpoint").value == 10.0
        a.store.apply([Update("Line1/Setpoint", 42.0)])
        await wait_for(lambda: b.store.read("Remote/Setpoint").value == 42.0)
        q = await b.store.write("Remote/Setpoint", 55.0).asFuture(asyncio.get_running_loop())
        assert q is Quality.GOOD  # alice is an engineer on A
        assert a.store.read("Line1/Setpoint").value == 55.0
        await wait_for(lambda: b.store.read("Remote/Setpoint").value == 55.0)

    try:
        await aio(body())
    finally:
        await b.root.stopService()
        await a.root.stopService()
