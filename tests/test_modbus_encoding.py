"""Tests of the register encodings: worked examples, limits, batch == scalar, round trips."""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymodbus.client import ModbusTcpClient

from iotserver.modbus.encoding import (
    BOOL,
    FLOAT32,
    FLOAT64,
    INT16,
    INT32,
    INT64,
    UINT16,
    UINT32,
    UINT64,
    BatchDecoder,
    Kind,
    ModbusType,
    Order,
    bit,
    bit_masks,
    decode_batch,
    decode_registers,
    encode_batch,
    encode_value,
    from_wire,
    pack_bits,
    set_bit,
    string,
    to_wire_bytes,
    unpack_bits,
)

ABCD, CDAB, BADC, DCBA = Order.ABCD, Order.CDAB, Order.BADC, Order.DCBA
NUMERIC = [INT16, UINT16, INT32, UINT32, INT64, UINT64, FLOAT32, FLOAT64]


def regs(dtype: ModbusType, order: Order, value: Any) -> list[int]:
    return [int(x) for x in encode_value(dtype, order, value)]


# ---------------------------------------------------------------------------------------------
# worked examples (module docstring)


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        (ABCD, [0x42F6, 0xE979]),
        (CDAB, [0xE979, 0x42F6]),
        (BADC, [0xF642, 0x79E9]),
        (DCBA, [0x79E9, 0xF642]),
    ],
)
def test_float32_worked_example(order: Order, expected: list[int]) -> None:
    assert regs(FLOAT32, order, 123.456) == expected
    assert decode_registers(FLOAT32, order, np.array(expected, np.uint16)) == pytest.approx(
        123.456, rel=1e-7
    )
    assert decode_registers(FLOAT32, order, expected) == float(np.float32(123.456))


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        (ABCD, [0x0102, 0x0304, 0x0506, 0x0708]),
        (CDAB, [0x0708, 0x0506, 0x0304, 0x0102]),
        (BADC, [0x0201, 0x0403, 0x0605, 0x0807]),
        (DCBA, [0x0807, 0x0605, 0x0403, 0x0201]),
    ],
)
def test_64bit_convention(order: Order, expected: list[int]) -> None:
    v = 0x0102030405060708
    assert regs(UINT64, order, v) == expected
    assert regs(INT64, order, v) == expected
    assert decode_registers(UINT64, order, expected) == v
    assert encode_batch(UINT64, order, [v]).tolist() == [expected]
    assert decode_batch(UINT64, order, expected, [0]).tolist() == [v]


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        (ABCD, [0x0102, 0x0304]),
        (CDAB, [0x0304, 0x0102]),
        (BADC, [0x0201, 0x0403]),
        (DCBA, [0x0403, 0x0201]),
    ],
)
def test_32bit_int_orders(order: Order, expected: list[int]) -> None:
    assert regs(UINT32, order, 0x01020304) == expected


def test_16bit_sees_only_byte_swap() -> None:
    assert regs(UINT16, ABCD, 0x1234) == regs(UINT16, CDAB, 0x1234) == [0x1234]
    assert regs(UINT16, BADC, 0x1234) == regs(UINT16, DCBA, 0x1234) == [0x3412]
    assert regs(INT16, ABCD, -2) == [0xFFFE]
    assert regs(INT16, BADC, -2) == [0xFEFF]


def test_float64_known_pattern() -> None:
    # 1.0 = 0x3FF0000000000000; -2.5 = 0xC004000000000000
    assert regs(FLOAT64, ABCD, 1.0) == [0x3FF0, 0, 0, 0]
    assert regs(FLOAT64, CDAB, 1.0) == [0, 0, 0, 0x3FF0]
    assert regs(FLOAT64, BADC, -2.5) == [0x04C0, 0, 0, 0]
    assert regs(FLOAT64, DCBA, -2.5) == [0, 0, 0, 0x04C0]
    assert decode_registers(FLOAT64, ABCD, [0x4009, 0x21FB, 0x5444, 0x2D18]) == math.pi


