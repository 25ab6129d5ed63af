"""Sans-I/O Modbus TCP codec, server side: bytes in, requests out; responses -> bytes.

References: "MODBUS Application Protocol Specification V1.1b3" (MB AP) and "MODBUS Messaging
on TCP/IP Implementation Guide V1.0b" (MB TCP). No sockets, no reactor: the Twisted protocol
feeds :class:`FrameDecoder`, parses each frame's PDU with :func:`parse_request`, checks the
request's :attr:`accesses` against its register map, and writes one of the ``encode_*`` results.

Two kinds of failure, as in h11:
- :class:`ModbusFramingError`: the peer broke MBAP framing; the stream cannot be resynchronised,
  so the server closes the connection (MB TCP 4.4.1.2 says to discard; without a valid length
  there is nothing to discard up to).
- :class:`ExceptionResponse` (a value, not an exception): the frame was valid but the request is
  not; answer it with :func:`encode_exception`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, NoReturn

import numpy as np
import numpy.typing as npt

from iotserver.modbus.encoding import from_wire, pack_bits, unpack_bits

__all__ = [
    "ALL_FUNCTIONS",
    "Access",
    "DeviceIdCode",
    "ExceptionCode",
    "ExceptionResponse",
    "Frame",
    "FrameDecoder",
    "FunctionCode",
    "MaskWrite",
    "MeiType",
    "ModbusError",
    "ModbusFramingError",
    "ModbusUsageError",
    "ReadBits",
    "ReadDeviceId",
    "ReadRegisters",
    "ReadWriteRegisters",
    "ReportServerId",
    "Request",
    "Table",
    "WriteCoil",
    "WriteCoils",
    "WriteRegister",
    "WriteRegisters",
    "device_id_response",
    "encode_exception",
    "encode_mask_write_response",
    "encode_pdu",
    "encode_read_bits_response",
    "encode_read_device_id_response",
    "encode_read_registers_response",
    "encode_report_server_id_response",
    "encode_write_coil_response",
    "encode_write_multiple_response",
    "encode_write_register_response",
    "encode_write_response",
    "parse_request",
]


class ModbusError(Exception):
    """Base of this module's errors."""


class ModbusFramingError(ModbusError):
    """The peer sent a broken MBAP header: close the connection.

    ``frames`` holds the valid frames that preceded the bad header in the same ``feed`` call,
    should the server want to answer them before it closes.
    """

    def __init__(self, message: str, frames: tuple[Frame, ...] = ()) -> None:
        super().__init__(message)
        self.frames = frames


class ModbusUsageError(ModbusError, ValueError):
    """We asked the codec for something Modbus cannot express (a bug on our side)."""


class ExceptionCode(enum.IntEnum):
    """MB AP 7: exception codes."""

    ILLEGAL_FUNCTION = 0x01
    ILLEGAL_DATA_ADDRESS = 0x02
    ILLEGAL_DATA_VALUE = 0x03
    SERVER_DEVICE_FAILURE = 0x04
    ACKNOWLEDGE = 0x05
    SERVER_DEVICE_BUSY = 0x06
    MEMORY_PARITY_ERROR = 0x08
    GATEWAY_PATH_UNAVAILABLE = 0x0A
    GATEWAY_TARGET_DEVICE_FAILED_TO_RESPOND = 0x0B


class FunctionCode(enum.IntEnum):
    """MB AP 5.1 public function codes handled here."""

    READ_COILS = 0x01
    READ_DISCRETE_INPUTS = 0x02
    READ_HOLDING_REGISTERS = 0x03
    READ_INPUT_REGISTERS = 0x04
    WRITE_SINGLE_COIL = 0x05
    WRITE_SINGLE_REGISTER = 0x06
    WRITE_MULTIPLE_COILS = 0x0F
    WRITE_MULTIPLE_REGISTERS = 0x10
    REPORT_SERVER_ID = 0x11
    MASK_WRITE_REGISTER = 0x16
    READ_WRITE_MULTIPLE_REGISTERS = 0x17
    ENCAPSULATED_INTERFACE_TRANSPORT = 0x2B


class Table(enum.Enum):
    """MB AP 4.3: the four primary tables."""

    COILS = "coils"
    DISCRETE_INPUTS = "discrete_inputs"
    HOLDING_REGISTERS = "holding_registers"
    INPUT_REGISTERS = "input_registers"


class MeiType(enum.IntEnum):
    """MB AP 6.19: MEI types of FC 0x2B."""

    CANOPEN_GENERAL_REFERENCE = 0x0D
    READ_DEVICE_IDENTIFICATION = 0x0E


class DeviceIdCode(enum.IntEnum):
    """MB AP 6.21: Read Device ID codes."""

    BASIC = 0x01
    REGULAR = 0x02
    EXTENDED = 0x03
    INDIVIDUAL = 0x04


ALL_FUNCTIONS: frozenset[int] = frozenset(int(fc) for fc in FunctionCode)

