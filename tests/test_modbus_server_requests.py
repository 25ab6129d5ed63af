"""Request semantics of the Modbus server in the assembled app: FC17 is atomic, writes that
cannot be carried out are refused (not acknowledged and dropped), arrays in the map. Raw
frames, the pymodbus client and mbpoll as clients."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_twisted
from helpers import aio
from helpers.modbus import adu, exc, f32, mbpoll, raw, read_hr, write_hr
from twisted.internet import reactor

from iotserver import app, config
from iotserver.tags.model import Quality

CONFIG = """
[server]
data_dir = "{data}"

[[tags]]
path = "T/Setpoint"
type = "float32"
access = "readwrite"
initial = 10

[[tags]]
path = "T/Measured"
type = "float32"
initial = 1.5

[[tags]]
path = "T/Flag0"
type = "boolean"
access = "readwrite"
initial = false

[[tags]]
path = "T/Flag3"
type = "boolean"
access = "readwrite"
initial = true

[[tags]]
path = "T/Name"
type = "string"
access = "readwrite"
initial = "abc"

[[tags]]
path = "T/Twice"
type = "uint16"
access = "readwrite"
initial = 5

[[tags]]
path = "T/Curve"
type = "float32"
shape = [4]
access = "readwrite"
range = [-100, 100]
initial = [1.0, 2.0, 3.0, 4.0]

[[tags]]
path = "T/Counts"
type = "uint16"
shape = [3]
access = "readwrite"
initial = [7, 8, 9]

[[tags]]
path = "T/Valves"
type = "boolean"
shape = [5]
access = "readwrite"
initial = [true, false, false, true, false]

[[tags]]
path = "T/Levels"
type = "int16"
shape = [2]
initial = [-5, 6]

[modbus.server]
endpoints = ["tcp:{port}:interface=127.0.0.1"]
bad_quality = "exception"

[[modbus.server.map]]
path = "T/Setpoint"
table = "holding"
address = 0
type = "float32"

[[modbus.server.map]]
path = "T/Measured"
table = "holding"
address = 4
type = "float32"
writable = false

[[modbus.server.map]]
path = "T/Flag0"
table = "holding"
address = 9
type = "bit:0"

[[modbus.server.map]]
path = "T/Flag3"
table = "holding"
address = 9
type = "bit:3"

[[modbus.server.map]]
path = "T/Name"
table = "holding"
address = 10
type = "string:4"

[[modbus.server.map]]
path = "T/Twice"
table = "holding"
address = 20
type = "uint16"

[[modbus.server.map]]
path = "T/Twice"
table = "holding"
address = 21
type = "uint16"

[[modbus.server.map]]
path = "T/Curve"
table = "holding"
address = 30
type = "float32"
count = 4

[[modbus.server.map]]
path = "T/Counts"
table = "holding"
address = 40
type = "uint16"
count = 3

[[modbus.server.map]]
path = "T/Valves"
table = "coil"
address = 10
count = 5

