"""The PLC poller: block planning, batch decoding, and polling the simulated PLC with faults."""

from __future__ import annotations

import random
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_twisted
from helpers import aio, wait_for
from helpers.modbus import device_config
from twisted.internet import reactor

from iotserver import app, config
from iotserver.modbus.codec import Table
from iotserver.modbus.config import DeviceTag
from iotserver.modbus.encoding import ModbusType, Order, decode_registers
from iotserver.modbus.planner import plan_blocks
from iotserver.modbus.poller import Device
from iotserver.sim.plc import SimPLC
from iotserver.tags.model import DataType, Quality, Scaling, TagDef
from iotserver.tags.store import TagStore

TIMEOUT = 5.0


@pytest.fixture(scope="module", autouse=True)
def _listener_reservation() -> None:
    """Twisted keeps one /dev/null fd reserved once any port listens: not a test's leak."""
    from twisted.internet.tcp import _reservedFD

    _reservedFD.reserve()


def dtag(path: str, table: Table, address: int, mtype: str = "uint16", order: Order = Order.ABCD,
         unit: int = 1, dt: DataType | None = None, scaling: Scaling | None = None) -> DeviceTag:
    mt = ModbusType.parse(mtype) if table not in (Table.COILS, Table.DISCRETE_INPUTS) \
        else ModbusType.parse("bool")
    data_type = dt or {"bool": DataType.BOOLEAN, "bit": DataType.BOOLEAN,
                       "string": DataType.STRING}.get(mt.kind.value, DataType.FLOAT64)
    tag = TagDef(path=path, data_type=data_type, scaling=scaling, owner="modbus:t")
    return DeviceTag(f"t.{path}", tag, table, address, mt, order, "default", unit)


# ------------------------------------------------------------------------------- planning


def test_plan_merges_same_unit_and_table_within_limits() -> None:
    hr = Table.HOLDING_REGISTERS
    tags = [dtag("a", hr, 0, "float32"), dtag("b", hr, 2, "float32"), dtag("c", hr, 10),
            dtag("d", hr, 120, "float64"), dtag("e", hr, 3, "uint16"),  # overlaps b: same block
            dtag("f", hr, 0, unit=2), dtag("g", Table.INPUT_REGISTERS, 0),
            dtag("h", Table.COILS, 0), dtag("i", Table.COILS, 1999), dtag("j", Table.COILS, 2000)]
    blocks = plan_blocks(tags, max_gap=0)
    spans = sorted((b.unit, b.table.value, b.address, b.count) for b in blocks)
    assert spans == sorted([
        (1, "holding_registers", 0, 4), (1, "holding_registers", 10, 1),
        (1, "holding_registers", 120, 4), (2, "holding_registers", 0, 1),
        (1, "input_registers", 0, 1), (1, "coils", 0, 1), (1, "coils", 1999, 2),
    ])
    blocks = plan_blocks(tags, max_gap=8)
    hr1 = sorted((b.address, b.count) for b in blocks if b.unit == 1 and b.table is hr)
    assert hr1 == [(0, 11), (120, 4)]
    assert next(b for b in blocks if b.address == 0 and b.table is hr and b.unit == 1).has_gaps
    # 125-register limit: 0..124 fits, a tag ending at 126 does not
    blocks = plan_blocks([dtag("x", hr, 0), dtag("y", hr, 123, "float32"),
                          dtag("z", hr, 125, "float32")], max_gap=200)
    assert sorted((b.address, b.count) for b in blocks) == [(0, 125), (125, 2)]
    coils = plan_blocks([dtag("h", Table.COILS, 0), dtag("j", Table.COILS, 2000)], max_gap=5000)
    assert len(coils) == 2


def test_block_decode_matches_scalar_decoding() -> None:
    """Random tags of every type and order: the batch path equals decode_registers + scaling."""
    rng = random.Random(4)
    types = ["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64",
             "bit:0", "bit:9", "bool", "string:3"]
    hr = Table.HOLDING_REGISTERS
    for trial in range(20):
        tags = []
        for i in range(12):
            mtype = rng.choice(types)
            order = rng.choice(list(Order))
            kind = mtype.split(":")[0]
            scaling = Scaling(0, 10, 5, 25) if kind in ("int16", "uint32") and i % 2 else None
            dt = {"bool": DataType.BOOLEAN, "bit": DataType.BOOLEAN, "string": DataType.STRING,
                  "float32": DataType.FLOAT32, "float64": DataType.FLOAT64}.get(
                      kind, DataType.FLOAT64 if scaling else DataType.INT64)
            tags.append(dtag(f"t{i}", hr, rng.randrange(0, 100), mtype, order, dt=dt,
                             scaling=scaling))
        blocks = plan_blocks(tags, max_gap=125)
        for block in blocks:
            regs = np.array([rng.randrange(0, 65536) for _ in range(block.count)], dtype=np.uint16)
            got = {u[0]: u[1] for u in block.decode(regs)}
            assert len(got) == len(block.tags)
            for t in block.tags:
                off = t.address - block.address
                want = decode_registers(t.mtype, t.order, regs[off:off + t.mtype.width])
                if t.tag.scaling is not None:
                    want = t.tag.scaling.to_eng(want)
                value = got[t.tag.path]
                if isinstance(want, float):
                    assert value == pytest.approx(want, nan_ok=True), (trial, t)
                else:
                    assert value == want, (trial, t)