# MB TCP 3.1.3: MBAP = transaction id, protocol id (0), length (unit id + PDU), unit id
_MBAP = struct.Struct(">HHHB")
_MBAP_HDR = struct.Struct(">HHH")
_MAX_PDU = 253  # MB AP 4.1: 256-byte serial ADU - address - CRC
_ADDRESS_SPACE = 0x10000  # MB AP 4.4: addresses 0..65535


# ---------------------------------------------------------------------------------------------
# framing


class Frame(NamedTuple):
    """One MBAP frame: header fields and the PDU (function code + data).

    A NamedTuple: one is built per request, and that is about half the cost of a frozen
    dataclass.
    """

    transaction_id: int
    unit_id: int
    pdu: bytes


class FrameDecoder:
    """Splits a TCP byte stream into MBAP frames (MB TCP 3.1.3).

    Keeps one bytearray and a read offset; at most one partial frame (< ``max_frame`` bytes) is
    copied down per :meth:`feed`, so work stays linear in the bytes received. After a
    :class:`ModbusFramingError` the decoder is dead: every further feed raises again.
    """

    __slots__ = ("_buf", "_error", "_max_length", "_pos")

    def __init__(self, max_frame: int = 260) -> None:
        if not 8 <= max_frame <= 260:
            raise ModbusUsageError("max_frame must be 8..260 (MB TCP 3.1.3: 7-byte MBAP + PDU)")
        self._buf = bytearray()
        self._pos = 0
        # MBAP length counts unit id + PDU: 1 + (1..253) -> 2..254
        self._max_length = max_frame - 6
        self._error: ModbusFramingError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held of a frame not yet complete."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Add received bytes; return every frame now complete, in order."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        buf += data
        pos = self._pos
        end = len(buf)
        frames: list[Frame] = []
        while end - pos >= 6:
            tid, pid, length = _MBAP_HDR.unpack_from(buf, pos)
            if pid != 0 or not 2 <= length <= self._max_length:
                self._fail(pid, length, frames)
            stop = pos + 6 + length
            if stop > end:
                break
            frames.append(Frame(tid, buf[pos + 6], bytes(buf[pos + 7 : stop])))
            pos = stop
        if pos == end:
            buf.clear()
            pos = 0
        elif pos:
            del buf[:pos]  # leftover is shorter than one frame
            pos = 0
        self._pos = pos
        return frames

    def _fail(self, pid: int, length: int, frames: list[Frame]) -> NoReturn:
        if pid != 0:
            msg = f"MBAP protocol id {pid}, expected 0"
        else:
            msg = f"MBAP length {length} outside 2..{self._max_length}"
        self._buf = bytearray()
        self._pos = 0
        self._error = ModbusFramingError(msg)
        raise ModbusFramingError(msg, tuple(frames))


# ---------------------------------------------------------------------------------------------
# requests


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


# ---------------------------------------------------------------------------------------------
# responses: MBAP + PDU in one pack where possible (these run once per request)

_RSP_BYTES = struct.Struct(">HHHBBB")  # MBAP, fc, byte count
_RSP_EXC = struct.Struct(">HHHBBB")  # MBAP, fc|0x80, exception code
_RSP_U16x2 = struct.Struct(">HHHBBHH")  # MBAP, fc, two 16-bit fields
_RSP_U16x3 = struct.Struct(">HHHBBHHH")


def encode_pdu(tid: int, unit: int, pdu: bytes | bytearray | memoryview) -> bytes:
    """Wrap any response PDU in an MBAP header (MB TCP 3.1.3)."""
    if not 1 <= len(pdu) <= _MAX_PDU:
        raise ModbusUsageError(f"PDU of {len(pdu)} bytes, must be 1..{_MAX_PDU}")
    return _MBAP.pack(tid, 0, len(pdu) + 1, unit) + pdu


def encode_exception(tid: int, unit: int, fc: int, code: int) -> bytes:
    """MB AP 7: exception response, function code with the high bit set."""
    return _RSP_EXC.pack(tid, 0, 3, unit, (fc | 0x80) & 0xFF, code)


def encode_read_registers_response(
    tid: int, unit: int, fc: int, register_bytes: bytes | bytearray | memoryview
) -> bytes:
    """FC03/04/17 response (MB AP 6.3): ``register_bytes`` are already big-endian."""
    n = len(register_bytes)
    if n & 1 or not 2 <= n <= 250:
        raise ModbusUsageError(f"{n} register bytes: must be even, 2..250")
    return _RSP_BYTES.pack(tid, 0, n + 3, unit, fc, n) + register_bytes


def encode_read_bits_response(
    tid: int,
    unit: int,
    fc: int,
    bits: npt.NDArray[np.bool_] | bytes | bytearray | memoryview,
) -> bytes:
    """FC01/02 response (MB AP 6.1): bits packed LSB-first, last byte zero-padded.

    A numpy array is one element per bit; bytes-like input is taken as already packed.
    """
    packed = pack_bits(bits) if isinstance(bits, np.ndarray) else bits
    n = len(packed)
    if not 1 <= n <= 250:
        raise ModbusUsageError(f"{n} coil bytes: must be 1..250")
    return _RSP_BYTES.pack(tid, 0, n + 3, unit, fc, n) + packed


