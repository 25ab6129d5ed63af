"""The server's register image: its fast codec agrees with encoding.py, reads, write planning."""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from iotserver.modbus.codec import ExceptionCode, Table
from iotserver.modbus.config import MapEntry
from iotserver.modbus.encoding import (
    Kind,
    ModbusType,
    Order,
    decode_registers,
    encode_value,
    to_wire_bytes,
)
from iotserver.modbus.image import Binding, Image, to_raw
from iotserver.tags.model import Access, DataType, Quality, Scaling, TagDef, Update
from iotserver.tags.store import MemoryOwner, TagStore

_LIMITS = {"int16": (-(2**15), 2**15 - 1), "uint16": (0, 2**16 - 1),
           "int32": (-(2**31), 2**31 - 1), "uint32": (0, 2**32 - 1),
           "int64": (-(2**63), 2**63 - 1), "uint64": (0, 2**64 - 1)}


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_fast_codec_matches_encoding(data: st.DataObject) -> None:
    """Binding.wire/unwire == encode_value/decode_registers for every type and order."""
    for _ in range(4):  # several types per example (no parametrize with @given: pytest-twisted)
        name = data.draw(st.sampled_from([*_LIMITS, "float32", "float64", "bit:0", "bit:13",
                                          "bool"]))
        order = data.draw(st.sampled_from(list(Order)))
        mtype = ModbusType.parse(name)
        b = Binding(MapEntry("k", "A", Table.HOLDING_REGISTERS, 0, mtype, order))
        if name in _LIMITS:
            value: object = data.draw(st.integers(*_LIMITS[name]))
        elif name == "float32":
            value = float(np.float32(data.draw(st.floats(width=32, allow_nan=False))))
        elif name == "float64":
            value = data.draw(st.floats(allow_nan=False))
        else:
            value = data.draw(st.booleans())
        wire = to_wire_bytes(encode_value(mtype, order, value))
        if mtype.kind not in (Kind.BIT, Kind.BOOL):
            assert b.wire(value) == wire, (name, order, value)
        regs = np.frombuffer(wire, dtype=">u2").astype(np.uint16)
        assert b.unwire(wire) == decode_registers(mtype, order, regs), (name, order, value)


def test_to_raw_scales_rounds_and_saturates() -> None:
    e = MapEntry("k", "A", Table.HOLDING_REGISTERS, 0, ModbusType.parse("int16"), Order.ABCD,
                 Scaling(0, 10, 0, 1))
    assert to_raw(e, 1.26) == 13 and to_raw(e, 1e9) == 32767 and to_raw(e, float("nan")) == 0


def make(entries: list[MapEntry], tags: list[TagDef], **kw: str) -> tuple[TagStore, Image, Clock]:
    clock = Clock()
    store = TagStore(clock)
    store.register_owner("memory", MemoryOwner(store))
    for t in tags:
        store.define(t)
    image = Image(entries, store, **kw)
    image.start()
    return store, image, clock


def test_image_follows_store_and_quality() -> None:
    hr = Table.HOLDING_REGISTERS
    tags = [TagDef("A", DataType.FLOAT32, initial=1.5), TagDef("B", DataType.INT16, initial=-2),
            TagDef("Late", DataType.UINT16)]
    entries = [MapEntry("m0", "A", hr, 0, ModbusType.parse("float32"), Order.CDAB),
               MapEntry("m1", "B", hr, 2, ModbusType.parse("int16"), Order.BADC),
               MapEntry("m2", "Late", hr, 3, ModbusType.parse("uint16"), Order.ABCD),
               MapEntry("m3", "Missing", Table.INPUT_REGISTERS, 0, ModbusType.parse("int16"),
                        Order.ABCD)]
    store, image, clock = make(entries, tags, bad_quality="exception")
    assert image.read_registers(hr, 0, 3) == struct.pack(">HHH", 0x0000, 0x3FC0, 0xFEFF)
    assert image.read_registers(hr, 0, 4) is ExceptionCode.SERVER_DEVICE_FAILURE  # Late: no data
    store.apply([Update("Late", 9), Update("A", 2.0)])
    clock.advance(0)
    assert image.read_registers(hr, 0, 4) == struct.pack(">HHHH", 0, 0x4000, 0xFEFF, 9)
    assert image.read_registers(hr, 3, 2) is ExceptionCode.ILLEGAL_DATA_ADDRESS
    store.set_quality("B", Quality.BAD_NOT_CONNECTED)
    clock.advance(0)
    assert image.read_registers(hr, 2, 1) is ExceptionCode.SERVER_DEVICE_FAILURE
    assert image.read_registers(hr, 0, 2) == struct.pack(">HH", 0, 0x4000)
    # a tag defined later is bound when it appears
    assert image.read_registers(Table.INPUT_REGISTERS, 0, 1) is ExceptionCode.SERVER_DEVICE_FAILURE
    store.define(TagDef("Missing", DataType.INT32, initial=70000))
    clock.advance(0)
    assert image.read_registers(Table.INPUT_REGISTERS, 0, 1) == struct.pack(">h", 32767)
    image.stop()


