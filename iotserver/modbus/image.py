"""The server's register image: the four Modbus tables, preencoded, kept current from the store.

Reads must be cheap and never wait: each table is a numpy array of 65536 entries holding what
a client would receive (registers already big-endian, ``>u2``; bits as 0/1 bytes), updated from
one store subscription as tags change. A read is then a range check and a slice copy.

Writes go the other way: :meth:`Image.plan_register_write` / :meth:`Image.plan_bit_write`
decode the written registers into tag values and validate every one of them (coerce: type and
range) before anything is written, so a refused request changes nothing.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from twisted.logger import Logger

from iotserver.modbus.codec import ExceptionCode, Table
from iotserver.modbus.config import BIT_TABLES, MapEntry, compatible
from iotserver.modbus.encoding import (
    INT_LIMITS,
    Kind,
    Order,
    bit_masks,
    decode_registers,
    encode_value,
    from_wire,
    pack_bits,
    set_bit,
    to_wire_bytes,
)
from iotserver.modbus.writeplan import Plan, plan_bit_write, plan_register_write
from iotserver.tags.model import Change, Scaling, TagDef, TagValue
from iotserver.tags.store import Subscription, TagStore

__all__ = ["SIZE", "Binding", "Image", "TableImage", "to_eng", "to_raw"]

log = Logger(namespace="iotserver.modbus")

SIZE = 0x10000  # MB AP 4.4: addresses 0..65535
_UNSET = object()

_STRUCT_CODES = {
    Kind.INT16: "h", Kind.UINT16: "H", Kind.INT32: "i", Kind.UINT32: "I",
    Kind.INT64: "q", Kind.UINT64: "Q", Kind.FLOAT32: "f", Kind.FLOAT64: "d",
}


def _byte_order(width: int, order: Order) -> Callable[[bytes], bytes] | None:
    """Big-endian value bytes <-> wire bytes for ``order`` (None for ABCD: identity)."""
    if order is Order.ABCD:
        return None
    words = list(range(width))
    if order.word_swap:
        words.reverse()
    perm = [2 * w + (1 - b if order.byte_swap else b) for w in words for b in (0, 1)]
    pick = operator.itemgetter(*perm)
    return lambda data: bytes(pick(data))


class Binding:
    """A map entry, the tag it currently shows (None until defined), and its fast codec.

    The struct-based codec here is the hot path of writes and tag updates; it agrees with
    ``encoding.encode_value`` / ``decode_registers`` (tested) without their numpy overhead.
    """

    __slots__ = ("address", "bad", "byte_swap", "end", "entry", "exact", "kind", "last", "limits",
                 "path",
                 "problem", "reorder", "scaling", "start", "stop", "struct", "table", "tag",
                 "writable")

    def __init__(self, entry: MapEntry) -> None:
        self.entry = entry
        self.tag: TagDef | None = None
        self.problem = "not defined"
        self.exact = False
        self.bad = True
        self.last: Any = _UNSET  # the value last encoded into the image
        self.kind = entry.mtype.kind if entry.table not in BIT_TABLES else Kind.BOOL
        # entry fields copied: these are read once or more per write and per tag update
        self.path = entry.path
        self.address = entry.address
        self.end = entry.end
        self.writable = entry.writable
        self.scaling = entry.scaling
        self.limits = INT_LIMITS.get(self.kind)
        self.table: TableImage | None = None  # set by the Image
        self.start = 2 * entry.address  # byte offsets into the table's wire bytes
        self.stop = 2 * entry.end
        code = _STRUCT_CODES.get(self.kind)
        self.struct = struct.Struct(">" + code) if code else None
        self.reorder = _byte_order(entry.mtype.width, entry.order) if code else None
        self.byte_swap = entry.order.byte_swap

    def bind(self, tag: TagDef | None) -> None:
        self.tag = tag
        self.last = _UNSET
        if tag is None:
            self.problem = "not defined"
        elif tag.is_array != bool(self.entry.count):
            self.problem = (f"an array tag (give count = {tag.shape[0]})"
                            if tag.is_array and len(tag.shape) == 1 else
                            "an array tag" if tag.is_array else
                            f"not an array (the entry has count = {self.entry.count})")
        elif tag.is_array and tag.shape != (self.entry.count,):
            self.problem = f"an array of shape {tag.shape}, not ({self.entry.count},)"
        elif not compatible(self.entry.mtype, tag.data_type):
            self.problem = f"a {tag.data_type.value} tag, not {self.entry.mtype.kind.value}"
        else:
            self.problem = ""
        # Integer registers, no scaling, a tag without a range whose type holds every value
        # the registers can: the decoded int is exactly what coerce would return, so a write
        # needs no further validation (tested against coerce).
        self.exact = False
        if not self.problem and tag is not None and self.limits is not None \
                and not self.entry.count \
                and self.scaling is None and tag.low is None and tag.high is None \
                and tag.data_type.is_integer:
            info = np.iinfo(tag.data_type.numpy_dtype)
            self.exact = info.min <= self.limits[0] and self.limits[1] <= info.max

    @property
    def usable(self) -> bool:
        return not self.problem

    def wire(self, raw: Any) -> bytes:
        """A register value (already scaled) -> its wire bytes."""
        if self.struct is not None:
            data = self.struct.pack(raw)
            return self.reorder(data) if self.reorder is not None else data
        return to_wire_bytes(encode_value(self.entry.mtype, self.entry.order, raw))

    def unwire(self, data: bytes, strict: bool = False) -> Any:
        """Wire bytes -> the register value (before scaling). ``strict``: a string whose bytes
        are not valid in its encoding raises UnicodeDecodeError instead of being replaced."""
        if self.struct is not None:
            if self.reorder is not None:
                data = self.reorder(data)
            return self.struct.unpack(data)[0]
        kind = self.kind
        if kind is Kind.BIT:
            reg = int.from_bytes(data, "little" if self.byte_swap else "big")
            return bool((reg >> self.entry.mtype.bit) & 1)
        if kind is Kind.BOOL:
            return data != b"\x00\x00"
        return decode_registers(self.entry.mtype, self.entry.order, from_wire(data),
                                errors="strict" if strict else "replace")

    def to_eng(self, raw: Any) -> Any:
        """Registers' number -> a value for the tag (see :func:`to_eng`)."""
        assert self.tag is not None
        return to_eng(self.entry, self.tag, raw)

    def encode(self, value: Any) -> bytes:
        """A tag value -> this register entry's wire bytes (scaled, clipped; arrays element by
        element). Raises ValueError, TypeError or struct.error when it cannot be encoded."""
        kind = self.kind
        if self.entry.count:
            items = value.tolist() if isinstance(value, np.ndarray) else list(value)
            if len(items) != self.entry.count:
                raise ValueError(f"{len(items)} elements, the entry has {self.entry.count}")
            if kind is Kind.BOOL:
                return b"".join(b"\x00\x01" if v else b"\x00\x00" for v in items)
            return b"".join(self.wire(_to_raw_number(self.scaling, self.limits, v))
                            for v in items)
        if kind is Kind.STRING:
            return to_wire_bytes(_encode_string(self.entry, str(value)))
        if kind is Kind.BOOL:
            return b"\x00\x01" if value else b"\x00\x00"
        return self.wire(_to_raw_number(self.scaling, self.limits, value))