def test_float_specials() -> None:
    for dt in (FLOAT32, FLOAT64):
        assert math.isnan(decode_registers(dt, ABCD, encode_value(dt, ABCD, math.nan)))
        assert decode_registers(dt, DCBA, encode_value(dt, DCBA, -math.inf)) == -math.inf
    assert regs(FLOAT32, ABCD, -0.0) == [0x8000, 0]
    with pytest.raises(ValueError):
        encode_value(FLOAT32, ABCD, 1e39)
    with pytest.raises(ValueError):
        encode_batch(FLOAT32, ABCD, [1.0, 1e39])


# ---------------------------------------------------------------------------------------------
# integer limits


INT_LIMITS = {
    INT16: (-(2**15), 2**15 - 1),
    UINT16: (0, 2**16 - 1),
    INT32: (-(2**31), 2**31 - 1),
    UINT32: (0, 2**32 - 1),
    INT64: (-(2**63), 2**63 - 1),
    UINT64: (0, 2**64 - 1),
}


@pytest.mark.parametrize("dtype", list(INT_LIMITS))
@pytest.mark.parametrize("order", list(Order))
def test_int_min_max(dtype: ModbusType, order: Order) -> None:
    lo, hi = INT_LIMITS[dtype]
    for v in (lo, hi, 0, 1):
        r = encode_value(dtype, order, v)
        assert r.dtype == np.uint16 and r.shape == (dtype.width,)
        assert decode_registers(dtype, order, r) == v
        assert encode_batch(dtype, order, [v]).tolist() == [r.tolist()]
        assert decode_batch(dtype, order, r, [0]).tolist() == [v]
    for bad in (lo - 1, hi + 1):
        with pytest.raises(ValueError):
            encode_value(dtype, order, bad)
        with pytest.raises(ValueError):
            encode_batch(dtype, order, [0, bad])


def test_int_patterns() -> None:
    assert regs(INT16, ABCD, -(2**15)) == [0x8000]
    assert regs(INT32, ABCD, -1) == [0xFFFF, 0xFFFF]
    assert regs(INT32, CDAB, -(2**31)) == [0x0000, 0x8000]
    assert regs(INT64, ABCD, -(2**63)) == [0x8000, 0, 0, 0]
    assert regs(UINT64, DCBA, 2**64 - 1) == [0xFFFF] * 4


def test_int_rejects_fractions_and_strings() -> None:
    assert regs(INT16, ABCD, 3.0) == [3]
    with pytest.raises(ValueError):
        encode_value(INT16, ABCD, 3.5)
    with pytest.raises(TypeError):
        encode_value(INT16, ABCD, "3")
    with pytest.raises(ValueError):
        encode_batch(INT32, ABCD, [1.0, 2.5])
    assert encode_batch(INT32, ABCD, np.array([1.0, -2.0])).tolist() == [[0, 1], [0xFFFF, 0xFFFE]]
    with pytest.raises(ValueError):
        encode_batch(INT64, ABCD, np.array([float(2**63)]))
    with pytest.raises(ValueError):
        encode_batch(INT16, ABCD, np.array([40000], np.int64))
    big = [1, 2**64 - 1]  # numpy alone would guess float64 for this list
    assert encode_batch(UINT64, ABCD, big).tolist() == [[0, 0, 0, 1], [0xFFFF] * 4]


def test_register_count_checked() -> None:
    with pytest.raises(ValueError):
        decode_registers(FLOAT32, ABCD, [1])
    with pytest.raises(ValueError):
        decode_registers(UINT16, ABCD, [70000])


# ---------------------------------------------------------------------------------------------
# strings, bools, bits


