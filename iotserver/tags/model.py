"""Tag model: data types, quality codes, tag definitions and values.

Knows nothing of any protocol. Quality codes are OPC UA StatusCode values (Part 4 7.39, Part 8
6.3.2 for the data-access sub-codes) so the OPC UA endpoint passes them through unchanged and the
other endpoints print their names.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np


class DataType(enum.Enum):
    """Scalar data types of a tag; a tag with ``shape`` is a fixed-size array of one of them."""

    BOOLEAN = "Boolean"
    INT16 = "Int16"
    INT32 = "Int32"
    INT64 = "Int64"
    UINT16 = "UInt16"
    UINT32 = "UInt32"
    UINT64 = "UInt64"
    FLOAT32 = "Float32"
    FLOAT64 = "Float64"
    STRING = "String"

    @property
    def is_numeric(self) -> bool:
        return self not in (DataType.BOOLEAN, DataType.STRING)

    @property
    def is_integer(self) -> bool:
        return self in _INT_LIMITS

    @property
    def numpy_dtype(self) -> np.dtype[Any] | None:
        return _NP_DTYPES.get(self)

    @classmethod
    def parse(cls, text: str) -> DataType:
        """Case-insensitive lookup by name ("float32", "Float32", "FLOAT32")."""
        key = text.strip().lower()
        for member in cls:
            if member.value.lower() == key:
                return member
        raise ValueError(text)


_INT_LIMITS: dict[DataType, tuple[int, int]] = {
    DataType.INT16: (-(2**15), 2**15 - 1),
    DataType.INT32: (-(2**31), 2**31 - 1),
    DataType.INT64: (-(2**63), 2**63 - 1),
    DataType.UINT16: (0, 2**16 - 1),
    DataType.UINT32: (0, 2**32 - 1),
    DataType.UINT64: (0, 2**64 - 1),
}

_NP_DTYPES: dict[DataType, np.dtype[Any]] = {
    DataType.BOOLEAN: np.dtype(np.bool_),
    DataType.INT16: np.dtype(np.int16),
    DataType.INT32: np.dtype(np.int32),
    DataType.INT64: np.dtype(np.int64),
    DataType.UINT16: np.dtype(np.uint16),
    DataType.UINT32: np.dtype(np.uint32),
    DataType.UINT64: np.dtype(np.uint64),
    DataType.FLOAT32: np.dtype(np.float32),
    DataType.FLOAT64: np.dtype(np.float64),
}

FLOAT32_MAX = float(np.finfo(np.float32).max)


class Quality(enum.IntEnum):
    """OPC UA StatusCode values as tag quality (top two bits: 00 Good, 01 Uncertain, 10 Bad)."""

    GOOD = 0x00000000
    GOOD_LOCAL_OVERRIDE = 0x00960000
    UNCERTAIN = 0x40000000
    UNCERTAIN_NO_COMMUNICATION_LAST_USABLE_VALUE = 0x408F0000
    UNCERTAIN_LAST_USABLE_VALUE = 0x40900000
    UNCERTAIN_SENSOR_NOT_ACCURATE = 0x40930000
    UNCERTAIN_ENGINEERING_UNITS_EXCEEDED = 0x40940000
    UNCERTAIN_SUB_NORMAL = 0x40950000
    BAD = 0x80000000
    BAD_INTERNAL_ERROR = 0x80020000
    BAD_RESOURCE_UNAVAILABLE = 0x80040000
    BAD_COMMUNICATION_ERROR = 0x80050000
    BAD_TIMEOUT = 0x800A0000
    BAD_SHUTDOWN = 0x800C0000
    BAD_USER_ACCESS_DENIED = 0x801F0000
    BAD_NO_COMMUNICATION = 0x80310000
    BAD_WAITING_FOR_INITIAL_DATA = 0x80320000
    BAD_NODE_ID_UNKNOWN = 0x80340000
    BAD_NOT_WRITABLE = 0x803B0000
    BAD_OUT_OF_RANGE = 0x803C0000
    BAD_TYPE_MISMATCH = 0x80740000
    BAD_CONFIGURATION_ERROR = 0x80890000
    BAD_NOT_CONNECTED = 0x808A0000
    BAD_DEVICE_FAILURE = 0x808B0000
    BAD_SENSOR_FAILURE = 0x808C0000
    BAD_OUT_OF_SERVICE = 0x808D0000
    BAD_INVALID_ARGUMENT = 0x80AB0000

    @property
    def is_good(self) -> bool:
        return (self.value & 0xC0000000) == 0

    @property
    def is_uncertain(self) -> bool:
        return (self.value & 0xC0000000) == 0x40000000

    @property
    def is_bad(self) -> bool:
        return (self.value & 0x80000000) != 0

    @property
    def severity(self) -> str:
        return "Good" if self.is_good else ("Uncertain" if self.is_uncertain else "Bad")

    @property
    def text(self) -> str:
        """OPC UA symbolic name, e.g. ``BadNotConnected``."""
        return "".join(part.capitalize() for part in self.name.split("_"))


class Access(enum.Enum):
    READ = "read"
    READ_WRITE = "readwrite"


class DeadbandKind(enum.Enum):
    NONE = "none"
    ABSOLUTE = "absolute"
    PERCENT = "percent"


@dataclass(frozen=True, slots=True)
class Scaling:
    """Linear scaling raw -> engineering:
    ``eng = raw * (eng_hi-eng_lo)/(raw_hi-raw_lo) + offset``."""

    raw_low: float
    raw_high: float
    eng_low: float
    eng_high: float

    @property
    def gain(self) -> float:
        return (self.eng_high - self.eng_low) / (self.raw_high - self.raw_low)

    def to_eng(self, raw: float) -> float:
        return (raw - self.raw_low) * self.gain + self.eng_low

    def to_raw(self, eng: float) -> float:
        return (eng - self.eng_low) / self.gain + self.raw_low


@dataclass(frozen=True, slots=True)
class TagDef:
    """Static description of a tag. ``owner`` names the source that answers writes."""

    path: str
    data_type: DataType
    shape: tuple[int, ...] = ()
    unit: str = ""
    description: str = ""
    low: float | None = None
    high: float | None = None
    access: Access = Access.READ
    deadband_kind: DeadbandKind = DeadbandKind.NONE
    deadband: float = 0.0
    scaling: Scaling | None = None
    owner: str = "memory"
    historize: bool = False
    history_capacity: int = 0
    persist: bool = False
    initial: Any = None

    @property
    def writable(self) -> bool:
        return self.access is Access.READ_WRITE

    @property
    def is_array(self) -> bool:
        return bool(self.shape)

    def deadband_exceeded(self, old: Any, new: Any) -> bool:
        """True when ``new`` differs from the last published ``old`` by more than the deadband."""
        if self.deadband_kind is DeadbandKind.NONE or not self.data_type.is_numeric:
            return bool(old != new) if not self.is_array else not np.array_equal(old, new)
        if old is None or self.is_array:
            return True
        limit = self.deadband
        if self.deadband_kind is DeadbandKind.PERCENT:
            if self.low is None or self.high is None:
                return bool(old != new)
            limit = self.deadband / 100.0 * (self.high - self.low)
        try:
            return abs(float(new) - float(old)) > limit
        except (TypeError, ValueError):
            return True


class CoerceError(ValueError):
    """A value cannot be stored in a tag; ``quality`` says why (type mismatch or out of range)."""

    def __init__(self, quality: Quality, message: str) -> None:
        super().__init__(message)
        self.quality = quality


def coerce(tag: TagDef, value: Any) -> Any:
    """Convert a written value to the tag's type, enforcing its range. Raises CoerceError."""
    if tag.is_array:
        return _coerce_array(tag, value)
    dt = tag.data_type
    if dt is DataType.STRING:
        if not isinstance(value, str):
            raise CoerceError(Quality.BAD_TYPE_MISMATCH, f"{tag.path}: expected a string")
        return value
    if dt is DataType.BOOLEAN:
        if isinstance(value, bool | np.bool_):
            return bool(value)
        if isinstance(value, int | np.integer) and value in (0, 1):
            return bool(value)
        raise CoerceError(Quality.BAD_TYPE_MISMATCH, f"{tag.path}: expected a boolean")
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.number):
        raise CoerceError(Quality.BAD_TYPE_MISMATCH, f"{tag.path}: expected a number")
    if dt.is_integer:
        if isinstance(value, float | np.floating) and (
                not math.isfinite(value) or value != int(value)):
            raise CoerceError(Quality.BAD_TYPE_MISMATCH, f"{tag.path}: expected an integer")
        result: int | float = int(value)
        lo, hi = _INT_LIMITS[dt]
        if not lo <= result <= hi:
            raise CoerceError(Quality.BAD_OUT_OF_RANGE, f"{tag.path}: {result} outside {dt.value}")
    else:
        result = float(value)
        if dt is DataType.FLOAT32 and math.isfinite(result) and abs(result) > FLOAT32_MAX:
            raise CoerceError(Quality.BAD_OUT_OF_RANGE, f"{tag.path}: {result} outside Float32")
        # NaN compares false with everything: a ranged tag must refuse it explicitly.
        if not math.isfinite(result) and (tag.low is not None or tag.high is not None):
            raise CoerceError(Quality.BAD_OUT_OF_RANGE, f"{tag.path}: {result} is not in range")
    if (tag.low is not None and result < tag.low) or (tag.high is not None and result > tag.high):
        raise CoerceError(
            Quality.BAD_OUT_OF_RANGE, f"{tag.path}: {result} outside [{tag.low}, {tag.high}]"
        )
    return result


