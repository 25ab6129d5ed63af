"""Poll planning: merge a device's tags into as few Modbus reads as possible, decode in batches.

One 100-register read costs about as much as a one-register read (a request round trip is the
cost, measured with pymodbus against the simulated PLC), so tags of the
same unit and table that lie close together are read as one block: up to 125 registers or 2000
bits per request (MB AP 6.1-6.4), optionally spanning gaps of up to ``max_gap`` unused
addresses. Inside a block, tags of one Modbus type and order are decoded by one
:class:`BatchDecoder` gather; scaling is one multiply-add over the group.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import numpy as np
import numpy.typing as npt

from iotserver.modbus.codec import Table
from iotserver.modbus.config import BIT_TABLES, DeviceTag
from iotserver.modbus.encoding import BatchDecoder, Kind
from iotserver.tags.model import DataType, Quality

__all__ = ["Block", "DecodeGroup", "plan_blocks"]

REGISTER_LIMIT = 125  # MB AP 6.3: quantity of registers 1..125
BIT_LIMIT = 2000  # MB AP 6.1: quantity of coils 1..2000

_GOOD = Quality.GOOD


def _target(tag_type: DataType) -> str:
    if tag_type is DataType.BOOLEAN:
        return "bool"
    if tag_type is DataType.STRING:
        return "str"
    return "int" if tag_type.is_integer else "float"


@dataclass
class DecodeGroup:
    """Tags of one block sharing Modbus type, order, scaling-or-not and target type."""

    decoder: BatchDecoder | None  # None for bit tables (coils, discrete inputs)
    offsets: npt.NDArray[np.intp]
    paths: list[str]
    target: str
    gain: npt.NDArray[np.float64] | None = None
    offset: npt.NDArray[np.float64] | None = None

    def values(self, regs: npt.NDArray[Any]) -> list[Any]:
        """Python values of the group's tags from the block's registers (or bits)."""
        raw = regs[self.offsets] if self.decoder is None else self.decoder(regs)
        if self.gain is not None and self.offset is not None:
            eng = raw.astype(np.float64) * self.gain + self.offset
            if self.target == "int":
                return np.rint(eng).astype(np.int64).tolist()  # type: ignore[no-any-return]
            return eng.tolist()  # type: ignore[no-any-return]
        if self.target == "float" and raw.dtype.kind != "f":
            return raw.astype(np.float64).tolist()  # type: ignore[no-any-return]
        if self.target == "int" and raw.dtype.kind == "f":
            finite = np.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)
            return np.rint(finite).astype(np.int64).tolist()  # type: ignore[no-any-return]
        if self.target == "bool":
            return raw.astype(np.bool_).tolist()  # type: ignore[no-any-return]
        return raw.tolist()  # type: ignore[no-any-return]


@dataclass
class Block:
    """One read request: ``count`` registers or bits of ``table`` at ``address`` of ``unit``."""

    unit: int
    table: Table
    address: int
    count: int
    tags: list[DeviceTag]
    groups: list[DecodeGroup] = field(default_factory=list)

    @property
    def bits(self) -> bool:
        return self.table in BIT_TABLES

    @property
    def paths(self) -> list[str]:
        return [t.tag.path for t in self.tags]

    @property
    def has_gaps(self) -> bool:
        """True when the block reads addresses no tag uses (a device may refuse those: 02)."""
        covered = np.zeros(self.count, dtype=np.bool_)
        for t in self.tags:
            covered[t.address - self.address:t.address - self.address + t.width] = True
        return not bool(covered.all())

    def build(self) -> Block:
        """Create the decode groups (once per plan)."""
        keyed: dict[tuple[Any, ...], list[DeviceTag]] = {}
        for t in self.tags:
            scaled = t.tag.scaling is not None
            key = (t.mtype, t.order, scaled, _target(t.tag.data_type))
            keyed.setdefault(key, []).append(t)
        self.groups = []
        for (mtype, order, scaled, target), tags in keyed.items():
            offsets = np.array([t.address - self.address for t in tags], dtype=np.intp)
            decoder = None
            if not self.bits:
                bits = [t.mtype.bit for t in tags] if mtype.kind is Kind.BIT else None
                decoder = BatchDecoder(mtype, order, offsets, bits)
            group = DecodeGroup(decoder, offsets, [t.tag.path for t in tags], target)
            if scaled:
                scalings = [t.tag.scaling for t in tags]
                group.gain = np.array([s.gain for s in scalings if s], dtype=np.float64)
                group.offset = np.array(
                    [s.eng_low - s.raw_low * s.gain for s in scalings if s], dtype=np.float64
                )
            self.groups.append(group)
        return self

    def decode(self, regs: npt.NDArray[Any], source_ns: int = 0) -> list[tuple[Any, ...]]:
        """Update tuples (path, value, Good, source_ns) for every tag of the block."""
        out: list[tuple[Any, ...]] = []
        for g in self.groups:
            out += zip(g.paths, g.values(regs), repeat(_GOOD), repeat(source_ns))
        return out

    def split(self) -> list[Block]:
        """The same tags as gap-free blocks (after a device refused the gaps with 02)."""
        return plan_blocks(self.tags, max_gap=0, max_registers=self.count, max_bits=self.count)


def plan_blocks(
    tags: Iterable[DeviceTag],
    *,
    max_gap: int = 0,
    max_registers: int = REGISTER_LIMIT,
    max_bits: int = BIT_LIMIT,
) -> list[Block]:
    """Group by (unit, table), sort by address, merge greedily within the limits.

    A tag joins the current block when it starts at most ``max_gap`` addresses after the
    block's end (overlapping tags always may) and the block stays within the size limit.
    """
    by_key: dict[tuple[int, Table], list[DeviceTag]] = {}
    for t in tags:
        by_key.setdefault((t.unit, t.table), []).append(t)
    blocks: list[Block] = []
    for (unit, table), items in sorted(by_key.items(), key=lambda kv: (kv[0][0], kv[0][1].value)):
        limit = max_bits if table in BIT_TABLES else max_registers
        items.sort(key=lambda t: (t.address, t.width))
        current: list[DeviceTag] = []
        start = end = 0
        for t in items:
            t_end = t.address + t.width
            if current and t.address - end <= max_gap and max(end, t_end) - start <= limit:
                current.append(t)
                end = max(end, t_end)
                continue
            if current:
                blocks.append(Block(unit, table, start, end - start, current).build())
            current, start, end = [t], t.address, t_end
        if current:
            blocks.append(Block(unit, table, start, end - start, current).build())
    return blocks


def bad_updates(paths: Sequence[str], values: Sequence[Any], quality: Quality,
                source_ns: int = 0) -> list[tuple[Any, ...]]:
    """Update tuples keeping the last values with a Bad quality."""
    return list(zip(paths, values, repeat(quality), repeat(source_ns)))