def test_strings() -> None:
    s = string(3)
    assert regs(s, ABCD, "AB") == [0x4142, 0, 0]
    assert regs(s, BADC, "ABC") == [0x4241, 0x0043, 0]
    assert regs(s, CDAB, "ABC") == [0x4142, 0x4300, 0]  # word swap does not apply
    assert regs(string(2, pad=" "), ABCD, "A") == [0x4120, 0x2020]
    assert decode_registers(s, ABCD, [0x4142, 0x4300, 0x4444]) == "ABC"  # stops at NUL
    assert decode_registers(string(2, pad=" "), ABCD, [0x4120, 0x2020]) == "A"
    assert decode_registers(s, DCBA, [0x4241, 0x0043, 0]) == "ABC"
    assert decode_registers(s, ABCD, [0x4142, 0x4344, 0x4546]) == "ABCDEF"  # full, no terminator
    with pytest.raises(ValueError):
        encode_value(s, ABCD, "ABCDEFG")
    with pytest.raises(UnicodeEncodeError):
        encode_value(s, ABCD, "é")
    u = string(3, encoding="utf-8")
    assert decode_registers(u, ABCD, encode_value(u, ABCD, "é€")) == "é€"
    with pytest.raises(ValueError):
        string(1, pad="x")


def test_bool_in_register_and_coil_bits() -> None:
    assert regs(BOOL, ABCD, True) == [1]
    assert regs(BOOL, ABCD, False) == [0]
    assert decode_registers(BOOL, ABCD, [0x0100]) is True
    assert decode_batch(BOOL, ABCD, [0, 5, 0], [0, 1, 2]).tolist() == [False, True, False]
    assert pack_bits([1, 0, 1, 1, 0, 0, 1, 1, 1, 0]) == bytes([0xCD, 0x01])
    assert unpack_bits(bytes([0xCD, 0x01]), 10).tolist() == [
        True,
        False,
        True,
        True,
        False,
        False,
        True,
        True,
        True,
        False,
    ]
    with pytest.raises(ValueError):
        unpack_bits(b"\x00", 9)


def test_bit_in_register() -> None:
    assert regs(bit(0), ABCD, True) == [0x0001]
    assert regs(bit(15), ABCD, True) == [0x8000]
    assert regs(bit(3), ABCD, False) == [0]
    assert regs(bit(0), BADC, True) == [0x0100]  # bit 0 of the byte-swapped value
    for b in range(16):
        assert decode_registers(bit(b), ABCD, [1 << b]) is True
        assert decode_registers(bit(b), ABCD, [0xFFFF ^ (1 << b)]) is False
        assert decode_registers(bit(b), DCBA, encode_value(bit(b), DCBA, True)) is True
    with pytest.raises(ValueError):
        bit(16)
    block = np.array([0b1010, 0x8001], np.uint16)
    got = decode_batch(bit(0), ABCD, block, [0, 0, 0, 1, 1], bits=[0, 1, 3, 15, 0])
    assert got.tolist() == [False, True, True, True, True]
    assert decode_batch(bit(1), ABCD, block, [0, 1]).tolist() == [True, False]
    assert decode_batch(bit(0), BADC, np.array([0x0100], np.uint16), [0]).tolist() == [True]


def test_set_bit_and_masks() -> None:
    assert set_bit(0x1230, bit(0), ABCD, True) == 0x1231
    assert set_bit(0xFFFF, bit(15), ABCD, False) == 0x7FFF
    assert bit_masks(bit(2), ABCD, True) == (0xFFFB, 0x0004)
    assert bit_masks(bit(2), ABCD, False) == (0xFFFB, 0x0000)
    assert bit_masks(bit(2), BADC, True) == (0xFBFF, 0x0400)
    with pytest.raises(TypeError):
        bit_masks(INT16, ABCD, True)


# ---------------------------------------------------------------------------------------------
# wire helpers and type parsing


def test_wire_helpers() -> None:
    r = np.array([0x022B, 0x0000, 0x0064], np.uint16)
    assert to_wire_bytes(r) == bytes.fromhex("022B00000064")
    assert to_wire_bytes([1, 0xFFFF]) == b"\x00\x01\xff\xff"
    back = from_wire(bytes.fromhex("022B00000064"))
    assert back.dtype == np.uint16 and back.tolist() == r.tolist()
    with pytest.raises(ValueError):
        from_wire(b"\x00")