# ------------------------------------------------------------------------------- the sim PLC


TAGS = """
[[modbus.devices.tags]]
path = "P/H0"
table = "holding"
address = 0
type = "uint16"

[[modbus.devices.tags]]
path = "P/H5"
table = "holding"
address = 5
type = "uint16"
scale = 0.5
offset = 1

[[modbus.devices.tags]]
path = "P/H100"
table = "holding"
address = 100
type = "uint16"

[[modbus.devices.tags]]
path = "P/Sine"
table = "input"
address = 2
type = "float32"

[[modbus.devices.tags]]
path = "P/Coil1"
table = "coil"
address = 1
access = "readwrite"

[[modbus.devices.tags]]
path = "P/Setpoint"
table = "holding"
address = 2000
type = "float32"
order = "CDAB"
access = "readwrite"
range = [-1000, 1000]

[[modbus.devices.tags]]
path = "P/Small"
table = "holding"
address = 2010
type = "int16"
data_type = "float64"
access = "readwrite"

[[modbus.devices.tags]]
path = "P/Bit2"
table = "holding"
address = 3000
type = "bit:2"
access = "readwrite"
"""


class Rig:
    def __init__(self, plc: SimPLC, store: TagStore, device: Device) -> None:
        self.plc, self.store, self.device = plc, store, device

    def q(self, path: str) -> Quality:
        return self.store.read(path).quality

    def v(self, path: str) -> Any:
        return self.store.read(path).value


async def make_rig(tags: str = TAGS, extra: str = "", name: str = "plc1",
                   store: TagStore | None = None) -> Rig:
    plc = SimPLC(0, interval=0.02, registers=200)
    port = await plc.start()
    cfg = device_config(port, tags.replace("P/", f"{name}/"), extra, name)
    store = TagStore(reactor) if store is None else store
    for t in cfg.tags:
        store.define(t.tag)
    device = Device(cfg, store, rng=random.Random(1))
    device.start()
    return Rig(plc, store, device)


async def close_rig(rig: Rig) -> None:
    await aio(rig.device.stop())
    await rig.plc.stop()


@pytest_twisted.async_yield_fixture
async def rig() -> AsyncIterator[Rig]:
    r = await make_rig()
    try:
        yield r
    finally:
        await close_rig(r)


@pytest_twisted.ensureDeferred
async def test_polls_decodes_and_writes_through(rig: Rig) -> None:
    paths = rig.device.paths
    await wait_for(lambda: all(rig.q(p) is Quality.GOOD for p in paths))
    # one block read both: register i holds tick + i
    assert (rig.v("plc1/H5") - 1) / 0.5 - rig.v("plc1/H0") == 5
    assert -100 <= rig.v("plc1/Sine") <= 100
    # write-through: float32 CDAB; the PLC holds it, the tag is read back
    assert await rig.store.write("plc1/Setpoint", 12.5) is Quality.GOOD
    assert list(rig.plc.holding[2000:2002]) == [0x0000, 0x4148]
    assert rig.v("plc1/Setpoint") == 12.5
    assert await rig.store.write("plc1/Small", -3) is Quality.GOOD
    assert struct.unpack(">h", rig.plc.holding[2010:2011].tobytes())[0] == -3
    assert await rig.store.write("plc1/Small", 40000) is Quality.BAD_OUT_OF_RANGE
    assert await rig.store.write("plc1/Bit2", True) is Quality.GOOD  # FC16 mask write
    assert int(rig.plc.holding[3000]) == 4 and rig.v("plc1/Bit2") is True
    rig.plc.holding[3000] = 0x8001
    assert await rig.store.write("plc1/Bit2", True) is Quality.GOOD
    assert int(rig.plc.holding[3000]) == 0x8005
    assert await rig.store.write("plc1/Coil1", True) is Quality.GOOD
    # the PLC refuses: exception 03 -> BadOutOfRange, 02 -> BadNotWritable
    rig.plc.fail("holding", 2000, 2002, 3)
    assert await rig.store.write("plc1/Setpoint", 1.0) is Quality.BAD_OUT_OF_RANGE
    rig.plc.faults.clear()
    rig.plc.fail("holding", 2000, 2002, 2)
    assert await rig.store.write("plc1/Setpoint", 1.0) is Quality.BAD_NOT_WRITABLE
    st = rig.device.stats
    assert st.requests > 10 and st.errors == 2 and st.writes == 8 and st.writes_failed == 3
    assert st.rtt_avg > 0  # measured (its size is the machine's, not asserted)