def to_raw(entry: MapEntry, value: Any) -> Any:
    """Tag (engineering) value -> the number stored in the registers (scaled, rounded, clipped).

    Integer register types saturate at their limits rather than wrap (a wrapped value reads as
    plausible garbage); NaN becomes 0.
    """
    kind = entry.mtype.kind
    if kind in (Kind.BOOL, Kind.BIT):
        return bool(value)
    if kind is Kind.STRING:
        return str(value)
    return _to_raw_number(entry.scaling, INT_LIMITS.get(kind), value)


def _to_raw_number(scaling: Scaling | None, limits: tuple[int, int] | None, value: Any) -> Any:
    raw = scaling.to_raw(float(value)) if scaling is not None else value
    if limits is None:
        return float(raw)
    if type(raw) is int:  # the common case: an integer tag on integer registers
        return raw if limits[0] <= raw <= limits[1] else min(max(raw, limits[0]), limits[1])
    if isinstance(raw, float):
        if raw != raw:
            return 0
        if raw in (float("inf"), float("-inf")):
            return limits[0] if raw < 0 else limits[1]
        raw = round(raw)
    return min(max(int(raw), limits[0]), limits[1])


def to_eng(entry: MapEntry, tag: TagDef, raw: Any) -> Any:
    """Registers' number -> a value for the tag (scaling applied; rounded for integer tags)."""
    if entry.scaling is None:
        return raw
    eng = entry.scaling.to_eng(float(raw))
    if tag.data_type.is_integer:
        return round(eng)
    return eng


def _encode_string(entry: MapEntry, value: str) -> npt.NDArray[np.uint16]:
    mtype = entry.mtype
    data = value.encode(mtype.encoding, errors="replace")[: 2 * mtype.length]
    return encode_value(mtype, entry.order, data.decode(mtype.encoding, errors="ignore"))