def test_type_parsing() -> None:
    assert ModbusType.parse("float32") == FLOAT32
    assert ModbusType.parse("Float32") == FLOAT32
    assert ModbusType.parse("UInt64") == UINT64
    assert ModbusType.parse("Boolean") == BOOL
    assert ModbusType.parse("bit:3") == bit(3)
    assert ModbusType.parse("bit[12]") == bit(12)
    assert ModbusType.parse("string:10") == string(10)
    assert ModbusType.parse("string[4]").width == 4
    assert Order.parse("cdab") is CDAB
    for bad in ("float", "bit", "string", "int16:2", "bit:16", "string:0", "x y"):
        with pytest.raises(ValueError):
            ModbusType.parse(bad)
    with pytest.raises(ValueError):
        Order.parse("ACBD")
    assert [t.width for t in NUMERIC] == [1, 1, 2, 2, 4, 4, 2, 4]


# ---------------------------------------------------------------------------------------------
# batch decoders == scalar decoder


@pytest.mark.parametrize("dtype", NUMERIC)
@pytest.mark.parametrize("order", list(Order))
def test_batch_matches_scalar(dtype: ModbusType, order: Order) -> None:
    rng = np.random.default_rng(42)
    block = rng.integers(0, 0x10000, size=125, dtype=np.uint16)
    offsets = rng.integers(0, 125 - dtype.width + 1, size=300)  # overlapping, unordered
    got = decode_batch(dtype, order, block, offsets)
    assert got.dtype == dtype.numpy_dtype
    expected = [decode_registers(dtype, order, block[o : o + dtype.width]) for o in offsets]
    np.testing.assert_array_equal(got, np.array(expected, dtype=dtype.numpy_dtype))
    dec = BatchDecoder(dtype, order, offsets)
    np.testing.assert_array_equal(dec(block), got)
    np.testing.assert_array_equal(dec(block.tolist()), got)
    np.testing.assert_array_equal(dec.from_wire(to_wire_bytes(block)), got)


def test_batch_strings_and_errors() -> None:
    s = string(2)
    block = np.concatenate([encode_value(s, BADC, "ab"), encode_value(s, BADC, "xyz")])
    assert decode_batch(s, BADC, block, [0, 2]).tolist() == ["ab", "xyz"]
    assert encode_batch(s, BADC, ["ab", "xyz"]).reshape(-1).tolist() == block.tolist()
    with pytest.raises(ValueError):
        decode_batch(FLOAT32, ABCD, np.zeros(4, np.uint16), [3])  # runs off the block
    with pytest.raises(ValueError):
        BatchDecoder(FLOAT32, ABCD, [-1])
    with pytest.raises(ValueError):
        BatchDecoder(FLOAT32, ABCD, [0], bits=[1])
    assert decode_batch(FLOAT32, ABCD, np.zeros(4, np.uint16), []).shape == (0,)


def test_encode_batch_shape_and_scalar_agreement() -> None:
    vals = [0.0, 1.5, -123.456, 3.4e38]
    for order in Order:
        out = encode_batch(FLOAT32, order, vals)
        assert out.shape == (4, 2) and out.dtype == np.uint16
        assert out.tolist() == [regs(FLOAT32, order, v) for v in vals]
    assert encode_batch(bit(2), ABCD, [True, False]).tolist() == [[4], [0]]
    assert encode_batch(BOOL, ABCD, [True, False]).tolist() == [[1], [0]]


# ---------------------------------------------------------------------------------------------
# round-trip properties, every dtype and order

VALUES = {
    Kind.INT16: st.integers(-(2**15), 2**15 - 1),
    Kind.UINT16: st.integers(0, 2**16 - 1),
    Kind.INT32: st.integers(-(2**31), 2**31 - 1),
    Kind.UINT32: st.integers(0, 2**32 - 1),
    Kind.INT64: st.integers(-(2**63), 2**63 - 1),
    Kind.UINT64: st.integers(0, 2**64 - 1),
    Kind.FLOAT32: st.floats(width=32, allow_nan=False),
    Kind.FLOAT64: st.floats(allow_nan=False),
}


# pytest-twisted 1.14.3 rewrites the shared ``hypothesis.inner_test`` of each collected item, so
# @given combined with @pytest.mark.parametrize nests blockon calls and fails from the second
# case on. Every property below therefore loops over all dtypes and orders inside one example.


