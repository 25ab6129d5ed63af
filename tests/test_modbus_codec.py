"""Byte-level tests of the sans-I/O Modbus TCP server codec.

Request/response PDUs are the examples of the MODBUS Application Protocol V1.1b3, section 6.x.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotserver.modbus.codec import (
    Access,
    DeviceIdCode,
    ExceptionCode,
    ExceptionResponse,
    Frame,
    FrameDecoder,
    MaskWrite,
    ModbusFramingError,
    ModbusUsageError,
    ReadBits,
    ReadDeviceId,
    ReadRegisters,
    ReadWriteRegisters,
    ReportServerId,
    Table,
    WriteCoil,
    WriteCoils,
    WriteRegister,
    WriteRegisters,
    device_id_response,
    encode_exception,
    encode_mask_write_response,
    encode_pdu,
    encode_read_bits_response,
    encode_read_device_id_response,
    encode_read_registers_response,
    encode_report_server_id_response,
    encode_write_coil_response,
    encode_write_multiple_response,
    encode_write_register_response,
    encode_write_response,
    parse_request,
)


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def adu(tid: int, unit: int, pdu: bytes) -> bytes:
    """Build an MBAP frame by hand (MB TCP 3.1.3)."""
    return (
        tid.to_bytes(2, "big")
        + b"\x00\x00"
        + (len(pdu) + 1).to_bytes(2, "big")
        + bytes([unit])
        + pdu
    )


def exc(fc: int, code: ExceptionCode) -> ExceptionResponse:
    return ExceptionResponse(fc, code)


# ---------------------------------------------------------------------------------------------
# framing


def test_single_frame() -> None:
    d = FrameDecoder()
    assert d.feed(h("0001 0000 0006 11 03006B0003")) == [Frame(1, 0x11, h("03006B0003"))]
    assert d.buffered == 0


def test_pipelined_frames_in_one_feed() -> None:
    data = b"".join(adu(t, 1, h("03 0000 0001")) for t in range(50))
    frames = FrameDecoder().feed(data)
    assert [f.transaction_id for f in frames] == list(range(50))
    assert all(f.pdu == h("0300000001") for f in frames)


def test_frame_split_byte_by_byte() -> None:
    data = adu(0xBEEF, 7, h("10 0001 0002 04 000A 0102")) + adu(2, 8, h("11"))
    d = FrameDecoder()
    got: list[Frame] = []
    for i in range(len(data)):
        got += d.feed(data[i : i + 1])
    assert got == [Frame(0xBEEF, 7, h("10 0001 0002 04 000A 0102")), Frame(2, 8, h("11"))]
    assert d.buffered == 0


@settings(deadline=None)  # no timing assertions: the machine may be loaded
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.data())
def test_any_split_gives_same_frames(sizes: list[int], data: st.DataObject) -> None:
    pdus = [bytes([3]) + bytes(range(n % 200)) for n in sizes]
    stream = b"".join(adu(i, i % 256, p) for i, p in enumerate(pdus))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    d = FrameDecoder()
    got: list[Frame] = []
    prev = 0
    for c in [*cuts, len(stream)]:
        got += d.feed(stream[prev:c])
        prev = c
    assert [f.pdu for f in got] == pdus
    assert [f.unit_id for f in got] == [i % 256 for i in range(len(pdus))]


def test_max_size_frame_accepted_and_partial_kept() -> None:
    pdu = h("10 0000 007B F6") + bytes(246)  # 252-byte PDU
    full = adu(1, 1, pdu) + adu(2, 1, bytes([0x2B]) + bytes(252))  # 253-byte PDU = length 254
    d = FrameDecoder()
    assert [len(f.pdu) for f in d.feed(full[:-1])] == [252]
    assert d.buffered == 259
    assert [len(f.pdu) for f in d.feed(full[-1:])] == [253]


def test_many_frames_linear() -> None:
    # 100k frames through 1000-byte chunks: the decoder keeps no more than the partial frame
    # after each chunk, so each chunk costs its own size (quadratic buffering would not)
    frame = adu(1, 1, h("0300000001"))
    data = frame * 100_000
    d = FrameDecoder()
    n = 0
    for i in range(0, len(data), 1000):
        n += len(d.feed(data[i : i + 1000]))
        assert d.buffered < len(frame)
    assert n == 100_000


@pytest.mark.parametrize(
    "header",
    [
        h("0001 0001 0006 01"),  # protocol id 1
        h("0001 FFFF 0006 01"),
        h("0001 0000 0000 01"),  # length 0
        h("0001 0000 0001 01"),  # length 1: unit id, no function code
        h("0001 0000 00FF 01"),  # length 255: PDU of 254 bytes
        h("0001 0000 FFFF 01"),
    ],
)
def test_mbap_errors(header: bytes) -> None:
    d = FrameDecoder()
    with pytest.raises(ModbusFramingError):
        d.feed(header + bytes(300))
    with pytest.raises(ModbusFramingError):  # stays dead
        d.feed(adu(1, 1, h("0300000001")))


def test_mbap_error_after_good_frame_in_same_feed() -> None:
    d = FrameDecoder()
    with pytest.raises(ModbusFramingError) as info:
        d.feed(adu(1, 1, h("0300000001")) + h("0002 0005 0006 01 0300000001"))
    assert info.value.frames == (Frame(1, 1, h("0300000001")),)
    with pytest.raises(ModbusFramingError) as again:
        d.feed(b"")
    assert again.value.frames == ()


def test_mbap_error_detected_before_body() -> None:
    with pytest.raises(ModbusFramingError):
        FrameDecoder().feed(h("0001 0000 0100"))


def test_max_frame_option() -> None:
    d = FrameDecoder(max_frame=20)
    assert len(d.feed(adu(1, 1, bytes([3]) + bytes(12)))) == 1  # 6 + 14 = 20
    with pytest.raises(ModbusFramingError):
        d.feed(adu(1, 1, bytes([3]) + bytes(13)))
    with pytest.raises(ValueError):
        FrameDecoder(max_frame=261)


# ---------------------------------------------------------------------------------------------
# request parsing: spec examples


def test_fc01_read_coils() -> None:
    assert parse_request(h("01 0013 0013")) == ReadBits(Table.COILS, 0x13, 19)


def test_fc02_read_discrete_inputs() -> None:
    r = parse_request(h("02 00C4 0016"))
    assert r == ReadBits(Table.DISCRETE_INPUTS, 0xC4, 22)
    assert isinstance(r, ReadBits) and r.function == 2


def test_fc03_read_holding_registers() -> None:
    r = parse_request(h("03 006B 0003"))
    assert r == ReadRegisters(Table.HOLDING_REGISTERS, 0x6B, 3)
    assert isinstance(r, ReadRegisters)
    assert r.accesses == (Access(Table.HOLDING_REGISTERS, 0x6B, 3, False),)


def test_fc04_read_input_registers() -> None:
    assert parse_request(h("04 0008 0001")) == ReadRegisters(Table.INPUT_REGISTERS, 8, 1)


def test_fc05_write_coil() -> None:
    assert parse_request(h("05 00AC FF00")) == WriteCoil(0xAC, True)
    assert parse_request(h("05 00AC 0000")) == WriteCoil(0xAC, False)


def test_fc06_write_register() -> None:
    assert parse_request(h("06 0001 0003")) == WriteRegister(1, 3)
    assert parse_request(h("06 FFFF FFFF")) == WriteRegister(0xFFFF, 0xFFFF)


def test_fc0f_write_coils() -> None:
    # spec 6.11: coils 20..29 = 1011 0011 / 01 (CD 01, LSB first)
    r = parse_request(h("0F 0013 000A 02 CD01"))
    assert r == WriteCoils(0x13, (True, False, True, True, False, False, True, True, True, False))
    assert isinstance(r, WriteCoils) and r.count == 10


def test_fc10_write_registers() -> None:
    r = parse_request(h("10 0001 0002 04 000A 0102"))
    assert r == WriteRegisters(1, h("000A0102"))
    assert isinstance(r, WriteRegisters)
    assert r.count == 2
    assert r.registers.tolist() == [0x000A, 0x0102]
    assert r.registers.dtype == np.uint16
    assert r.accesses == (Access(Table.HOLDING_REGISTERS, 1, 2, True),)


def test_fc11_report_server_id() -> None:
    assert parse_request(h("11")) == ReportServerId()


def test_fc16_mask_write() -> None:
    r = parse_request(h("16 0004 00F2 0025"))
    assert r == MaskWrite(4, 0x00F2, 0x0025)
    assert isinstance(r, MaskWrite)
    assert r.apply(0x12) == 0x17  # the spec's worked example


def test_fc17_read_write() -> None:
    r = parse_request(h("17 0003 0006 000E 0003 06 00FF 00FF 00FF"))
    assert r == ReadWriteRegisters(3, 6, 0x0E, h("00FF00FF00FF"))
    assert isinstance(r, ReadWriteRegisters)
    assert r.write_count == 3
    assert r.accesses == (
        Access(Table.HOLDING_REGISTERS, 0x0E, 3, True),
        Access(Table.HOLDING_REGISTERS, 3, 6, False),
    )


def test_fc2b_read_device_id() -> None:
    assert parse_request(h("2B 0E 01 00")) == ReadDeviceId(DeviceIdCode.BASIC, 0)
    assert parse_request(h("2B 0E 04 05")) == ReadDeviceId(DeviceIdCode.INDIVIDUAL, 5)


# ---------------------------------------------------------------------------------------------
# request parsing: every malformed class


IF, IA, IV = (
    ExceptionCode.ILLEGAL_FUNCTION,
    ExceptionCode.ILLEGAL_DATA_ADDRESS,
    ExceptionCode.ILLEGAL_DATA_VALUE,
)


@pytest.mark.parametrize(
    ("pdu", "expected"),
    [
        # unknown / unsupported function codes -> 01, echoed with the high bit by the encoder
        ("07", exc(0x07, IF)),
        ("08 0000 1234", exc(0x08, IF)),
        ("2A 0000 0001", exc(0x2A, IF)),
        ("00", exc(0x00, IF)),
        ("83 006B 0001", exc(0x83, IF)),
        ("2B 0D 00", exc(0x2B, IF)),  # MEI type other than 0x0E
        # quantity 0 / too large -> 03
        ("01 0000 0000", exc(0x01, IV)),
        ("01 0000 07D1", exc(0x01, IV)),
        ("02 0000 0000", exc(0x02, IV)),
        ("02 0000 07D1", exc(0x02, IV)),
        ("03 006B 0000", exc(0x03, IV)),
        ("03 006B 007E", exc(0x03, IV)),
        ("04 0000 0000", exc(0x04, IV)),
        ("04 0000 007E", exc(0x04, IV)),
        ("0F 0000 0000 00", exc(0x0F, IV)),
        ("0F 0000 07B1 F7" + "00" * 247, exc(0x0F, IV)),
        ("10 0000 0000 00", exc(0x10, IV)),
        ("10 0000 007C F8" + "00" * 248, exc(0x10, IV)),
        ("17 0000 0000 0000 0001 02 0000", exc(0x17, IV)),  # read quantity 0
        ("17 0000 007E 0000 0001 02 0000", exc(0x17, IV)),  # read quantity 126
        ("17 0000 0001 0000 0000 00", exc(0x17, IV)),  # write quantity 0
        ("17 0000 0001 0000 007A F4" + "00" * 244, exc(0x17, IV)),  # write quantity 122
        # byte count mismatch -> 03
        ("0F 0013 000A 01 CD", exc(0x0F, IV)),
        ("0F 0013 000A 03 CD0100", exc(0x0F, IV)),
        ("0F 0013 000A 02 CD", exc(0x0F, IV)),  # count right, data short
        ("0F 0013 000A 02 CD0100", exc(0x0F, IV)),  # data long
        ("10 0001 0002 03 000A01", exc(0x10, IV)),
        ("10 0001 0002 04 000A01", exc(0x10, IV)),
        ("10 0001 0002 04 000A010203", exc(0x10, IV)),
        ("17 0003 0006 000E 0003 04 00FF00FF", exc(0x17, IV)),
        ("17 0003 0006 000E 0003 06 00FF00FF", exc(0x17, IV)),
        # address + quantity beyond 65536 -> 02 (quantity checked first)
        ("01 FFFF 0002", exc(0x01, IA)),
        ("02 F831 07D0", exc(0x02, IA)),
        ("03 FFFF 0002", exc(0x03, IA)),
        ("04 FF84 007D", exc(0x04, IA)),
        ("0F FFFF 0002 01 03", exc(0x0F, IA)),
        ("10 FFFF 0002 04 00000000", exc(0x10, IA)),
        ("17 FFFF 0002 0000 0001 02 0000", exc(0x17, IA)),
        ("17 0000 0001 FFFF 0002 04 00000000", exc(0x17, IA)),
        ("03 FFFF 0000", exc(0x03, IV)),  # both wrong: quantity wins (03 before 02)
        # FC05 value other than 0x0000 / 0xFF00 -> 03
        ("05 00AC 0001", exc(0x05, IV)),
        ("05 00AC FFFF", exc(0x05, IV)),
        ("05 00AC 00FF", exc(0x05, IV)),
        # short (or long) PDU for its function -> 03, not a connection close
        ("01", exc(0x01, IV)),
        ("03 006B", exc(0x03, IV)),
        ("03 006B 00", exc(0x03, IV)),
        ("03 006B 0003 00", exc(0x03, IV)),
        ("04 00", exc(0x04, IV)),
        ("05 00AC FF", exc(0x05, IV)),
        ("06 0001", exc(0x06, IV)),
        ("0F 0013 000A", exc(0x0F, IV)),
        ("10 0001 0002", exc(0x10, IV)),
        ("11 00", exc(0x11, IV)),
        ("16 0004 00F2 00", exc(0x16, IV)),
        ("17 0003 0006 000E", exc(0x17, IV)),
        ("2B", exc(0x2B, IV)),
        ("2B 0E 01", exc(0x2B, IV)),
        # read device id code outside 01..04 -> 03
        ("2B 0E 00 00", exc(0x2B, IV)),
        ("2B 0E 05 00", exc(0x2B, IV)),
    ],
)
def test_malformed_requests(pdu: str, expected: ExceptionResponse) -> None:
    assert parse_request(h(pdu)) == expected


@pytest.mark.parametrize(
    ("pdu", "expected"),
    [
        ("01 0000 07D0", ReadBits(Table.COILS, 0, 2000)),
        ("01 F830 07D0", ReadBits(Table.COILS, 0xF830, 2000)),  # ends exactly at 65535
        ("03 FF83 007D", ReadRegisters(Table.HOLDING_REGISTERS, 0xFF83, 125)),
        ("03 FFFF 0001", ReadRegisters(Table.HOLDING_REGISTERS, 0xFFFF, 1)),
    ],
)
def test_boundaries_accepted(pdu: str, expected: object) -> None:
    assert parse_request(h(pdu)) == expected


def test_write_limits_accepted() -> None:
    r = parse_request(h("0F 0000 07B0 F6") + b"\xff" * 246)
    assert isinstance(r, WriteCoils) and r.count == 1968 and all(r.values)
    r2 = parse_request(h("10 0000 007B F6") + bytes(246))
    assert isinstance(r2, WriteRegisters) and r2.count == 123
    r3 = parse_request(h("17 0000 007D 0000 0079 F2") + bytes(242))
    assert isinstance(r3, ReadWriteRegisters) and r3.read_count == 125 and r3.write_count == 121


def test_fc0f_ignores_padding_bits() -> None:
    r = parse_request(h("0F 0000 0003 01 FF"))
    assert r == WriteCoils(0, (True, True, True))


def test_unsupported_function_can_be_turned_off() -> None:
    assert parse_request(h("11"), supported=frozenset({3})) == exc(0x11, IF)
    assert parse_request(h("03 0000 0001"), supported=frozenset({3})) == ReadRegisters(
        Table.HOLDING_REGISTERS, 0, 1
    )


@settings(deadline=None)  # no timing assertions: the machine may be loaded
@given(st.binary(min_size=1, max_size=253))
def test_parse_never_raises(pdu: bytes) -> None:
    r = parse_request(pdu)
    if isinstance(r, ExceptionResponse):
        assert r.function == pdu[0]
        assert r.code in (IF, IA, IV)
    else:
        assert r.function == pdu[0]


# ---------------------------------------------------------------------------------------------
# responses


def test_read_registers_response_spec_example() -> None:
    got = encode_read_registers_response(0x1234, 0x11, 0x03, h("022B 0000 0064"))
    assert got == h("1234 0000 0009 11") + h("03 06 022B 0000 0064")
    assert encode_read_registers_response(1, 1, 4, memoryview(h("000A"))) == adu(
        1, 1, h("04 02 000A")
    )


def test_read_write_registers_response_spec_example() -> None:
    regs = h("00FE 0ACD 0001 0003 000D 00FF")
    assert encode_read_registers_response(5, 1, 0x17, regs) == adu(5, 1, h("17 0C") + regs)


@pytest.mark.parametrize("n", [0, 1, 3, 252])
def test_read_registers_response_bad_length(n: int) -> None:
    with pytest.raises(ModbusUsageError):
        encode_read_registers_response(1, 1, 3, bytes(n))


def test_read_coils_response_spec_example() -> None:
    # spec 6.1: coils 20..38 -> CD 6B 05
    bits = np.array([int(c) for c in "1011001111010110101"], dtype=bool)
    assert encode_read_bits_response(1, 1, 0x01, bits) == adu(1, 1, h("01 03 CD 6B 05"))
    assert encode_read_bits_response(1, 1, 0x01, h("CD6B05")) == adu(1, 1, h("01 03 CD 6B 05"))


def test_read_discrete_inputs_response_spec_example() -> None:
    # spec 6.2: inputs 197..218 -> AC DB 35
    packed = h("AC DB 35")
    bits = np.unpackbits(np.frombuffer(packed, np.uint8), bitorder="little")[:22].astype(bool)
    assert encode_read_bits_response(9, 3, 0x02, bits) == adu(9, 3, h("02 03") + packed)


def test_read_bits_response_limits() -> None:
    assert encode_read_bits_response(1, 1, 1, np.ones(2000, bool)) == adu(
        1, 1, h("01 FA") + b"\xff" * 250
    )
    with pytest.raises(ModbusUsageError):
        encode_read_bits_response(1, 1, 1, np.zeros(0, bool))


def test_echo_responses() -> None:
    assert encode_write_coil_response(1, 1, 0xAC, True) == adu(1, 1, h("05 00AC FF00"))
    assert encode_write_coil_response(1, 1, 0xAC, False) == adu(1, 1, h("05 00AC 0000"))
    assert encode_write_register_response(1, 1, 1, 3) == adu(1, 1, h("06 0001 0003"))
    assert encode_write_multiple_response(1, 1, 0x0F, 0x13, 10) == adu(1, 1, h("0F 0013 000A"))
    assert encode_write_multiple_response(1, 1, 0x10, 1, 2) == adu(1, 1, h("10 0001 0002"))
    assert encode_mask_write_response(1, 1, 4, 0xF2, 0x25) == adu(1, 1, h("16 0004 00F2 0025"))


@pytest.mark.parametrize(
    "pdu",
    [
        "05 00AC FF00",
        "05 00AC 0000",
        "06 0001 0003",
        "16 0004 00F2 0025",
    ],
)
def test_single_writes_echo_request(pdu: str) -> None:
    req = parse_request(h(pdu))
    assert isinstance(req, (WriteCoil, WriteRegister, MaskWrite))
    assert encode_write_response(7, 2, req) == adu(7, 2, h(pdu))


def test_multiple_write_responses_from_request() -> None:
    req = parse_request(h("0F 0013 000A 02 CD01"))
    assert isinstance(req, WriteCoils)
    assert encode_write_response(7, 2, req) == adu(7, 2, h("0F 0013 000A"))
    req2 = parse_request(h("10 0001 0002 04 000A 0102"))
    assert isinstance(req2, WriteRegisters)
    assert encode_write_response(7, 2, req2) == adu(7, 2, h("10 0001 0002"))


def test_exception_responses() -> None:
    # spec 7 example: read coils at an address the server lacks -> 81 02
    assert encode_exception(1, 1, 0x01, ExceptionCode.ILLEGAL_DATA_ADDRESS) == adu(1, 1, h("8102"))
    # unknown function code -> fc|0x80, 01
    assert encode_exception(0xFFFF, 0xFF, 0x07, IF) == h("FFFF 0000 0003 FF 87 01")
    assert encode_exception(1, 1, 0x2B, IV) == adu(1, 1, h("AB 03"))
    assert encode_exception(1, 1, 0x83, IF) == adu(1, 1, h("83 01"))


def test_exception_code_values() -> None:
    assert [int(c) for c in ExceptionCode] == [1, 2, 3, 4, 5, 6, 8, 0x0A, 0x0B]
    assert int(ExceptionCode.GATEWAY_TARGET_DEVICE_FAILED_TO_RESPOND) == 0x0B


def test_report_server_id_response() -> None:
    assert encode_report_server_id_response(1, 1, b"IOT", True) == adu(1, 1, h("11 04 494F54 FF"))
    assert encode_report_server_id_response(1, 1, b"\x2a", False, b"x") == adu(
        1, 1, h("11 03 2A 00 78")
    )


def test_encode_pdu_limits() -> None:
    assert encode_pdu(1, 2, h("0300")) == h("0001 0000 0003 02 0300")
    with pytest.raises(ModbusUsageError):
        encode_pdu(1, 1, b"")
    with pytest.raises(ModbusUsageError):
        encode_pdu(1, 1, bytes(254))


OBJECTS = {0: b"Company identification", 1: b"Product code XX", 2: b"V2.11"}


def test_read_device_id_spec_example() -> None:
    # spec 6.21 example, basic stream from object 0, all in one response
    expected_body = (
        h("00 16")
        + b"Company identification"
        + h("01 0F")
        + b"Product code XX"
        + h("02 05")
        + b"V2.11"
    )
    got = encode_read_device_id_response(1, 1, 0x01, 0x01, sorted(OBJECTS.items()))
    assert got == adu(1, 1, h("2B 0E 01 01 00 00 03") + expected_body)
    req = parse_request(h("2B 0E 01 00"))
    assert isinstance(req, ReadDeviceId)
    assert device_id_response(1, 1, req, OBJECTS) == adu(
        1, 1, h("2B 0E 01 81 00 00 03") + expected_body
    )


def test_read_device_id_individual_and_missing() -> None:
    objs = {**OBJECTS, 0x05: b"Model", 0x80: b"ext"}
    assert device_id_response(1, 1, ReadDeviceId(DeviceIdCode.INDIVIDUAL, 5), objs) == adu(
        1, 1, h("2B 0E 04 83 00 00 01 05 05") + b"Model"
    )
    assert device_id_response(1, 1, ReadDeviceId(DeviceIdCode.INDIVIDUAL, 9), objs) == adu(
        1, 1, h("AB 02")
    )
    # regular stream excludes extended objects; an unknown start restarts at 0
    got = device_id_response(1, 1, ReadDeviceId(DeviceIdCode.REGULAR, 0x42), objs)
    assert got[7:14] == h("2B 0E 02 83 00 00 04")
    # stream from object 2
    got = device_id_response(1, 1, ReadDeviceId(DeviceIdCode.BASIC, 2), objs)
    assert got == adu(1, 1, h("2B 0E 01 83 00 00 01 02 05") + b"V2.11")


def test_read_device_id_more_follows() -> None:
    objs = {0: b"a" * 200, 1: b"b" * 200, 2: b"c"}
    first = device_id_response(1, 1, ReadDeviceId(DeviceIdCode.BASIC, 0), objs)
    assert first[7:14] == h("2B 0E 01 81 FF 01 01")
    second = device_id_response(1, 1, ReadDeviceId(DeviceIdCode.BASIC, 1), objs)
    assert second[7:14] == h("2B 0E 01 81 00 00 02")


def test_end_to_end_decode_parse_encode() -> None:
    d = FrameDecoder()
    stream = adu(1, 1, h("03 006B 0003")) + adu(2, 1, h("07")) + adu(3, 1, h("03 006B 0000"))
    out = []
    image = np.zeros(200, dtype=">u2")
    image[0x6B:0x6E] = [0x022B, 0, 0x64]
    for f in d.feed(stream):
        r = parse_request(f.pdu)
        if isinstance(r, ExceptionResponse):
            out.append(encode_exception(f.transaction_id, f.unit_id, r.function, r.code))
        else:
            assert isinstance(r, ReadRegisters)
            raw = image[r.address : r.address + r.count].tobytes()
            out.append(encode_read_registers_response(f.transaction_id, f.unit_id, 3, raw))
    assert out == [
        adu(1, 1, h("03 06 022B 0000 0064")),
        adu(2, 1, h("87 01")),
        adu(3, 1, h("83 03")),
    ]


def test_pymodbus_client_framer_agrees() -> None:
    """pymodbus' client-side framer reads our responses; we parse its requests (no sockets)."""
    from pymodbus.framer import FramerSocket
    from pymodbus.pdu import DecodePDU
    from pymodbus.pdu.bit_message import ReadCoilsRequest
    from pymodbus.pdu.register_message import (
        ReadHoldingRegistersRequest,
        WriteMultipleRegistersRequest,
    )

    client = FramerSocket(DecodePDU(False))
    raw = client.buildFrame(
        ReadHoldingRegistersRequest(address=0x6B, count=3, dev_id=17, transaction_id=9)
    )
    (frame,) = FrameDecoder().feed(raw)
    assert (frame.transaction_id, frame.unit_id) == (9, 17)
    assert parse_request(frame.pdu) == ReadRegisters(Table.HOLDING_REGISTERS, 0x6B, 3)
    raw = client.buildFrame(
        WriteMultipleRegistersRequest(address=5, registers=[1, 0xFFFF], dev_id=1, transaction_id=1)
    )
    assert parse_request(FrameDecoder().feed(raw)[0].pdu) == WriteRegisters(5, h("0001FFFF"))
    raw = client.buildFrame(ReadCoilsRequest(address=0x13, count=19, dev_id=1, transaction_id=1))
    assert parse_request(FrameDecoder().feed(raw)[0].pdu) == ReadBits(Table.COILS, 0x13, 19)

    _, rsp = client.handleFrame(encode_read_registers_response(9, 17, 3, h("022B00000064")), 0, 0)
    assert rsp is not None and rsp.registers == [0x022B, 0, 0x64]
    assert (rsp.transaction_id, rsp.dev_id) == (9, 17)
    bits = np.array([int(c) for c in "1011001111010110101"], dtype=bool)
    _, rsp = client.handleFrame(encode_read_bits_response(2, 1, 1, bits), 0, 0)
    assert rsp is not None and rsp.bits[:19] == bits.tolist()
    _, rsp = client.handleFrame(encode_exception(3, 1, 3, IV), 0, 0)
    assert rsp is not None and rsp.function_code == 0x83 and rsp.exception_code == 3