@dataclass
class TableImage:
    """One table: values as served, which addresses are mapped/writable, who covers each."""

    table: Table
    values: npt.NDArray[Any]
    run_end: npt.NDArray[np.int32]  # address -> end of its run of mapped addresses (a if none)
    write_end: npt.NDArray[np.int32]  # the same for writable addresses
    cover: dict[int, list[Binding]]  # address -> bindings covering it
    bad: npt.NDArray[np.int16]  # address -> number of bad bindings covering it
    bad_total: int = 0
    raw: memoryview | None = None  # registers: the values' bytes (wire order), writable

    def __post_init__(self) -> None:
        if self.values.dtype.itemsize == 2:
            self.raw = self.values.data.cast("B")


def _runs(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.int32]:
    """For each address, the end (exclusive) of the run of True starting there; a for False."""
    idx = np.arange(SIZE, dtype=np.int64)
    first_false = np.minimum.accumulate(np.where(mask, SIZE, idx)[::-1])[::-1]
    return first_false.astype(np.int32)


class Image:
    """The four tables for one map; subscribes to the store while started."""

    def __init__(self, entries: Iterable[MapEntry], store: TagStore, *,
                 bad_quality: str = "last", unmapped_reads: str = "exception") -> None:
        self.store = store
        self.strict = unmapped_reads == "exception"
        self.bad_exception = bad_quality == "exception"
        self.bindings = [Binding(e) for e in entries]
        self.by_path: dict[str, list[Binding]] = {}
        for b in self.bindings:
            self.by_path.setdefault(b.entry.path, []).append(b)
        # tags with more than one entry: a write covering two of them must agree (writeplan)
        self.mapped_twice = frozenset(p for p, bs in self.by_path.items() if len(bs) > 1)
        self.tables: dict[Table, TableImage] = {}
        for table in Table:
            bits = table in BIT_TABLES
            mapped = np.zeros(SIZE, dtype=np.bool_)
            writable = np.zeros(SIZE, dtype=np.bool_)
            cover: dict[int, list[Binding]] = {}
            for b in self.bindings:
                e = b.entry
                if e.table is not table:
                    continue
                mapped[e.address:e.end] = True
                if e.writable:
                    writable[e.address:e.end] = True
                for a in range(e.address, e.end):
                    cover.setdefault(a, []).append(b)
            bad = np.zeros(SIZE, dtype=np.int16)
            for b in self.bindings:
                if b.entry.table is table:
                    bad[b.entry.address:b.entry.end] += 1
            self.tables[table] = TableImage(
                table,
                np.zeros(SIZE, dtype=np.uint8 if bits else ">u2"),
                _runs(mapped), _runs(writable), cover, bad,
                sum(1 for b in self.bindings if b.entry.table is table),
            )
        for b in self.bindings:
            b.table = self.tables[b.entry.table]
        self._hr = self.tables[Table.HOLDING_REGISTERS]
        # FC06's short way (ModbusServerProtocol): holding registers covered by exactly one
        # writable binding, a one-register integer whose wire bytes are the value's big-endian
        # bytes, and whose tag has no other binding (a write changes only that register).
        self.single_registers: dict[int, Binding] = {}
        for address, covering in self._hr.cover.items():
            if len(covering) != 1:
                continue
            b = covering[0]
            if b.end - b.address == 1 and b.writable and b.reorder is None and not b.entry.count \
                    and b.kind in (Kind.UINT16, Kind.INT16) and len(self.by_path[b.path]) == 1:
                self.single_registers[address] = b
        self._coils = self.tables[Table.COILS]
        # holding register -> the bits that ``bit:`` entries map in it (writeplan: a write may
        # not change the others)
        self.bit_masks: dict[int, int] = {}
        for b in self.bindings:
            if b.kind is Kind.BIT and b.entry.table is Table.HOLDING_REGISTERS:
                mask = bit_masks(b.entry.mtype, b.entry.order, True)[1]
                self.bit_masks[b.address] = self.bit_masks.get(b.address, 0) | mask
        self._sub: Subscription | None = None
        self._undefine: Any = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Bind the map to the store's tags and follow their changes."""
        for path, bindings in self.by_path.items():
            tag = self.store.tag(path) if path in self.store else None
            for b in bindings:
                b.bind(tag)
                if b.problem and tag is not None:
                    log.error("modbus map {key}: {path} is {problem}; its addresses read as 0 "
                              "and refuse writes", key=b.entry.key, path=path, problem=b.problem)
            if tag is None:
                log.warn("modbus map: {path} is not defined (yet); its addresses read as 0",
                         path=path)
            else:
                self._apply(bindings, self.store.read(path))
        self._undefine = self.store.on_define(self._on_define)
        self._sub = self.store.subscribe("**", self._on_changes, name="modbus server image",
                                         initial=False)

    @property
    def subscription(self) -> Subscription | None:
        """The image's store subscription (a write's ``origin``, see ``TagStore.write_now``)."""
        return self._sub

    def stop(self) -> None:
        if self._sub is not None:
            self._sub.cancel()
            self._sub = None
        if self._undefine is not None:
            self._undefine()
            self._undefine = None

    def _on_define(self, tag: TagDef, added: bool) -> None:
        bindings = self.by_path.get(tag.path)
        if not bindings:
            return
        for b in bindings:
            b.bind(tag if added else None)
        self._apply(bindings, self.store.read(tag.path) if added else None)

    def _on_changes(self, changes: list[Change]) -> None:
        by_path = self.by_path
        for tag, tv in changes:
            bindings = by_path.get(tag.path)
            if bindings is not None:
                if bindings[0].tag is not tag:
                    for b in bindings:
                        b.bind(tag)
                self._apply(bindings, tv)

    def refresh(self, paths: Iterable[str]) -> None:
        """Re-encode tags from the store now (after a write, so the writer reads it back)."""
        for path in paths:
            bindings = self.by_path.get(path)
            if bindings and path in self.store:
                self._apply(bindings, self.store.read(path))

    # -- encoding into the tables ------------------------------------------------------------
    def _apply(self, bindings: list[Binding], tv: TagValue | None) -> None:
        value = None if tv is None else tv.value
        # Quality is an IntEnum: the Bad bit tested directly (the is_bad property is slower)
        good = value is not None and not tv.quality & 0x80000000  # type: ignore[union-attr]
        for b in bindings:
            usable = not b.problem
            shown_good = good and usable
            if shown_good == b.bad:  # quality transition
                t = b.table
                assert t is not None
                b.bad = not shown_good
                delta = -1 if shown_good else 1
                t.bad[b.address:b.end] += delta
                t.bad_total += delta
            if not usable:
                self._put(b, None)
            elif value is not None:
                self._put(b, value)

    def _put(self, b: Binding, value: Any) -> None:
        if value is b.last and value is not None:
            return
        b.last = value
        e = b.entry
        t = b.table
        assert t is not None
        kind = b.kind
        if t.raw is None:
            if e.count:
                t.values[e.address:e.end] = 0 if value is None else np.asarray(value, np.bool_)
            else:
                t.values[e.address] = 1 if value else 0
            return
        if kind is Kind.BIT:
            t.values[e.address] = set_bit(int(t.values[e.address]), e.mtype, e.order, bool(value))
            return
        if value is None:
            t.values[e.address:e.end] = 0
            return
        try:
            if b.struct is not None and not e.count:  # a number: the hot path, inline
                data = b.wire(_to_raw_number(b.scaling, b.limits, value))
            else:
                data = b.encode(value)
        except (ValueError, TypeError, struct.error) as exc:
            log.warn("modbus map {key}: cannot encode {path} = {v!r}: {exc}", key=e.key,
                     path=e.path, v=value, exc=str(exc))
            return
        t.raw[b.start:b.stop] = data

    # -- reads (hot path) -------------------------------------------------------------------
    def read_registers(self, table: Table, address: int, count: int) -> bytes | ExceptionCode:
        """Wire bytes of ``count`` registers, or the exception to answer (02 unmapped, 04 bad)."""
        t = self.tables[table]
        end = address + count
        if self.strict and t.run_end[address] < end:
            return ExceptionCode.ILLEGAL_DATA_ADDRESS  # MB AP 6.3: address + quantity not valid
        if self.bad_exception and t.bad_total and t.bad[address:end].any():
            return ExceptionCode.SERVER_DEVICE_FAILURE
        return t.values[address:end].tobytes()

    def read_bits(self, table: Table, address: int, count: int) -> bytes | ExceptionCode:
        """Packed coil/input bytes (MB AP 6.1), or the exception to answer."""
        t = self.tables[table]
        end = address + count
        if self.strict and t.run_end[address] < end:
            return ExceptionCode.ILLEGAL_DATA_ADDRESS
        if self.bad_exception and t.bad_total and t.bad[address:end].any():
            return ExceptionCode.SERVER_DEVICE_FAILURE
        return pack_bits(t.values[address:end])

    def register(self, table: Table, address: int) -> int:
        """One register's current value (for FC16 mask write)."""
        return int(self.tables[table].values[address])

    # -- write planning (iotserver.modbus.writeplan) ----------------------------------------
    @property
    def tables_hr(self) -> TableImage:
        return self._hr

    @property
    def tables_coils(self) -> TableImage:
        return self._coils

    def plan_register_write(self, address: int, wire: bytes) -> Plan | ExceptionCode:
        """Holding registers ``address..`` := ``wire`` (see ``writeplan``)."""
        return plan_register_write(self, address, wire)

    def plan_bit_write(self, address: int, values: Iterable[bool]) -> Plan | ExceptionCode:
        """Coils ``address..`` := ``values`` (see ``writeplan``)."""
        return plan_bit_write(self, address, values)