@pytest_twisted.ensureDeferred
async def test_exception_range_marks_only_that_block(rig: Rig) -> None:
    await wait_for(lambda: rig.q("plc1/H100") is Quality.GOOD)
    rig.plc.fail("holding", 100, 101, 2)
    await wait_for(lambda: rig.q("plc1/H100") is Quality.BAD_CONFIGURATION_ERROR)
    assert rig.q("plc1/H0") is Quality.GOOD and rig.q("plc1/Sine") is Quality.GOOD
    rig.plc.fail("input", 0, 10, 4)
    await wait_for(lambda: rig.q("plc1/Sine") is Quality.BAD_DEVICE_FAILURE)
    rig.plc.faults.clear()
    await wait_for(lambda: rig.q("plc1/H100") is Quality.GOOD
                   and rig.q("plc1/Sine") is Quality.GOOD)


@pytest_twisted.ensureDeferred
async def test_plc_stopped_and_restarted(rig: Rig) -> None:
    paths = rig.device.paths
    await wait_for(lambda: all(rig.q(p) is Quality.GOOD for p in paths))
    last = rig.v("plc1/H0")
    await rig.plc.stop()
    await wait_for(lambda: all(rig.q(p) is Quality.BAD_NOT_CONNECTED for p in paths))
    assert rig.v("plc1/H0") == last  # last value kept
    assert await rig.store.write("plc1/Setpoint", 1.0) is Quality.BAD_NOT_CONNECTED
    await wait_for(lambda: rig.device.stats.connect_failures >= 2, what="two backoff rounds")
    await rig.plc.start()
    await wait_for(lambda: all(rig.q(p) is Quality.GOOD for p in paths))
    assert rig.device.stats.reconnects == 1 and rig.device.stats.connect_failures >= 2


@pytest_twisted.ensureDeferred
async def test_dropped_connection_mid_request(rig: Rig) -> None:
    await wait_for(lambda: rig.q("plc1/H0") is Quality.GOOD)
    rig.plc.drop_next = 1
    await wait_for(lambda: rig.q("plc1/H0") is Quality.BAD_NOT_CONNECTED)
    await wait_for(lambda: rig.q("plc1/H0") is Quality.GOOD)
    assert rig.device.stats.reconnects == 1 and rig.device.stats.timeouts == 0
    rig.device.reconnect()
    await wait_for(lambda: rig.device.stats.reconnects == 2)


@pytest_twisted.ensureDeferred
async def test_slow_plc_times_out_without_delaying_another() -> None:
    store = TagStore(reactor)
    slow = await make_rig(name="slow", store=store)
    fast = await make_rig(name="fast", store=store)
    try:
        await wait_for(lambda: slow.q("slow/H0") is Quality.GOOD
                       and fast.q("fast/H0") is Quality.GOOD)
        slow.plc.delay = 1.0  # timeout is 0.25 s
        await wait_for(lambda: slow.q("slow/H0") is Quality.BAD_COMMUNICATION_ERROR)
        polls, timeouts = fast.device.stats.polls, slow.device.stats.timeouts
        # the fast PLC keeps being polled while the slow one's requests hang and time out
        await wait_for(lambda: fast.device.stats.polls - polls >= 5
                       and slow.device.stats.timeouts > timeouts, what="5 fast polls")
        assert fast.q("fast/H0") is Quality.GOOD
        assert slow.q("slow/H0") is Quality.BAD_COMMUNICATION_ERROR
        assert slow.device.stats.timeouts >= 1
        # a write waits behind the poll in flight; the connection may be cycling (2 timeouts)
        assert await store.write("slow/Setpoint", 2.0) in (Quality.BAD_TIMEOUT,
                                                          Quality.BAD_NOT_CONNECTED)
        slow.plc.delay = 0.0
        await wait_for(lambda: slow.q("slow/H0") is Quality.GOOD)
    finally:
        await close_rig(slow)
        await close_rig(fast)


@pytest_twisted.ensureDeferred
async def test_gap_refused_by_device_splits_block() -> None:
    tags = """
[[modbus.devices.tags]]
path = "P/A"
table = "holding"
address = 0
type = "uint16"

[[modbus.devices.tags]]
path = "P/B"
table = "holding"
address = 10
type = "uint16"
"""
    r = await make_rig(tags, "max_gap = 20")
    r.plc.fail("holding", 5, 6, 2)  # the unused address between the two tags
    try:
        assert [(b.address, b.count) for b in r.device.blocks] == [(0, 11)]
        await wait_for(lambda: r.q("plc1/A") is Quality.GOOD and r.q("plc1/B") is Quality.GOOD)
        assert sorted((b.address, b.count) for b in r.device.blocks) == [(0, 1), (10, 1)]
    finally:
        await close_rig(r)