def test_write_plans_validate_everything_first() -> None:
    hr = Table.HOLDING_REGISTERS
    rw = Access.READ_WRITE
    tags = [TagDef("S", DataType.FLOAT64, access=rw, low=0, high=100, initial=5.0),
            TagDef("N", DataType.INT32, access=rw, initial=0),
            TagDef("RO", DataType.UINT16, initial=1),
            TagDef("F0", DataType.BOOLEAN, access=rw, initial=False),
            TagDef("F1", DataType.BOOLEAN, initial=True)]
    entries = [MapEntry("m0", "S", hr, 0, ModbusType.parse("uint16"), Order.ABCD,
                        Scaling(0, 1000, 0, 100)),
               MapEntry("m1", "N", hr, 1, ModbusType.parse("int32"), Order.ABCD),
               MapEntry("m2", "RO", hr, 3, ModbusType.parse("uint16"), Order.ABCD),
               MapEntry("m3", "F0", hr, 4, ModbusType.parse("bit:0"), Order.ABCD),
               MapEntry("m4", "F1", hr, 4, ModbusType.parse("bit:1"), Order.ABCD)]
    _, image, _ = make(entries, tags)
    plan = image.plan_register_write(0, struct.pack(">Hi", 250, -7))
    assert not isinstance(plan, ExceptionCode)
    assert sorted((b.entry.path, v) for b, v in plan) == [("N", -7), ("S", 25.0)]
    assert image.plan_register_write(0, struct.pack(">H", 1001)) is ExceptionCode.ILLEGAL_DATA_VALUE
    assert image.plan_register_write(1, struct.pack(">H", 1)) is ExceptionCode.ILLEGAL_DATA_ADDRESS
    assert image.plan_register_write(3, struct.pack(">H", 1)) is ExceptionCode.ILLEGAL_DATA_ADDRESS
    # bits: F0 may change; F1 (read-only) must keep its value
    plan = image.plan_register_write(4, struct.pack(">H", 0b11))
    assert not isinstance(plan, ExceptionCode)
    assert [(b.entry.path, v) for b, v in plan] == [("F0", True)]
    refused = image.plan_register_write(4, struct.pack(">H", 0b01))
    assert refused is ExceptionCode.ILLEGAL_DATA_ADDRESS
    assert image.plan_register_write(5, struct.pack(">H", 0)) is ExceptionCode.ILLEGAL_DATA_ADDRESS
    image.stop()