def _coerce_array(tag: TagDef, value: Any) -> Any:
    dtype = tag.data_type.numpy_dtype
    if dtype is None:
        raise CoerceError(Quality.BAD_TYPE_MISMATCH, f"{tag.path}: string arrays are not supported")
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise CoerceError(Quality.BAD_TYPE_MISMATCH, f"{tag.path}: {exc}") from None
    if arr.shape != tag.shape:
        raise CoerceError(
            Quality.BAD_TYPE_MISMATCH, f"{tag.path}: expected shape {tag.shape}, got {arr.shape}"
        )
    if arr.dtype.kind not in "biuf" or (dtype.kind in "iu" and arr.dtype.kind == "f"):
        raise CoerceError(Quality.BAD_TYPE_MISMATCH, f"{tag.path}: expected {tag.data_type.value}")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise CoerceError(Quality.BAD_OUT_OF_RANGE, f"{tag.path}: element out of range")
    out = arr.astype(dtype)
    if tag.low is not None and out.size and out.min() < tag.low:
        raise CoerceError(Quality.BAD_OUT_OF_RANGE, f"{tag.path}: element below {tag.low}")
    if tag.high is not None and out.size and out.max() > tag.high:
        raise CoerceError(Quality.BAD_OUT_OF_RANGE, f"{tag.path}: element above {tag.high}")
    out.setflags(write=False)
    return out


def now_ns() -> int:
    return time.time_ns()


class TagValue(NamedTuple):
    """One sample of a tag: value, quality and timestamps (integer nanoseconds since the epoch).

    A NamedTuple rather than a frozen dataclass: it is built once per update on the hot path and
    tuple construction is several times cheaper.
    """

    value: Any
    quality: Quality
    source_ns: int
    server_ns: int


class Update(NamedTuple):
    """A change a source reports for one tag. ``source_ns`` 0 means "stamp with server time"."""

    path: str
    value: Any
    quality: Quality = Quality.GOOD
    source_ns: int = 0


class Change(NamedTuple):
    """What subscribers receive: the tag definition and its new value."""

    tag: TagDef
    value: TagValue