@settings(deadline=None)  # no timing assertions: the machine may be loaded
@given(data=st.data())
def test_round_trip_numeric(data: st.DataObject) -> None:
    for dtype in NUMERIC:
        values = data.draw(st.lists(VALUES[dtype.kind], min_size=1, max_size=8), dtype.kind.value)
        offsets = np.arange(len(values)) * dtype.width
        for order in Order:
            for v in values:
                assert decode_registers(dtype, order, encode_value(dtype, order, v)) == v
            block = encode_batch(dtype, order, values).reshape(-1)
            assert decode_batch(dtype, order, block, offsets).tolist() == values


@settings(deadline=None)  # no timing assertions: the machine may be loaded
@given(text=st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=20))
def test_round_trip_string(text: str) -> None:
    s = string(10)
    for order in Order:
        assert decode_registers(s, order, encode_value(s, order, text)) == text


@settings(deadline=None)  # no timing assertions: the machine may be loaded
@given(
    text=st.text(
        st.characters(min_codepoint=33, max_codepoint=0x10FFFF, exclude_categories=["Cs"]),
        max_size=5,
    )
)
def test_round_trip_utf8_space_padded(text: str) -> None:
    s = string(10, encoding="utf-8", pad=" ")
    for order in Order:
        assert decode_registers(s, order, encode_value(s, order, text)) == text


@settings(deadline=None)  # no timing assertions: the machine may be loaded
@given(index=st.integers(0, 15), value=st.booleans(), current=st.integers(0, 0xFFFF))
def test_round_trip_bit(index: int, value: bool, current: int) -> None:
    b = bit(index)
    for order in Order:
        assert decode_registers(b, order, encode_value(b, order, value)) is value
        merged = set_bit(current, b, order, value)
        assert decode_registers(b, order, [merged]) is value
        # the other 15 bits are untouched
        mask = (~bit_masks(b, order, True)[0]) & 0xFFFF
        assert merged & ~mask == current & ~mask


@settings(deadline=None)  # no timing assertions: the machine may be loaded
@given(st.lists(st.booleans(), max_size=2000))
def test_round_trip_coil_bits(bits: list[bool]) -> None:
    assert unpack_bits(pack_bits(bits), len(bits)).tolist() == bits


# ---------------------------------------------------------------------------------------------
# cross-check with pymodbus (its client mixin: word_order big = ABCD, little = CDAB)

PM = ModbusTcpClient.DATATYPE
PM_TYPES = [
    (INT16, PM.INT16, -1234),
    (UINT16, PM.UINT16, 0xBEEF),
    (INT32, PM.INT32, -123456789),
    (UINT32, PM.UINT32, 0xDEADBEEF),
    (INT64, PM.INT64, -(2**62) - 12345),
    (UINT64, PM.UINT64, 0x0102030405060708),
    (FLOAT32, PM.FLOAT32, float(np.float32(123.456))),
    (FLOAT64, PM.FLOAT64, -1.0e300 / 7),
]


@pytest.mark.parametrize(("dtype", "pm_type", "value"), PM_TYPES)
@pytest.mark.parametrize(("order", "word_order"), [(ABCD, "big"), (CDAB, "little")])
def test_matches_pymodbus(
    dtype: ModbusType,
    pm_type: Any,
    value: Any,
    order: Order,
    word_order: Literal["big", "little"],
) -> None:
    ours = regs(dtype, order, value)
    assert ModbusTcpClient.convert_to_registers(value, pm_type, word_order=word_order) == ours
    assert ModbusTcpClient.convert_from_registers(ours, pm_type, word_order=word_order) == value
    assert decode_registers(dtype, order, ours) == value


def test_string_matches_pymodbus() -> None:
    ours = regs(string(3), ABCD, "Hello")
    assert ModbusTcpClient.convert_to_registers("Hello", PM.STRING) == ours
    assert ModbusTcpClient.convert_from_registers(ours, PM.STRING) == "Hello"
