"""Register encodings: how tag values sit in 16-bit Modbus registers and coil bits.

Used by the server's register image (values -> big-endian wire bytes) and by the poller
(registers read from a PLC -> values, many tags per numpy operation).

Byte and word order
-------------------
Modbus itself only fixes that a register travels big-endian (MB Application Protocol 4.2);
how a wider value spans several registers is the device's choice. We name the four common
layouts after the position of the value's bytes, A being the most significant byte:

===== ============================================= =============================
order meaning                                       float32 123.456 = 0x42F6E979
===== ============================================= =============================
ABCD  big-endian words, most significant first      [0x42F6, 0xE979]
CDAB  word swap: least significant word first       [0xE979, 0x42F6]
BADC  byte swap inside each word, MSW first         [0xF642, 0x79E9]
DCBA  little-endian: both swaps                     [0x79E9, 0xF642]
===== ============================================= =============================

The same two independent swaps define every width (our convention for 64-bit types, which
matches pymodbus' ``word_order="little"`` for CDAB): the value is written big-endian as
2*N bytes, split into N words (word 0 most significant); *word swap* (CDAB, DCBA) reverses the
whole list of N words; *byte swap* (BADC, DCBA) swaps the two bytes inside every word. For
0x0102030405060708: ABCD [0102, 0304, 0506, 0708], CDAB [0708, 0506, 0304, 0102],
BADC [0201, 0403, 0605, 0807], DCBA [0807, 0605, 0403, 0201]. 16-bit types only see the
byte swap. Strings only see the byte swap (characters always run up the register addresses;
BADC puts the first character in the low byte). A bit-in-register is bit ``n`` (0 = least
significant) of the register decoded as uint16 with the order's byte swap; with ABCD/CDAB
that is bit ``n`` of the register as transmitted.

Scaling is applied elsewhere.
"""

from __future__ import annotations

import enum
import re
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "BOOL",
    "FLOAT32",
    "FLOAT64",
    "INT16",
    "INT32",
    "INT64",
    "UINT16",
    "UINT32",
    "UINT64",
    "BatchDecoder",
    "Kind",
    "ModbusType",
    "Order",
    "bit",
    "bit_masks",
    "decode_batch",
    "decode_registers",
    "encode_batch",
    "encode_value",
    "from_wire",
    "pack_bits",
    "set_bit",
    "string",
    "to_wire_bytes",
    "unpack_bits",
]

_LITTLE_HOST = sys.byteorder == "little"


class Order(enum.Enum):
    """Byte/word order of a multi-register value (see the module docstring)."""

    ABCD = "ABCD"
    CDAB = "CDAB"
    BADC = "BADC"
    DCBA = "DCBA"

    @property
    def word_swap(self) -> bool:
        """Least significant word first."""
        return self in (Order.CDAB, Order.DCBA)

    @property
    def byte_swap(self) -> bool:
        """Low byte first inside each register."""
        return self in (Order.BADC, Order.DCBA)

    @classmethod
    def parse(cls, text: str) -> Order:
        """Case-insensitive lookup ("abcd", "CDAB")."""
        try:
            return cls(text.strip().upper())
        except ValueError:
            raise ValueError(f"unknown order {text!r}: expected ABCD, CDAB, BADC or DCBA") from None


class Kind(enum.Enum):
    """What a Modbus-mapped value is; the width in registers follows from it."""

    BOOL = "bool"
    BIT = "bit"
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    INT64 = "int64"
    UINT64 = "uint64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    STRING = "string"


_NUMERIC: dict[Kind, tuple[str, int]] = {
    # kind: (struct/numpy code, registers)
    Kind.INT16: ("h", 1),
    Kind.UINT16: ("H", 1),
    Kind.INT32: ("i", 2),
    Kind.UINT32: ("I", 2),
    Kind.INT64: ("q", 4),
    Kind.UINT64: ("Q", 4),
    Kind.FLOAT32: ("f", 2),
    Kind.FLOAT64: ("d", 4),
}

#: value range of each integer kind (image, poller and encoder checks)
INT_LIMITS: dict[Kind, tuple[int, int]] = {
    Kind.INT16: (-(2**15), 2**15 - 1),
    Kind.UINT16: (0, 2**16 - 1),
    Kind.INT32: (-(2**31), 2**31 - 1),
    Kind.UINT32: (0, 2**32 - 1),
    Kind.INT64: (-(2**63), 2**63 - 1),
    Kind.UINT64: (0, 2**64 - 1),
}

