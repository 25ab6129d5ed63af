"""Conversions between tag-store values and OPC UA types (Variants, DataValues, DateTimes).

Hot path: ``make_datavalue`` runs once per tag change, so it avoids asyncua's type guessing
(explicit VariantType) and caches the last timestamp conversion (a batch shares its server time).
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

import numpy as np
from asyncua import ua

from iotserver.opcua.fastenc import IotDataValue
from iotserver.tags.model import DataType, Quality, TagDef

UTC = _dt.UTC
EPOCH = _dt.datetime(1970, 1, 1, tzinfo=UTC)

VARIANT_TYPES: dict[DataType, ua.VariantType] = {
    DataType.BOOLEAN: ua.VariantType.Boolean,
    DataType.INT16: ua.VariantType.Int16,
    DataType.INT32: ua.VariantType.Int32,
    DataType.INT64: ua.VariantType.Int64,
    DataType.UINT16: ua.VariantType.UInt16,
    DataType.UINT32: ua.VariantType.UInt32,
    DataType.UINT64: ua.VariantType.UInt64,
    DataType.FLOAT32: ua.VariantType.Float,
    DataType.FLOAT64: ua.VariantType.Double,
    DataType.STRING: ua.VariantType.String,
}

# Built-in DataType NodeIds (Part 6 5.1.2: the VariantType number is the DataType NodeId in ns 0).
DATA_TYPE_IDS: dict[DataType, ua.NodeId] = {
    dt: ua.NodeId(vt.value, 0) for dt, vt in VARIANT_TYPES.items()
}

_STATUS_CACHE: dict[int, ua.StatusCode] = {}


def status(code: int) -> ua.StatusCode:
    """A shared StatusCode object per code (treated as immutable everywhere in this package)."""
    sc = _STATUS_CACHE.get(code)
    if sc is None:
        sc = _STATUS_CACHE[code] = ua.StatusCode(int(code))
    return sc


GOOD = status(0)


def ns_to_datetime(ns: int) -> _dt.datetime:
    """Integer nanoseconds since the epoch -> aware UTC datetime (microsecond resolution)."""
    return EPOCH + _dt.timedelta(microseconds=ns // 1000)


def datetime_to_ns(when: _dt.datetime | None) -> int:
    """Aware or naive-UTC datetime -> integer nanoseconds since the epoch (None -> 0)."""
    if when is None:
        return 0
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = when - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


class TimeCache:
    """Remembers the last few ns -> datetime conversions (a batch shares its timestamps)."""

    __slots__ = ("_src_ns", "_src_dt", "_srv_ns", "_srv_dt")

    def __init__(self) -> None:
        self._src_ns = -1
        self._src_dt = EPOCH
        self._srv_ns = -1
        self._srv_dt = EPOCH

    def source(self, ns: int) -> _dt.datetime:
        if ns != self._src_ns:
            self._src_ns = ns
            self._src_dt = EPOCH + _dt.timedelta(microseconds=ns // 1000)
        return self._src_dt

    def server(self, ns: int) -> _dt.datetime:
        if ns != self._srv_ns:
            self._srv_ns = ns
            self._srv_dt = EPOCH + _dt.timedelta(microseconds=ns // 1000)
        return self._srv_dt


def to_variant(tag: TagDef, value: Any, vtype: ua.VariantType | None = None) -> ua.Variant:
    """A store value as a Variant of the tag's type; arrays flattened with Dimensions."""
    vt = vtype or VARIANT_TYPES[tag.data_type]
    if value is None:
        return ua.Variant(None, ua.VariantType.Null)
    if tag.shape:
        arr = np.asarray(value)
        flat = arr.ravel().tolist()
        dims = list(arr.shape) if arr.ndim > 1 else None
        return ua.Variant(flat, vt, dims, True)
    if isinstance(value, np.generic):
        value = value.item()
    return ua.Variant(value, vt, None, False)


_new = object.__new__
_Variant = ua.Variant


def make_datavalue(tag: TagDef, vtype: ua.VariantType, value: Any, quality: int,
                   source_ns: int, server_ns: int, times: TimeCache) -> ua.DataValue:
    """The DataValue for one store sample. Bad quality carries no value (Part 4 7.11).

    An :class:`~iotserver.opcua.fastenc.IotDataValue`: encoded once however many clients
    receive it. Hot path: the objects are filled slot by slot, skipping the dataclass
    ``__post_init__`` checks (type guessing we do not need): 0.25 us instead of 0.8 us.
    """
    if quality & 0x80000000 or value is None:
        variant = _Variant(None, ua.VariantType.Null)
    elif tag.shape:
        variant = to_variant(tag, value, vtype)
    else:
        variant = _new(_Variant)
        variant.Value = value.item() if isinstance(value, np.generic) else value
        variant.VariantType = vtype
        variant.Dimensions = None
        variant.is_array = False
    dv = _new(IotDataValue)
    dv.Encoding = 0
    dv.Value = variant
    dv.StatusCode = status(quality)
    dv.SourceTimestamp = times.source(source_ns)
    dv.ServerTimestamp = times.server(server_ns)
    dv.SourcePicoseconds = None
    dv.ServerPicoseconds = None
    dv._bin = None
    dv._src_ns = source_ns
    dv._srv_ns = server_ns
    return dv


class WriteTypeError(Exception):
    """A written Variant does not match the variable's DataType/ValueRank (Bad_TypeMismatch)."""


def from_variant(tag: TagDef, variant: ua.Variant | None) -> Any:
    """The Python value of a written Variant, checked against the tag's type and rank.

    Part 4 5.11.4 (Write): the value's DataType must match the Variable's DataType, so an
    Int32 written to a Float variable is Bad_TypeMismatch rather than silently converted.
    """
    if variant is None or variant.VariantType is ua.VariantType.Null:
        raise WriteTypeError("null value")
    if variant.VariantType is not VARIANT_TYPES[tag.data_type]:
        raise WriteTypeError(f"expected {VARIANT_TYPES[tag.data_type].name}, "
                             f"got {variant.VariantType.name}")
    if bool(tag.shape) != bool(variant.is_array):
        raise WriteTypeError("expected an array" if tag.shape else "expected a scalar")
    if not tag.shape:
        return variant.Value
    dtype = tag.data_type.numpy_dtype
    arr = np.asarray(variant.Value if variant.Value is not None else [], dtype=dtype)
    dims = variant.Dimensions
    if dims and len(dims) > 1:
        arr = arr.reshape(dims)
    return arr


def quality_of(code: int) -> Quality:
    """The store Quality for an OPC UA StatusCode (unknown codes fall back to their severity)."""
    code &= 0xFFFF0000  # drop the info bits (Part 4 7.39.1)
    try:
        return Quality(code)
    except ValueError:
        if code & 0x80000000:
            return Quality.BAD
        if code & 0x40000000:
            return Quality.UNCERTAIN
        return Quality.GOOD