def test_unmapped_reads_zero_and_bits() -> None:
    tags = [TagDef("A", DataType.UINT16, initial=7), TagDef("C", DataType.BOOLEAN, initial=True)]
    entries = [MapEntry("m0", "A", Table.HOLDING_REGISTERS, 5, ModbusType.parse("uint16"),
                        Order.ABCD),
               MapEntry("m1", "C", Table.COILS, 3, ModbusType.parse("bool"), Order.ABCD)]
    _, image, _ = make(entries, tags, unmapped_reads="zero")
    assert image.read_registers(Table.HOLDING_REGISTERS, 4, 3) == struct.pack(">HHH", 0, 7, 0)
    assert image.read_bits(Table.COILS, 0, 9) == bytes((0b1000, 0))
    assert image.plan_bit_write(0, [True]) is ExceptionCode.ILLEGAL_DATA_ADDRESS
    assert image.plan_register_write(4, struct.pack(">H", 1)) is ExceptionCode.ILLEGAL_DATA_ADDRESS
    image.stop()


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_exact_bindings_skip_coerce_only_where_it_changes_nothing(data: st.DataObject) -> None:
    """A write through an ``exact`` binding plans the raw value; that is what coerce gives."""
    from iotserver.tags.model import CoerceError, coerce

    for _ in range(4):
        reg = data.draw(st.sampled_from(sorted(_LIMITS)))
        dt = data.draw(st.sampled_from([DataType.INT16, DataType.UINT16, DataType.INT32,
                                        DataType.UINT32, DataType.INT64, DataType.UINT64,
                                        DataType.FLOAT32, DataType.FLOAT64]))
        ranged = data.draw(st.booleans())
        tag = TagDef("T", dt, access=Access.READ_WRITE, low=0 if ranged else None,
                     high=100 if ranged else None)
        mtype = ModbusType.parse(reg)
        b = Binding(MapEntry("k", "T", Table.HOLDING_REGISTERS, 0, mtype, Order.ABCD))
        b.bind(tag)
        raw = data.draw(st.integers(*_LIMITS[reg]))
        if b.exact:
            assert not ranged and dt.is_integer
            assert coerce(tag, raw) == raw and type(coerce(tag, raw)) is int
        _, image, _ = make([MapEntry("k", "T", Table.HOLDING_REGISTERS, 0, mtype, Order.ABCD)],
                           [tag])
        wire = to_wire_bytes(encode_value(mtype, Order.ABCD, raw))
        plan = image.plan_register_write(0, wire)
        try:
            expected: object = coerce(tag, raw)
        except CoerceError:
            assert plan is ExceptionCode.ILLEGAL_DATA_VALUE
        else:
            assert not isinstance(plan, ExceptionCode)
            assert [v for _, v in plan] == [expected]
            assert type(plan[0][1]) is type(expected)
        image.stop()


def test_array_entries_encode_per_element_with_order_and_scaling() -> None:
    """Element i sits at address + i * width, in the entry's order and scaling; a partial
    write of whole elements keeps the others; a tag of another shape is a logged problem."""
    store = TagStore(Clock())
    store.register_owner("memory", MemoryOwner(store))
    rw = Access.READ_WRITE
    store.define(TagDef("A/F", DataType.FLOAT32, shape=(3,), access=rw, initial=[1.5, -2, 3]))
    store.define(TagDef("A/S", DataType.FLOAT64, shape=(2,), access=rw, initial=[10.0, 20.5]))
    store.define(TagDef("A/Wrong", DataType.UINT16, shape=(5,), access=rw, initial=[0] * 5))
    f32 = ModbusType.parse("float32")
    i16 = ModbusType.parse("int16")
    entries = [
        MapEntry("f", "A/F", Table.HOLDING_REGISTERS, 0, f32, Order.CDAB, count=3),
        MapEntry("s", "A/S", Table.HOLDING_REGISTERS, 10, i16, Order.ABCD,
                 scaling=Scaling(0, 10, 0, 1), count=2),
        MapEntry("w", "A/Wrong", Table.HOLDING_REGISTERS, 20, ModbusType.parse("uint16"),
                 Order.ABCD, count=4),
    ]
    image = Image(entries, store)
    image.start()
    regs = image.read_registers(Table.HOLDING_REGISTERS, 0, 6)
    assert isinstance(regs, bytes)
    want = b"".join(to_wire_bytes(encode_value(f32, Order.CDAB, v)) for v in (1.5, -2.0, 3.0))
    assert regs == want
    assert image.read_registers(Table.HOLDING_REGISTERS, 10, 2) == struct.pack(">2h", 100, 205)
    # element 1 of the float array, element 0 of the scaled one
    plan = image.plan_register_write(2, to_wire_bytes(encode_value(f32, Order.CDAB, 7.25)))
    assert isinstance(plan, list) and len(plan) == 1
    assert plan[0][1].tolist() == [1.5, 7.25, 3.0]
    plan = image.plan_register_write(10, struct.pack(">h", -15))
    assert isinstance(plan, list) and plan[0][1].tolist() == [-1.5, 20.5]
    assert image.plan_register_write(3, b"\x00\x00") is ExceptionCode.ILLEGAL_DATA_ADDRESS
    # shape (5,) on an entry of count 4: not served, writes refused
    binding = image.by_path["A/Wrong"][0]
    assert binding.problem == "an array of shape (5,), not (4,)"
    assert image.plan_register_write(20, b"\x00\x01") is ExceptionCode.ILLEGAL_DATA_ADDRESS
    image.stop()
