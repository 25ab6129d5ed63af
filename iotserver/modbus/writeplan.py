"""Planning a Modbus write against the register image: every target decoded and validated
before anything is written, so a refused request changes nothing.

A plan is the list of (binding, tag value) writes a request stands for, or the exception that
refuses the whole request:

- 02 Illegal Data Address: an address unmapped or read-only; part of a multi-register value
  (or of an array element); a tag that is missing or not writable; a changed bit of a shared
  register that no ``bit:`` entry maps;
- 03 Illegal Data Value: a value the tag refuses (type, range; MB AP 6.12 "illegal data
  value"); string bytes that are not valid in the entry's encoding; one tag written twice in
  the request with values that differ.

Array tags (``count``) may be written element by element: the elements the request does not
cover keep the values the image shows.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from iotserver.modbus.codec import ExceptionCode, Table
from iotserver.modbus.encoding import Kind
from iotserver.tags.model import CoerceError, TagDef, coerce

if TYPE_CHECKING:
    from iotserver.modbus.image import Binding, Image, TableImage

__all__ = ["Plan", "plan_bit_write", "plan_register_write", "refused_read_after_write"]

Plan = list[tuple["Binding", Any]]
Claims = dict[str, list[tuple["Binding", Any, bytes]]]  # path -> (binding, value, its bytes)

_REGISTER_TABLES = (Table.HOLDING_REGISTERS, Table.INPUT_REGISTERS)
_ADDRESS = ExceptionCode.ILLEGAL_DATA_ADDRESS
_VALUE = ExceptionCode.ILLEGAL_DATA_VALUE


def _covering(t: TableImage, address: int, end: int) -> list[Binding] | ExceptionCode:
    if t.write_end[address] < end:
        return _ADDRESS  # not mapped, or mapped read-only
    cover = t.cover
    if end - address == 1:
        return cover[address]
    seen: dict[int, Binding] = {}
    for a in range(address, end):
        for b in cover.get(a, ()):
            seen[id(b)] = b
    return list(seen.values())


def _overlay(b: Binding, address: int, end: int, current: bytes, wire: bytes) -> bytes | None:
    """The binding's registers as the request leaves them (its bytes over ``current``), or
    None when the request covers only part of a value (or of an array element)."""
    if b.address >= address and b.end <= end:
        base = 2 * address
        return wire[b.start - base:b.stop - base]
    if not b.entry.count:
        return None
    ew = b.entry.element_width
    lo, hi = max(address, b.address), min(end, b.end)
    if (lo - b.address) % ew or (hi - b.address) % ew:
        return None
    out = bytearray(current)
    out[2 * (lo - b.address):2 * (hi - b.address)] = wire[2 * (lo - address):2 * (hi - address)]
    return bytes(out)


def _value(b: Binding, tag: TagDef, data: bytes) -> Any:
    """Wire bytes of a binding -> the tag value, validated; raises CoerceError/ValueError."""
    if b.entry.count:
        ew = 2 * b.entry.element_width
        raws = [b.unwire(data[i:i + ew]) for i in range(0, len(data), ew)]
        if b.scaling is not None:
            raws = [b.to_eng(r) for r in raws]
        return coerce(tag, raws)
    raw = b.unwire(data, strict=True)
    if b.exact:
        return raw  # the decoded int is what coerce would return (Binding.bind)
    return coerce(tag, raw if b.scaling is None else b.to_eng(raw))


def _consistent(claims: list[tuple[Binding, Any, bytes]]) -> bool:
    """One tag written through several entries of one request: do all of them carry the same
    value? The first entry's value is encoded into every other entry and compared with what
    the request put there (a float32 copy and a scaled int16 copy of one value agree)."""
    value = claims[0][1]
    for b, other, data in claims[1:]:
        if b.kind is Kind.BIT or b.entry.table not in _REGISTER_TABLES:
            same = np.array_equal(value, other) if b.entry.count else bool(value) == bool(other)
        else:
            same = b.encode(value) == data
        if not same:
            return False
    return True


def _finish(plan: Plan, claims: Claims) -> Plan | ExceptionCode:
    for path_claims in claims.values():
        if len(path_claims) > 1 and not _consistent(path_claims):
            return _VALUE
    return plan


def plan_register_write(image: Image, address: int, wire: bytes) -> Plan | ExceptionCode:
    """Holding registers ``address..`` := ``wire`` (big-endian): the writes, validated.

    A bit of a shared register is written only when it changes; a changed bit that no entry
    maps refuses the request (02), as an unmapped address would.
    """
    t = image.tables_hr
    end = address + len(wire) // 2
    covering = _covering(t, address, end)
    if type(covering) is not list:
        return covering  # type: ignore[return-value]  # an ExceptionCode
    raw_image = t.raw
    assert raw_image is not None
    masks = image.bit_masks
    if masks:
        for a in range(address, end):
            mask = masks.get(a)
            if mask is not None:
                i = 2 * (a - address)
                new = (wire[i] << 8) | wire[i + 1]
                old = (raw_image[2 * a] << 8) | raw_image[2 * a + 1]
                if (new ^ old) & ~mask & 0xFFFF:
                    return _ADDRESS
    plan: Plan = []
    claims: Claims = {}
    twice = image.mapped_twice
    base = 2 * address
    for b in covering:
        if b.address >= address and b.end <= end:  # the common case: wholly written
            data = wire[b.start - base:b.stop - base]
        else:
            overlaid = _overlay(b, address, end, bytes(raw_image[b.start:b.stop]), wire)
            if overlaid is None:
                return _ADDRESS
            data = overlaid
        tag = b.tag
        if b.kind is Kind.BIT:
            bit = b.unwire(data)
            if bit == b.unwire(bytes(raw_image[b.start:b.stop])):
                if b.path in twice:
                    claims.setdefault(b.path, []).append((b, bit, data))
                continue  # unchanged: not written (a read-only bit may share the register)
        if tag is None or b.problem or not tag.writable or not b.writable:
            return _ADDRESS
        # the one validation of the value; the store does not coerce it again
        try:
            value = _value(b, tag, data)
        except (CoerceError, UnicodeDecodeError, ValueError):
            return _VALUE
        plan.append((b, value))
        if b.path in twice:
            claims.setdefault(b.path, []).append((b, value, data))
    return _finish(plan, claims) if claims else plan


def plan_bit_write(image: Image, address: int, values: Iterable[bool]) -> Plan | ExceptionCode:
    """Coils ``address..`` := ``values`` (FC05/FC0F), validated like registers."""
    t = image.tables_coils
    vals = list(values)
    end = address + len(vals)
    covering = _covering(t, address, end)
    if type(covering) is not list:
        return covering  # type: ignore[return-value]  # an ExceptionCode
    plan: Plan = []
    claims: Claims = {}
    for b in covering:
        tag = b.tag
        if b.problem or tag is None or not tag.writable:
            return _ADDRESS
        if b.entry.count:
            current = t.values[b.address:b.end].astype(np.bool_)
            lo, hi = max(address, b.address), min(end, b.end)
            current[lo - b.address:hi - b.address] = vals[lo - address:hi - address]
            raw: Any = current
        else:
            raw = bool(vals[b.address - address])
        try:
            value = coerce(tag, raw)
        except CoerceError:
            return _VALUE
        plan.append((b, value))
        if b.path in image.mapped_twice:
            claims.setdefault(b.path, []).append((b, value, b""))
    return _finish(plan, claims) if claims else plan


def refused_read_after_write(image: Image, address: int, count: int,
                             plan: Plan) -> ExceptionCode | None:
    """FC17's read part, checked before its write (MB AP 6.17): the exception the read would
    get once the planned write is done, so that a request refused changes nothing.

    A Bad register the write itself makes Good (a memory tag written) does not refuse it.
    """
    t = image.tables_hr
    end = address + count
    if image.strict and t.run_end[address] < end:
        return _ADDRESS
    if image.bad_exception and t.bad_total and t.bad[address:end].any():
        written = {id(b) for b, _ in plan}
        for a in range(address, end):
            for b in t.cover.get(a, ()):
                if b.bad and id(b) not in written:
                    return ExceptionCode.SERVER_DEVICE_FAILURE
    return None
