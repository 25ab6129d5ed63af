"""Modbus request PDUs: one frozen dataclass per supported function (with the ``accesses``
the server checks against its map), ``ExceptionResponse``, and ``parse_request``, which
validates a request PDU in the order of each function's state diagram in MB AP 6.x.
Re-exported by ``iotserver.modbus.codec``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from iotserver.modbus.encoding import from_wire, unpack_bits
from iotserver.modbus.mbap import (
    _ADDRESS_SPACE,
    ALL_FUNCTIONS,
    DeviceIdCode,
    ExceptionCode,
    MeiType,
    Table,
)


@dataclass(frozen=True, slots=True)
class Access:
    """One range a request touches; the server checks it against its map (-> exception 02)."""

    table: Table
    address: int
    count: int
    write: bool


@dataclass(frozen=True, slots=True)
class ReadBits:
    """FC01 Read Coils / FC02 Read Discrete Inputs (MB AP 6.1, 6.2)."""

    table: Table
    address: int
    count: int

    @property
    def function(self) -> int:
        return 0x01 if self.table is Table.COILS else 0x02

    @property
    def accesses(self) -> tuple[Access, ...]:
        return (Access(self.table, self.address, self.count, False),)


@dataclass(frozen=True, slots=True)
class ReadRegisters:
    """FC03 Read Holding Registers / FC04 Read Input Registers (MB AP 6.3, 6.4)."""

    table: Table
    address: int
    count: int

    @property
    def function(self) -> int:
        return 0x03 if self.table is Table.HOLDING_REGISTERS else 0x04

    @property
    def accesses(self) -> tuple[Access, ...]:
        return (Access(self.table, self.address, self.count, False),)


@dataclass(frozen=True, slots=True)
class WriteCoil:
    """FC05 Write Single Coil (MB AP 6.5)."""

    address: int
    value: bool
    function = 0x05
    table = Table.COILS
    count = 1

    @property
    def accesses(self) -> tuple[Access, ...]:
        return (Access(Table.COILS, self.address, 1, True),)


@dataclass(frozen=True, slots=True)
class WriteRegister:
    """FC06 Write Single Register (MB AP 6.6); any 16-bit value."""

    address: int
    value: int
    function = 0x06
    table = Table.HOLDING_REGISTERS
    count = 1

    @property
    def accesses(self) -> tuple[Access, ...]:
        return (Access(Table.HOLDING_REGISTERS, self.address, 1, True),)


@dataclass(frozen=True, slots=True)
class WriteCoils:
    """FC0F Write Multiple Coils (MB AP 6.11)."""

    address: int
    values: tuple[bool, ...]
    function = 0x0F
    table = Table.COILS

    @property
    def count(self) -> int:
        return len(self.values)

    @property
    def accesses(self) -> tuple[Access, ...]:
        return (Access(Table.COILS, self.address, len(self.values), True),)


@dataclass(frozen=True, slots=True)
class WriteRegisters:
    """FC10 Write Multiple Registers (MB AP 6.12).

    ``values`` are the big-endian wire bytes, ready to copy into a preencoded register image;
    :attr:`registers` gives them as native uint16.
    """

    address: int
    values: bytes
    function = 0x10
    table = Table.HOLDING_REGISTERS

    @property
    def count(self) -> int:
        return len(self.values) // 2

    @property
    def registers(self) -> npt.NDArray[np.uint16]:
        return from_wire(self.values)

    @property
    def accesses(self) -> tuple[Access, ...]:
        return (Access(Table.HOLDING_REGISTERS, self.address, len(self.values) // 2, True),)


@dataclass(frozen=True, slots=True)
class MaskWrite:
    """FC16 Mask Write Register (MB AP 6.16)."""

    address: int
    and_mask: int
    or_mask: int
    function = 0x16
    table = Table.HOLDING_REGISTERS
    count = 1

    def apply(self, current: int) -> int:
        """MB AP 6.16: (current AND and_mask) OR (or_mask AND NOT and_mask)."""
        return (current & self.and_mask) | (self.or_mask & ~self.and_mask & 0xFFFF)

    @property
    def accesses(self) -> tuple[Access, ...]:
        # a read-modify-write: the register must be both readable and writable
        return (Access(Table.HOLDING_REGISTERS, self.address, 1, True),)


@dataclass(frozen=True, slots=True)
class ReadWriteRegisters:
    """FC17 Read/Write Multiple Registers (MB AP 6.17); the write happens before the read."""

    read_address: int
    read_count: int
    write_address: int
    values: bytes
    function = 0x17
    table = Table.HOLDING_REGISTERS

    @property
    def write_count(self) -> int:
        return len(self.values) // 2

    @property
    def registers(self) -> npt.NDArray[np.uint16]:
        return from_wire(self.values)

    @property
    def accesses(self) -> tuple[Access, ...]:
        return (
            Access(Table.HOLDING_REGISTERS, self.write_address, len(self.values) // 2, True),
            Access(Table.HOLDING_REGISTERS, self.read_address, self.read_count, False),
        )


@dataclass(frozen=True, slots=True)
class ReportServerId:
    """FC11 Report Server ID (MB AP 6.13)."""

    function = 0x11
    accesses: ClassVar[tuple[Access, ...]] = ()


@dataclass(frozen=True, slots=True)
class ReadDeviceId:
    """FC2B / MEI 0x0E Read Device Identification (MB AP 6.21)."""

    code: DeviceIdCode
    object_id: int
    function = 0x2B
    accesses: ClassVar[tuple[Access, ...]] = ()


@dataclass(frozen=True, slots=True)
class ExceptionResponse:
    """A request that failed validation: answer ``function | 0x80`` with ``code``."""

    function: int
    code: ExceptionCode


Request = (
    ReadBits
    | ReadRegisters
    | WriteCoil
    | WriteRegister
    | WriteCoils
    | WriteRegisters
    | MaskWrite
    | ReadWriteRegisters
    | ReportServerId
    | ReadDeviceId
)

_U16x2 = struct.Struct(">HH")
_U16x3 = struct.Struct(">HHH")
_FC17 = struct.Struct(">HHHHB")
_FC0F = struct.Struct(">HHB")


def _value_error(fc: int) -> ExceptionResponse:
    return ExceptionResponse(fc, ExceptionCode.ILLEGAL_DATA_VALUE)


def _address_error(fc: int) -> ExceptionResponse:
    return ExceptionResponse(fc, ExceptionCode.ILLEGAL_DATA_ADDRESS)


# Each parser follows its function's state diagram in MB AP 6.x: quantity (and byte count)
# -> 03, then address + quantity within 0..65535 -> 02; the map check (02) and execution (04)
# are the server's. A PDU of the wrong length for its function is 03 as well: the MBAP frame
# was valid, so the connection stays.


def _parse_read(fc: int, pdu: bytes, table: Table, limit: int) -> Request | ExceptionResponse:
    if len(pdu) != 5:
        return _value_error(fc)
    address, count = _U16x2.unpack_from(pdu, 1)
    if not 1 <= count <= limit:
        return _value_error(fc)
    if address + count > _ADDRESS_SPACE:
        return _address_error(fc)
    if fc <= 2:
        return ReadBits(table, address, count)
    return ReadRegisters(table, address, count)


def _fc01(pdu: bytes) -> Request | ExceptionResponse:
    return _parse_read(0x01, pdu, Table.COILS, 2000)  # MB AP 6.1: 1..0x07D0


def _fc02(pdu: bytes) -> Request | ExceptionResponse:
    return _parse_read(0x02, pdu, Table.DISCRETE_INPUTS, 2000)  # MB AP 6.2


def _fc03(pdu: bytes) -> Request | ExceptionResponse:
    return _parse_read(0x03, pdu, Table.HOLDING_REGISTERS, 125)  # MB AP 6.3: 1..0x007D


def _fc04(pdu: bytes) -> Request | ExceptionResponse:
    return _parse_read(0x04, pdu, Table.INPUT_REGISTERS, 125)  # MB AP 6.4


def _fc05(pdu: bytes) -> Request | ExceptionResponse:
    if len(pdu) != 5:
        return _value_error(0x05)
    address, value = _U16x2.unpack_from(pdu, 1)
    if value not in (0x0000, 0xFF00):  # MB AP 6.5: anything else is illegal
        return _value_error(0x05)
    return WriteCoil(address, value == 0xFF00)


def _fc06(pdu: bytes) -> Request | ExceptionResponse:
    if len(pdu) != 5:
        return _value_error(0x06)
    address, value = _U16x2.unpack_from(pdu, 1)
    return WriteRegister(address, value)


def _fc0f(pdu: bytes) -> Request | ExceptionResponse:
    if len(pdu) < 6:
        return _value_error(0x0F)
    address, count, byte_count = _FC0F.unpack_from(pdu, 1)
    # MB AP 6.11: 1 <= N <= 0x07B0 and byte count == ceil(N / 8)
    if not 1 <= count <= 1968 or byte_count != (count + 7) // 8 or len(pdu) != 6 + byte_count:
        return _value_error(0x0F)
    if address + count > _ADDRESS_SPACE:
        return _address_error(0x0F)
    bits = unpack_bits(memoryview(pdu)[6:], count)
    return WriteCoils(address, tuple(bits.tolist()))


def _fc10(pdu: bytes) -> Request | ExceptionResponse:
    if len(pdu) < 6:
        return _value_error(0x10)
    address, count, byte_count = _FC0F.unpack_from(pdu, 1)
    # MB AP 6.12: 1 <= N <= 0x007B and byte count == 2 * N
    if not 1 <= count <= 123 or byte_count != 2 * count or len(pdu) != 6 + byte_count:
        return _value_error(0x10)
    if address + count > _ADDRESS_SPACE:
        return _address_error(0x10)
    return WriteRegisters(address, pdu[6:])


def _fc11(pdu: bytes) -> Request | ExceptionResponse:
    if len(pdu) != 1:
        return _value_error(0x11)
    return ReportServerId()


def _fc16(pdu: bytes) -> Request | ExceptionResponse:
    if len(pdu) != 7:
        return _value_error(0x16)
    address, and_mask, or_mask = _U16x3.unpack_from(pdu, 1)
    return MaskWrite(address, and_mask, or_mask)


def _fc17(pdu: bytes) -> Request | ExceptionResponse:
    if len(pdu) < 10:
        return _value_error(0x17)
    r_addr, r_count, w_addr, w_count, byte_count = _FC17.unpack_from(pdu, 1)
    # MB AP 6.17: read 1..0x007D, write 1..0x0079, byte count == 2 * write quantity
    if (
        not 1 <= r_count <= 125
        or not 1 <= w_count <= 121
        or byte_count != 2 * w_count
        or len(pdu) != 10 + byte_count
    ):
        return _value_error(0x17)
    if r_addr + r_count > _ADDRESS_SPACE or w_addr + w_count > _ADDRESS_SPACE:
        return _address_error(0x17)
    return ReadWriteRegisters(r_addr, r_count, w_addr, pdu[10:])


def _fc2b(pdu: bytes) -> Request | ExceptionResponse:
    if len(pdu) < 2:
        return _value_error(0x2B)
    if pdu[1] != MeiType.READ_DEVICE_IDENTIFICATION:
        # only MEI 0x0E is implemented; an unsupported MEI type is an unsupported function
        return ExceptionResponse(0x2B, ExceptionCode.ILLEGAL_FUNCTION)
    if len(pdu) != 4:
        return _value_error(0x2B)
    code = pdu[2]
    if not 1 <= code <= 4:  # MB AP 6.21: ReadDevId code 01..04, else 03
        return _value_error(0x2B)
    return ReadDeviceId(DeviceIdCode(code), pdu[3])


_PARSERS: dict[int, Callable[[bytes], Request | ExceptionResponse]] = {
    0x01: _fc01,
    0x02: _fc02,
    0x03: _fc03,
    0x04: _fc04,
    0x05: _fc05,
    0x06: _fc06,
    0x0F: _fc0f,
    0x10: _fc10,
    0x11: _fc11,
    0x16: _fc16,
    0x17: _fc17,
    0x2B: _fc2b,
}


def parse_request(
    pdu: bytes, supported: frozenset[int] = ALL_FUNCTIONS
) -> Request | ExceptionResponse:
    """Validate a request PDU (MB AP 6.x order); return the request or the exception to send.

    ``supported`` lets a server turn function codes off (they then get exception 01).
    """
    if not pdu:
        # cannot come from FrameDecoder (length >= 2); no function code to echo
        return ExceptionResponse(0, ExceptionCode.ILLEGAL_FUNCTION)
    fc = pdu[0]
    parser = _PARSERS.get(fc)
    if parser is None or fc not in supported:
        return ExceptionResponse(fc, ExceptionCode.ILLEGAL_FUNCTION)  # MB AP 7: code 01
    return parser(pdu)
