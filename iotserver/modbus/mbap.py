"""Modbus TCP wire basics: the codec's errors (``ModbusFramingError``, ``ModbusUsageError``),
the function / exception code and table enums of MB AP, the MBAP constants, and the framing
layer (``Frame``, ``FrameDecoder``) that splits a TCP byte stream into frames (MB TCP 3.1.3).
Re-exported by ``iotserver.modbus.codec``, whose docstring gives the references and the two
kinds of failure.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple, NoReturn


class ModbusError(Exception):
    """Base of the Modbus codec's errors."""


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
# (the full header, _MBAP, is packed in responses.py)
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