@pytest_twisted.ensureDeferred
async def test_service_owns_device_tags(tmp_path: Path) -> None:
    plc = SimPLC(0, interval=0.02)
    port = await plc.start()
    text = f"""
[server]
data_dir = "{tmp_path / 'data'}"

[[modbus.devices]]
name = "line"
endpoint = "127.0.0.1:{port}"
interval = 0.05
timeout = 0.5

[[modbus.devices.tags]]
path = "Line/Setpoint"
table = "holding"
address = 5000
type = "float32"
access = "readwrite"
unit = "rpm"
"""
    cfg = config.parse(text, source="t.toml")
    root, core = app.build(cfg, reactor)
    root.startService()
    try:
        service = core.services["modbus"]
        await service.started
        device = service.devices["line"]
        await wait_for(lambda: core.store.read("Line/Setpoint").quality is Quality.GOOD)
        assert core.store.tag("Line/Setpoint").owner == "modbus:line"
        assert await core.store.write("Line/Setpoint", 7.5) is Quality.GOOD
        assert core.store.read("Line/Setpoint").value == 7.5
        assert device.stats.writes == 1
    finally:
        await root.stopService()
        await plc.stop()
    assert core.store.read("Line/Setpoint").quality is Quality.BAD_OUT_OF_SERVICE


@pytest.mark.interop
@pytest_twisted.ensureDeferred
async def test_poll_a_pymodbus_server(free_port: int) -> None:
    from pymodbus.datastore import (
        ModbusDeviceContext,
        ModbusSequentialDataBlock,
        ModbusServerContext,
    )
    from pymodbus.server import ModbusTcpServer

    async def make() -> Any:
        block = ModbusSequentialDataBlock(1, [0] * 300)
        ctx = ModbusServerContext(devices=ModbusDeviceContext(hr=block), single=True)
        server = ModbusTcpServer(ctx, address=("127.0.0.1", free_port))
        await server.serve_forever(background=True)
        return server, block

    server, _ = await aio(make())
    tags = """
[[modbus.devices.tags]]
path = "P/F"
table = "holding"
address = 10
type = "float32"
access = "readwrite"

[[modbus.devices.tags]]
path = "P/N"
table = "holding"
address = 12
type = "int32"
order = "CDAB"
access = "readwrite"
"""
    cfg = device_config(free_port, tags)
    store = TagStore(reactor)
    for t in cfg.tags:
        store.define(t.tag)
    device = Device(cfg, store)
    device.start()
    try:
        await wait_for(lambda: store.read("P/F").quality is Quality.GOOD)
        assert await store.write("P/F", -2.25) is Quality.GOOD
        assert await store.write("P/N", -100000) is Quality.GOOD
        assert store.read("P/F").value == -2.25 and store.read("P/N").value == -100000
        # another client sees the same registers
        from pymodbus.client import AsyncModbusTcpClient

        async def check() -> list[int]:
            c = AsyncModbusTcpClient("127.0.0.1", port=free_port, reconnect_delay=0)
            await c.connect()
            rr = await c.read_holding_registers(10, count=4, device_id=1)
            c.close()
            return list(rr.registers)

        regs = await aio(check())
        assert regs[:2] == [0xC010, 0x0000]
        assert struct.unpack(">i", struct.pack(">HH", regs[3], regs[2]))[0] == -100000
    finally:
        await aio(device.stop())
        await aio(server.shutdown())


@pytest_twisted.ensureDeferred
async def test_refused_address_is_a_warning_naming_tag_and_address() -> None:
    """A wrong register address in the config (the PLC answers 02) is logged once, by name."""
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    tags = """
[[modbus.devices.tags]]
path = "P/Wrong"
table = "holding"
address = 150
type = "uint16"
"""
    r = await make_rig(tags)
    r.plc.fail("holding", 150, 151, 2)
    try:
        await wait_for(lambda: r.q("plc1/Wrong") is Quality.BAD_CONFIGURATION_ERROR)
        polls = r.device.stats.polls
        await wait_for(lambda: r.device.stats.polls >= polls + 2)  # refused again, not logged again
    finally:
        await close_rig(r)
        globalLogPublisher.removeObserver(events.append)
    from twisted.logger import LogLevel, formatEvent

    warnings = [formatEvent(e) for e in events
                if e.get("log_level") is LogLevel.warn and "refused reading" in formatEvent(e)]
    assert warnings == [
        "modbus plc1: unit 1 refused reading holding 150+1 with exception 02 "
        "(illegal data address: check the tags' addresses); tags plc1/Wrong at "
        "holding 150 are BadConfigurationError"], warnings