_PARSE_RE = re.compile(r"^\s*([a-z0-9]+)\s*(?:[:\[(]\s*(\d+)\s*[\])]?)?\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class ModbusType:
    """A Modbus data type: a kind plus the bit index (BIT) or register count (STRING).

    BOOL is a coil / discrete input; placed in a register it reads as ``register != 0`` and
    writes 0/1. ``pad`` is the string fill byte (NUL or space).
    """

    kind: Kind
    bit: int = 0
    length: int = 0
    encoding: str = "ascii"
    pad: str = "\x00"

    def __post_init__(self) -> None:
        if self.kind is Kind.BIT and not 0 <= self.bit <= 15:
            raise ValueError(f"bit index {self.bit} out of range 0..15")
        if self.kind is Kind.STRING:
            if not 1 <= self.length <= 125:
                raise ValueError(f"string length {self.length} registers out of range 1..125")
            if self.pad not in ("\x00", " "):
                raise ValueError("string pad must be NUL or space")
            "".encode(self.encoding)  # LookupError for an unknown codec, at definition time

    @property
    def width(self) -> int:
        """Registers occupied."""
        if self.kind is Kind.STRING:
            return self.length
        if self.kind in _NUMERIC:
            return _NUMERIC[self.kind][1]
        return 1

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        """Native numpy dtype of decoded values (object for strings)."""
        if self.kind in _NUMERIC:
            return np.dtype(_NUMERIC[self.kind][0])
        if self.kind in (Kind.BOOL, Kind.BIT):
            return np.dtype(np.bool_)
        return np.dtype(object)

    @classmethod
    def parse(cls, text: str) -> ModbusType:
        """Parse ``float32``, ``Int16``, ``bool``, ``bit:3`` / ``bit[3]``, ``string:10``.

        Case-insensitive, so the tag model's DataType values ("Float32") parse too.
        """
        m = _PARSE_RE.match(text)
        if not m:
            raise ValueError(f"cannot parse Modbus type {text!r}")
        name, arg = m.group(1).lower(), m.group(2)
        if name == "boolean":
            name = "bool"
        try:
            kind = Kind(name)
        except ValueError:
            raise ValueError(f"unknown Modbus type {text!r}") from None
        if kind is Kind.BIT:
            if arg is None:
                raise ValueError(f"{text!r}: bit needs an index, e.g. bit:3")
            return cls(kind, bit=int(arg))
        if kind is Kind.STRING:
            if arg is None:
                raise ValueError(f"{text!r}: string needs a register count, e.g. string:10")
            return cls(kind, length=int(arg))
        if arg is not None:
            raise ValueError(f"{text!r}: {name} takes no argument")
        return cls(kind)


BOOL = ModbusType(Kind.BOOL)
INT16 = ModbusType(Kind.INT16)
UINT16 = ModbusType(Kind.UINT16)
INT32 = ModbusType(Kind.INT32)
UINT32 = ModbusType(Kind.UINT32)
INT64 = ModbusType(Kind.INT64)
UINT64 = ModbusType(Kind.UINT64)
FLOAT32 = ModbusType(Kind.FLOAT32)
FLOAT64 = ModbusType(Kind.FLOAT64)


def bit(index: int) -> ModbusType:
    """Bit ``index`` (0 = LSB) of a register."""
    return ModbusType(Kind.BIT, bit=index)


def string(registers: int, encoding: str = "ascii", pad: str = "\x00") -> ModbusType:
    """A string in ``registers`` registers (2 bytes each), padded with NUL or space."""
    return ModbusType(Kind.STRING, length=registers, encoding=encoding, pad=pad)


# ---------------------------------------------------------------------------------------------
# wire helpers


def to_wire_bytes(regs: npt.ArrayLike) -> bytes:
    """Register values -> big-endian wire bytes (MB Application Protocol 4.2)."""
    return np.asarray(regs).astype(">u2", copy=False).tobytes()


def from_wire(data: bytes | bytearray | memoryview) -> npt.NDArray[np.uint16]:
    """Big-endian wire bytes -> native uint16 register values (a new array)."""
    if len(data) % 2:
        raise ValueError(f"odd number of register bytes: {len(data)}")
    return np.frombuffer(data, dtype=">u2").astype(np.uint16)


def pack_bits(bits: npt.ArrayLike) -> bytes:
    """Booleans -> coil bytes, first bit in the LSB of the first byte (MB AP 6.1)."""
    return np.packbits(np.asarray(bits, dtype=np.bool_), bitorder="little").tobytes()


def unpack_bits(data: bytes | bytearray | memoryview, count: int) -> npt.NDArray[np.bool_]:
    """Coil bytes -> ``count`` booleans (LSB of the first byte first)."""
    if count > len(data) * 8:
        raise ValueError(f"{count} bits do not fit in {len(data)} bytes")
    raw = np.frombuffer(data, dtype=np.uint8)
    return np.unpackbits(raw, count=count, bitorder="little").view(np.bool_)


# ---------------------------------------------------------------------------------------------
# scalar path (struct; deliberately independent of the numpy batch path so tests cross-check)


def _reorder(data: bytes, order: Order) -> bytes:
    """Big-endian value bytes <-> wire bytes; an involution (both swaps are)."""
    if order is Order.ABCD:
        return data
    words = [data[i : i + 2] for i in range(0, len(data), 2)]
    if order.word_swap:
        words.reverse()
    if order.byte_swap:
        words = [w[::-1] for w in words]
    return b"".join(words)


def _regs_to_wire(regs: npt.ArrayLike, width: int) -> bytes:
    arr = np.asarray(regs)
    if arr.ndim != 1 or arr.shape[0] != width:
        raise ValueError(f"expected {width} register(s), got shape {arr.shape}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 0xFFFF):
        raise ValueError("register values must be 0..65535")
    return arr.astype(">u2").tobytes()


def _check_int(kind: Kind, value: Any) -> int:
    if isinstance(value, (float, np.floating)):
        if not float(value).is_integer():
            raise ValueError(f"{kind.value} needs an integral value, got {value!r}")
    elif not isinstance(value, (int, np.integer)):
        raise TypeError(f"{kind.value} needs an int, got {type(value).__name__}")
    ivalue = int(value)
    lo, hi = INT_LIMITS[kind]
    if not lo <= ivalue <= hi:
        raise ValueError(f"{ivalue} out of range for {kind.value} ({lo}..{hi})")
    return ivalue


def encode_value(dtype: ModbusType, order: Order, value: Any) -> npt.NDArray[np.uint16]:
    """One value -> ``dtype.width`` register words (native uint16 array).

    BIT yields a register with only that bit set (or 0): merge it with :func:`set_bit` or write
    it with FC22 masks from :func:`bit_masks`. Raises ValueError when the value does not fit.
    """
    kind = dtype.kind
    if kind in _NUMERIC:
        code = _NUMERIC[kind][0]
        if kind in INT_LIMITS:
            be = struct.pack(">" + code, _check_int(kind, value))
        else:
            try:
                be = struct.pack(">" + code, float(value))
            except OverflowError:
                raise ValueError(f"{value!r} out of range for {kind.value}") from None
        return from_wire(_reorder(be, order))
    if kind is Kind.BOOL:
        return np.array([1 if value else 0], dtype=np.uint16)
    if kind is Kind.BIT:
        return np.array([bit_masks(dtype, order, bool(value))[1]], dtype=np.uint16)
    if kind is Kind.STRING:
        if not isinstance(value, str):
            raise TypeError(f"string needs a str, got {type(value).__name__}")
        raw = value.encode(dtype.encoding)
        size = 2 * dtype.length
        if len(raw) > size:
            raise ValueError(f"{len(raw)} bytes do not fit in {dtype.length} registers")
        raw = raw + dtype.pad.encode("ascii") * (size - len(raw))
        if order.byte_swap:
            raw = _reorder(raw, Order.BADC)
        return from_wire(raw)
    raise AssertionError(kind)  # pragma: no cover


def decode_registers(dtype: ModbusType, order: Order, regs: npt.ArrayLike,
                     errors: str = "replace") -> Any:
    """``dtype.width`` registers -> one Python value (int, float, bool or str).

    ``errors``: how string bytes invalid in the encoding are decoded (``str.decode``)."""
    kind = dtype.kind
    wire = _regs_to_wire(regs, dtype.width)
    if kind in _NUMERIC:
        return struct.unpack(">" + _NUMERIC[kind][0], _reorder(wire, order))[0]
    if kind is Kind.BOOL:
        return wire != b"\x00\x00"
    if kind is Kind.BIT:
        reg = int.from_bytes(wire, "little" if order.byte_swap else "big")
        return bool((reg >> dtype.bit) & 1)
    if kind is Kind.STRING:
        return _decode_string(dtype, order, wire, errors)
    raise AssertionError(kind)  # pragma: no cover


def _decode_string(dtype: ModbusType, order: Order, wire: bytes, errors: str = "replace") -> str:
    raw = _reorder(wire, Order.BADC) if order.byte_swap else wire
    nul = raw.find(b"\x00")
    if nul >= 0:
        raw = raw[:nul]
    if dtype.pad == " ":
        raw = raw.rstrip(b" ")
    return raw.decode(dtype.encoding, errors=errors)


def set_bit(current: int, dtype: ModbusType, order: Order, value: bool) -> int:
    """Register ``current`` with the BIT ``dtype`` set to ``value`` (read-modify-write)."""
    and_mask, or_mask = bit_masks(dtype, order, value)
    return (current & and_mask) | (or_mask & ~and_mask & 0xFFFF)


def bit_masks(dtype: ModbusType, order: Order, value: bool) -> tuple[int, int]:
    """(and_mask, or_mask) for a FC22 Mask Write Register of one BIT (MB AP 6.16)."""
    if dtype.kind is not Kind.BIT:
        raise TypeError("bit_masks needs a bit-in-register type")
    b = dtype.bit
    if order.byte_swap:  # the bit numbering is of the byte-swapped value
        b = (b + 8) % 16
    mask = 1 << b
    return 0xFFFF & ~mask, mask if value else 0


# ---------------------------------------------------------------------------------------------
# batch path (numpy): one gather + one view per call


def _value_byte_sources(width: int, order: Order) -> npt.NDArray[np.intp]:
    """For each native byte of a value, its byte position in the big-endian wire span."""
    nbytes = 2 * width
    src = np.empty(nbytes, dtype=np.intp)
    for i in range(nbytes):
        k = nbytes - 1 - i if _LITTLE_HOST else i  # significance, 0 = most significant
        word, hi_lo = divmod(k, 2)
        wpos = width - 1 - word if order.word_swap else word
        bpos = 1 - hi_lo if order.byte_swap else hi_lo
        src[i] = 2 * wpos + bpos
    return src


def _wire_to_native_pos(pos: npt.NDArray[np.intp]) -> npt.NDArray[np.intp]:
    """Wire byte position -> position in a native uint16 array's byte view."""
    return pos ^ 1 if _LITTLE_HOST else pos


class BatchDecoder:
    """Decodes many tags of one type and order from a register block in one numpy gather.

    Built once per poll plan (the offsets of the tags inside the block are fixed), then called
    with every block read: ``values = decoder(block)``. ``offsets`` are register offsets into
    the block. For BIT types ``bits`` may give each tag its own bit index.
    """

    __slots__ = ("_bits", "_idx_native", "_idx_wire", "_need", "_np", "dtype", "offsets", "order")

    def __init__(
        self,
        dtype: ModbusType,
        order: Order,
        offsets: npt.ArrayLike,
        bits: npt.ArrayLike | None = None,
    ) -> None:
        self.dtype = dtype
        self.order = order
        if bits is not None and dtype.kind is not Kind.BIT:
            raise ValueError("bits only applies to bit-in-register types")
        offs = np.asarray(offsets, dtype=np.intp).reshape(-1)
        if offs.size and int(offs.min()) < 0:
            raise ValueError("offsets must be >= 0")
        self.offsets = offs
        self._need = int(offs.max()) + dtype.width if offs.size else 0
        self._np = dtype.numpy_dtype
        self._bits: npt.NDArray[np.uint16] | None = None
        self._idx_native: npt.NDArray[np.intp] | None = None
        self._idx_wire: npt.NDArray[np.intp] | None = None
        if dtype.kind in _NUMERIC:
            src = _value_byte_sources(dtype.width, order)
            wire_idx = 2 * offs[:, None] + src[None, :]
            self._idx_wire = wire_idx
            self._idx_native = _wire_to_native_pos(wire_idx)
        elif dtype.kind is Kind.BIT:
            b = np.broadcast_to(np.asarray(dtype.bit if bits is None else bits), offs.shape)
            if b.size and (int(b.min()) < 0 or int(b.max()) > 15):
                raise ValueError("bit indexes must be 0..15")
            self._bits = b.astype(np.uint16)

    def __call__(self, block: npt.ArrayLike) -> npt.NDArray[Any]:
        """Decode from native register values (uint16 array or list of ints)."""
        regs = np.ascontiguousarray(block, dtype=np.uint16)
        if regs.ndim != 1 or regs.shape[0] < self._need:
            raise ValueError(f"block of {regs.shape} registers, need {self._need}")
        if self._idx_native is not None:
            return regs.view(np.uint8)[self._idx_native].view(self._np).reshape(-1)
        return self._other(regs)

    def from_wire(self, data: bytes | bytearray | memoryview) -> npt.NDArray[Any]:
        """Decode straight from big-endian wire bytes (no register conversion)."""
        if len(data) < 2 * self._need:
            raise ValueError(f"{len(data)} bytes, need {2 * self._need}")
        if self._idx_wire is not None:
            raw = np.frombuffer(data, dtype=np.uint8)
            return raw[self._idx_wire].view(self._np).reshape(-1)
        return self._other(from_wire(data[: 2 * (len(data) // 2)]))

    def _other(self, regs: npt.NDArray[np.uint16]) -> npt.NDArray[Any]:
        kind = self.dtype.kind
        if kind is Kind.BOOL:
            flags: npt.NDArray[np.bool_] = regs[self.offsets] != 0
            return flags
        if kind is Kind.BIT:
            vals = regs[self.offsets]
            if self.order.byte_swap:
                vals = vals.byteswap()
            assert self._bits is not None
            return ((vals >> self._bits) & 1).astype(np.bool_)
        # STRING: no numpy string type fits (variable decoded length); a loop is fine here
        w = self.dtype.width
        out = np.empty(self.offsets.shape[0], dtype=object)
        for i, o in enumerate(self.offsets.tolist()):
            out[i] = _decode_string(self.dtype, self.order, regs[o : o + w].astype(">u2").tobytes())
        return out


def decode_batch(
    dtype: ModbusType,
    order: Order,
    block: npt.ArrayLike,
    offsets: npt.ArrayLike,
    bits: npt.ArrayLike | None = None,
) -> npt.NDArray[Any]:
    """One-shot :class:`BatchDecoder`; build the decoder once when the offsets repeat."""
    return BatchDecoder(dtype, order, offsets, bits)(block)


def encode_batch(
    dtype: ModbusType, order: Order, values: npt.ArrayLike | Sequence[Any]
) -> npt.NDArray[np.uint16]:
    """Many values -> registers, shape ``(n, dtype.width)`` (native uint16).

    Integers out of range raise ValueError (no silent wrap); floats overflowing float32 too.
    """
    kind = dtype.kind
    if kind is Kind.STRING:
        vals = list(values) if isinstance(values, Iterable) else [values]
        out = np.empty((len(vals), dtype.width), dtype=np.uint16)
        for i, v in enumerate(vals):
            out[i] = encode_value(dtype, order, v)
        return out
    if kind in (Kind.BOOL, Kind.BIT):
        flags = np.asarray(values, dtype=np.bool_).reshape(-1)
        one = 1 if kind is Kind.BOOL else (~bit_masks(dtype, order, True)[0]) & 0xFFFF
        return (flags.astype(np.uint16) * np.uint16(one)).reshape(-1, 1)
    native = _to_native(kind, values)
    src = _value_byte_sources(dtype.width, order)
    wire = np.empty((native.shape[0], 2 * dtype.width), dtype=np.uint8)
    wire[:, src] = native.view(np.uint8).reshape(native.shape[0], -1)
    return wire.view(">u2").astype(np.uint16)


def _to_native(kind: Kind, values: Any) -> npt.NDArray[Any]:
    target = np.dtype(_NUMERIC[kind][0])
    if kind in INT_LIMITS:
        lo, hi = INT_LIMITS[kind]
        if not isinstance(values, np.ndarray):
            # numpy would guess float64 for mixed large Python ints and lose precision
            seq = values if isinstance(values, Iterable) else [values]
            return np.array([_check_int(kind, v) for v in seq], dtype=target)
        arr = values.reshape(-1)
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or not np.all(arr == np.trunc(arr)):
                raise ValueError(f"{kind.value} needs integral values")
            # lo and hi + 1 are powers of two, exact in float64 (hi itself may not be)
            if arr.size and (arr.min() < lo or arr.max() >= float(hi + 1)):
                raise ValueError(f"value out of range for {kind.value} ({lo}..{hi})")
        elif arr.dtype.kind in "iub":
            if arr.size and (int(arr.min()) < lo or int(arr.max()) > hi):
                raise ValueError(f"value out of range for {kind.value} ({lo}..{hi})")
        else:
            return np.array([_check_int(kind, v) for v in arr.tolist()], dtype=target)
        return np.ascontiguousarray(arr.astype(target))
    as64 = np.asarray(values, dtype=np.float64).reshape(-1)
    if kind is Kind.FLOAT32:
        finite = np.isfinite(as64)
        if np.any(np.abs(as64[finite]) > np.finfo(np.float32).max):
            raise ValueError("value out of range for float32")
    return np.ascontiguousarray(as64.astype(target))