[[modbus.server.map]]
path = "T/Levels"
table = "input"
address = 0
type = "int16"
count = 2
"""


class Srv:
    def __init__(self, root: Any, core: Any, port: int) -> None:
        self.root = root
        self.core = core
        self.port = port
        self.store = core.store

    def value(self, path: str) -> Any:
        return self.store.read(path).value


@pytest_twisted.async_yield_fixture
async def srv(tmp_path: Path, free_port: int) -> AsyncIterator[Srv]:
    cfg = config.parse(CONFIG.format(data=tmp_path / "data", port=free_port), source="t.toml")
    root, core = app.build(cfg, reactor)
    root.startService()
    await core.services["modbus"].started
    try:
        yield Srv(root, core, free_port)
    finally:
        await root.stopService()


def fc17(tid: int, read_address: int, read_count: int, write_address: int,
         regs: list[int]) -> bytes:
    n = len(regs)
    return adu(tid, struct.pack(f">BHHHHB{n}H", 0x17, read_address, read_count, write_address,
                                n, 2 * n, *regs))


def fc06(tid: int, address: int, value: int) -> bytes:
    return adu(tid, struct.pack(">BHH", 6, address, value))


def fc16(tid: int, address: int, and_mask: int, or_mask: int) -> bytes:
    return adu(tid, struct.pack(">BHHH", 0x16, address, and_mask, or_mask))


def fc0f(tid: int, address: int, bits: list[bool]) -> bytes:
    packed = bytearray((len(bits) + 7) // 8)
    for i, b in enumerate(bits):
        if b:
            packed[i // 8] |= 1 << (i % 8)
    return adu(tid, struct.pack(">BHHB", 0x0F, address, len(bits), len(packed)) + packed)


def regs_of(text: bytes) -> list[int]:
    """Raw string bytes -> registers (big-endian, NUL padded to 8 bytes)."""
    data = text.ljust(8, b"\x00")
    return list(struct.unpack(">4H", data))


# ------------------------------------------------------------------------------- item 8: FC17


@pytest_twisted.ensureDeferred
async def test_fc17_whose_read_is_refused_changes_nothing(srv: Srv) -> None:
    c = await raw(srv.port)
    try:
        srv.store.set_quality("T/Measured", Quality.BAD_NOT_CONNECTED)
        await aio(_turn())
        # write the setpoint, read the Bad register: 04, and the setpoint keeps its value
        c.send(fc17(1, 4, 2, 0, f32(42.0)))
        assert await c.read(9) == exc(1, 0x17, 4)
        assert srv.value("T/Setpoint") == 10.0
        c.send(read_hr(2, 0, 2))
        assert await c.read(13) == adu(2, b"\x03\x04" + struct.pack(">2H", *f32(10.0)))
        # a read of unmapped registers: 02, nothing written either
        c.send(fc17(3, 500, 1, 0, f32(43.0)))
        assert await c.read(9) == exc(3, 0x17, 2)
        assert srv.value("T/Setpoint") == 10.0
        # reading what it writes: the Bad value is written Good, so the request succeeds
        srv.store.set_quality("T/Setpoint", Quality.BAD_NOT_CONNECTED)
        await aio(_turn())
        c.send(fc17(4, 0, 2, 0, f32(44.0)))
        assert await c.read(13) == adu(4, b"\x17\x04" + struct.pack(">2H", *f32(44.0)))
        assert srv.value("T/Setpoint") == 44.0
    finally:
        await c.close()


async def _turn() -> None:
    import asyncio

    for _ in range(3):  # the image hears of set_quality in the store's next flush
        await asyncio.sleep(0)


@pytest.mark.interop
@pytest_twisted.ensureDeferred
async def test_fc17_atomic_with_pymodbus(srv: Srv) -> None:
    from pymodbus.client import AsyncModbusTcpClient

    srv.store.set_quality("T/Measured", Quality.BAD_NOT_CONNECTED)

    async def run() -> None:
        await _turn()
        client = AsyncModbusTcpClient("127.0.0.1", port=srv.port, timeout=2, retries=0,
                                      reconnect_delay=0)
        await client.connect()
        try:
            regs = client.convert_to_registers(42.0, client.DATATYPE.FLOAT32)
            rr = await client.readwrite_registers(read_address=4, read_count=2,
                                                  write_address=0, values=regs, device_id=1)
            assert rr.isError() and rr.exception_code == 4
            rr = await client.readwrite_registers(read_address=0, read_count=2,
                                                  write_address=20, values=[6, 6], device_id=1)
            assert not rr.isError()
            assert client.convert_from_registers(rr.registers, client.DATATYPE.FLOAT32) == 10.0
        finally:
            client.close()

    await aio(run())
    assert srv.value("T/Setpoint") == 10.0
    assert srv.value("T/Twice") == 6


# ------------------------------------------------------- item 10: accepted and dropped writes


@pytest_twisted.ensureDeferred
async def test_writes_that_cannot_be_carried_out_are_refused(srv: Srv) -> None:
    c = await raw(srv.port)
    try:
        # non-ASCII bytes to a string entry: 03, the string unchanged (not "?"-replaced)
        c.send(write_hr(1, 10, regs_of(b"h\xe9llo")))
        assert await c.read(9) == exc(1, 0x10, 3)
        assert srv.value("T/Name") == "abc"
        c.send(write_hr(2, 10, regs_of(b"hello")))
        assert len(await c.read(12)) == 12
        assert srv.value("T/Name") == "hello"
        # register 9 carries bit 0 and bit 3: setting bit 1 (unmapped) is refused with 02
        c.send(fc06(3, 9, 0x000B))
        assert await c.read(9) == exc(3, 6, 2)
        assert (srv.value("T/Flag0"), srv.value("T/Flag3")) == (False, True)
        c.send(fc16(4, 9, 0xFFFB, 0x0004))  # mask write of bit 2: unmapped as well
        assert await c.read(9) == exc(4, 0x16, 2)
        c.send(fc06(5, 9, 0x0009))  # the mapped bits only: fine
        assert await c.read(12) == fc06(5, 9, 0x0009)
        assert (srv.value("T/Flag0"), srv.value("T/Flag3")) == (True, True)
        # one tag twice with different values: 03, nothing written; the same value twice: ok
        c.send(write_hr(6, 20, [11, 12]))
        assert await c.read(9) == exc(6, 0x10, 3)
        assert srv.value("T/Twice") == 5
        c.send(write_hr(7, 20, [12, 12]))
        assert len(await c.read(12)) == 12
        assert srv.value("T/Twice") == 12
    finally:
        await c.close()


@pytest.mark.interop
@pytest_twisted.ensureDeferred
async def test_refused_writes_with_pymodbus(srv: Srv) -> None:
    from pymodbus.client import AsyncModbusTcpClient

    async def run() -> None:
        client = AsyncModbusTcpClient("127.0.0.1", port=srv.port, timeout=2, retries=0,
                                      reconnect_delay=0)
        await client.connect()
        try:
            rr = await client.write_registers(10, regs_of("Grüße".encode()), device_id=1)
            assert rr.isError() and rr.exception_code == 3
            rr = await client.write_register(9, 0x0002, device_id=1)
            assert rr.isError() and rr.exception_code == 2
            rr = await client.mask_write_register(address=9, and_mask=0xFEFF, or_mask=0x0100,
                                                  device_id=1)
            assert rr.isError() and rr.exception_code == 2
            rr = await client.write_registers(20, [1, 2], device_id=1)
            assert rr.isError() and rr.exception_code == 3
        finally:
            client.close()

    await aio(run())
    assert srv.value("T/Name") == "abc"
    assert (srv.value("T/Flag0"), srv.value("T/Flag3")) == (False, True)
    assert srv.value("T/Twice") == 5


# ------------------------------------------------------------------------ item 11: arrays


@pytest_twisted.ensureDeferred
async def test_arrays_on_consecutive_registers_and_coils_raw(srv: Srv) -> None:
    c = await raw(srv.port)
    try:
        c.send(read_hr(1, 30, 8))
        expect = [r for v in (1.0, 2.0, 3.0, 4.0) for r in f32(v)]
        assert await c.read(25) == adu(1, b"\x03\x10" + struct.pack(">8H", *expect))
        c.send(read_hr(2, 40, 3))
        assert await c.read(15) == adu(2, b"\x03\x06" + struct.pack(">3H", 7, 8, 9))
        # a whole array written at once
        c.send(write_hr(3, 30, [r for v in (5.0, 6.0, 7.0, 8.0) for r in f32(v)]))
        assert len(await c.read(12)) == 12
        assert srv.value("T/Curve").tolist() == [5.0, 6.0, 7.0, 8.0]
        # one element (two registers of a float32): the others keep their values
        c.send(write_hr(4, 34, f32(-1.5)))
        assert len(await c.read(12)) == 12
        assert srv.value("T/Curve").tolist() == [5.0, 6.0, -1.5, 8.0]
        c.send(fc06(5, 41, 80))
        assert await c.read(12) == fc06(5, 41, 80)
        assert srv.value("T/Counts").tolist() == [7, 80, 9]
        # half of an element: 02; an element outside the tag's range: 03; nothing changes
        c.send(fc06(6, 35, 0))
        assert await c.read(9) == exc(6, 6, 2)
        c.send(write_hr(7, 30, f32(500.0)))
        assert await c.read(9) == exc(7, 0x10, 3)
        assert srv.value("T/Curve").tolist() == [5.0, 6.0, -1.5, 8.0]
        # a bool array on coils: read, write some coils of it
        c.send(adu(8, struct.pack(">BHH", 1, 10, 5)))
        assert await c.read(10) == adu(8, b"\x01\x01\x09")
        c.send(fc0f(9, 11, [True, True]))
        assert len(await c.read(12)) == 12
        assert srv.value("T/Valves").tolist() == [True, True, True, True, False]
        # a read-only int16 array on input registers
        c.send(adu(10, struct.pack(">BHH", 4, 0, 2)))
        assert await c.read(13) == adu(10, b"\x04\x04" + struct.pack(">2h", -5, 6))
        # a value the source changes shows in the registers
        srv.store.apply([("T/Counts", np.array([1, 2, 3], dtype=np.uint16), Quality.GOOD, 0)])
        await aio(_turn())
        c.send(read_hr(11, 40, 3))
        assert await c.read(15) == adu(11, b"\x03\x06" + struct.pack(">3H", 1, 2, 3))
    finally:
        await c.close()


@pytest.mark.interop
@pytest_twisted.ensureDeferred
async def test_arrays_with_pymodbus(srv: Srv) -> None:
    from pymodbus.client import AsyncModbusTcpClient

    async def run() -> None:
        client = AsyncModbusTcpClient("127.0.0.1", port=srv.port, timeout=2, retries=0,
                                      reconnect_delay=0)
        await client.connect()
        try:
            rr = await client.read_holding_registers(30, count=8, device_id=1)
            values = [client.convert_from_registers(rr.registers[i:i + 2],
                                                    client.DATATYPE.FLOAT32)
                      for i in range(0, 8, 2)]
            assert values == [1.0, 2.0, 3.0, 4.0]
            regs = client.convert_to_registers(9.25, client.DATATYPE.FLOAT32)
            rr = await client.write_registers(36, regs, device_id=1)
            assert not rr.isError()
            rr = await client.write_coils(10, [False] * 5, device_id=1)
            assert not rr.isError()
            rr = await client.read_coils(10, count=5, device_id=1)
            assert rr.bits[:5] == [False] * 5
        finally:
            client.close()

    await aio(run())
    assert srv.value("T/Curve").tolist() == [1.0, 2.0, 3.0, 9.25]
    assert srv.value("T/Valves").tolist() == [False] * 5


@pytest.mark.interop
@pytest_twisted.ensureDeferred
async def test_arrays_with_mbpoll(srv: Srv) -> None:
    port = str(srv.port)
    text, code = await mbpoll("-m", "tcp", "-a", "1", "-0", "-r", "30", "-c", "4", "-t",
                              "4:float", "-B", "-1", "-p", port, "127.0.0.1")
    assert code == 0, text
    for i, v in enumerate((1, 2, 3, 4)):
        assert f"[{30 + 2 * i}]: \t{v}" in text, text
    text, code = await mbpoll("-m", "tcp", "-a", "1", "-0", "-r", "40", "-t", "4", "-1",
                              "-p", port, "127.0.0.1", "100", "200", "300")
    assert code == 0, text
    assert srv.value("T/Counts").tolist() == [100, 200, 300]
    text, code = await mbpoll("-m", "tcp", "-a", "1", "-0", "-r", "12", "-t", "0", "-1",
                              "-p", port, "127.0.0.1", "1")
    assert code == 0, text
    assert srv.value("T/Valves").tolist() == [True, False, True, True, False]