def encode_write_coil_response(tid: int, unit: int, address: int, value: bool) -> bytes:
    """FC05 response: echo of the request (MB AP 6.5)."""
    return _RSP_U16x2.pack(tid, 0, 6, unit, 0x05, address, 0xFF00 if value else 0x0000)


def encode_write_register_response(tid: int, unit: int, address: int, value: int) -> bytes:
    """FC06 response: echo of the request (MB AP 6.6)."""
    return _RSP_U16x2.pack(tid, 0, 6, unit, 0x06, address, value)


def encode_write_multiple_response(tid: int, unit: int, fc: int, address: int, count: int) -> bytes:
    """FC0F/10 response: function, starting address, quantity (MB AP 6.11, 6.12)."""
    return _RSP_U16x2.pack(tid, 0, 6, unit, fc, address, count)


def encode_mask_write_response(
    tid: int, unit: int, address: int, and_mask: int, or_mask: int
) -> bytes:
    """FC16 response: echo of the request (MB AP 6.16)."""
    return _RSP_U16x3.pack(tid, 0, 8, unit, 0x16, address, and_mask, or_mask)


def encode_write_response(
    tid: int,
    unit: int,
    request: WriteCoil | WriteRegister | WriteCoils | WriteRegisters | MaskWrite,
) -> bytes:
    """The normal response to any write request."""
    if isinstance(request, WriteCoil):
        return encode_write_coil_response(tid, unit, request.address, request.value)
    if isinstance(request, WriteRegister):
        return encode_write_register_response(tid, unit, request.address, request.value)
    if isinstance(request, MaskWrite):
        return encode_mask_write_response(
            tid, unit, request.address, request.and_mask, request.or_mask
        )
    return encode_write_multiple_response(
        tid, unit, request.function, request.address, request.count
    )


def encode_report_server_id_response(
    tid: int, unit: int, server_id: bytes, running: bool = True, additional: bytes = b""
) -> bytes:
    """FC11 response (MB AP 6.13): byte count, server id, run indicator (0x00/0xFF), extra."""
    data = server_id + (b"\xff" if running else b"\x00") + additional
    if len(data) > _MAX_PDU - 2:
        raise ModbusUsageError("server id data too long")
    return encode_pdu(tid, unit, bytes((0x11, len(data))) + data)


def encode_read_device_id_response(
    tid: int,
    unit: int,
    code: int,
    conformity: int,
    objects: Iterable[tuple[int, bytes]],
    more_follows: bool = False,
    next_object_id: int = 0,
) -> bytes:
    """FC2B/0E response (MB AP 6.21) with the given objects, as-is."""
    body = bytearray()
    count = 0
    for obj_id, value in objects:
        if len(value) > 255:
            raise ModbusUsageError(f"device id object {obj_id:#x} longer than 255 bytes")
        body += bytes((obj_id, len(value))) + value
        count += 1
    head = bytes(
        (0x2B, 0x0E, code, conformity, 0xFF if more_follows else 0x00, next_object_id, count)
    )
    return encode_pdu(tid, unit, head + body)


# MB AP 6.21: object id ranges per category
_CATEGORY_LAST = {DeviceIdCode.BASIC: 0x02, DeviceIdCode.REGULAR: 0x7F, DeviceIdCode.EXTENDED: 0xFF}


def device_id_response(
    tid: int, unit: int, request: ReadDeviceId, objects: Mapping[int, bytes]
) -> bytes:
    """Answer a Read Device Identification request from the server's object table.

    Stream access (codes 01..03) returns the category's objects from ``object_id`` on, split
    with More Follows / Next Object Id when they exceed one PDU; an unknown start object
    restarts at 0. Individual access (04) of a missing object gets exception 02 (MB AP 6.21).
    Conformity level: highest category present, plus 0x80 (individual access supported).
    """
    fc = 0x2B
    if any(i > 0x7F for i in objects):
        conformity = 0x83
    elif any(i > 0x02 for i in objects):
        conformity = 0x82
    else:
        conformity = 0x81
    code = request.code
    if code is DeviceIdCode.INDIVIDUAL:
        value = objects.get(request.object_id)
        if value is None:
            return encode_exception(tid, unit, fc, ExceptionCode.ILLEGAL_DATA_ADDRESS)
        return encode_read_device_id_response(
            tid, unit, code, conformity, [(request.object_id, value[: _MAX_PDU - 9])]
        )
    last = _CATEGORY_LAST[code]
    ids = sorted(i for i in objects if 0 <= i <= last)
    start = request.object_id if request.object_id in ids else 0
    room = _MAX_PDU - 7  # fc, MEI, code, conformity, more follows, next id, count
    chosen: list[tuple[int, bytes]] = []
    more, next_id = False, 0
    for obj_id in ids:
        if obj_id < start:
            continue
        value = objects[obj_id][: _MAX_PDU - 9]
        if 2 + len(value) > room:
            more, next_id = True, obj_id
            break
        chosen.append((obj_id, value))
        room -= 2 + len(value)
    return encode_read_device_id_response(tid, unit, code, conformity, chosen, more, next_id)
