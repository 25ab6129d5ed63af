"""The server's write paths, in-process (StringTransport, task.Clock): the synchronous path for
memory tags, owners that answer later, refusals, and what other subscribers see."""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport

from iotserver.modbus.codec import Table
from iotserver.modbus.config import MapEntry, ServerConfig
from iotserver.modbus.encoding import ModbusType, Order
from iotserver.modbus.server import ModbusServer, ModbusServerProtocol
from iotserver.tags.model import Access, Change, DataType, Quality, TagDef, Update
from iotserver.tags.store import MemoryOwner, TagStore, WriteRefused

HR = Table.HOLDING_REGISTERS
RW = Access.READ_WRITE


class PlcOwner:
    """A PLC behind the gateway: answers each write when the test says so."""

    def __init__(self, store: TagStore) -> None:
        self.store = store
        self.calls: list[tuple[str, Any, Deferred[Quality]]] = []

    def write_tag(self, tag: TagDef, value: Any) -> Deferred[Quality]:
        d: Deferred[Quality] = Deferred()
        self.calls.append((tag.path, value, d))
        return d

    def answer(self, quality: Quality = Quality.GOOD) -> None:
        path, value, d = self.calls.pop(0)
        if quality is Quality.GOOD:
            self.store.apply([Update(path, value)])
        d.callback(quality)


class Refuser:
    def write_tag(self, tag: TagDef, value: Any) -> Quality:
        raise WriteRefused(Quality.BAD_USER_ACCESS_DENIED)


class Rig:
    def __init__(self) -> None:
        self.clock = task.Clock()
        self.store = TagStore(self.clock, write_timeout=5.0)
        self.store.register_owner("memory", MemoryOwner(self.store))
        self.plc = PlcOwner(self.store)
        self.store.register_owner("plc", self.plc)
        self.store.register_owner("refuser", Refuser())
        tags = [
            TagDef("M/A", DataType.UINT16, access=RW, initial=1),
            TagDef("M/B", DataType.INT16, access=RW, initial=2),
            TagDef("M/Ranged", DataType.UINT16, access=RW, low=0, high=100, initial=3),
            TagDef("M/RO", DataType.UINT16, initial=4),
            TagDef("M/Twice", DataType.UINT16, access=RW, initial=5),
            TagDef("P/X", DataType.UINT16, access=RW, owner="plc", initial=6),
            TagDef("M/C", DataType.UINT16, access=RW, initial=9),
            TagDef("P/Y", DataType.UINT16, access=RW, owner="plc", initial=10),
            TagDef("P/Nope", DataType.UINT16, access=RW, owner="refuser", initial=7),
            TagDef("P/Gone", DataType.UINT16, access=RW, owner="nobody", initial=8),
        ]
        for t in tags:
            self.store.define(t)
        u16 = ModbusType.parse("uint16")
        i16 = ModbusType.parse("int16")
        entries = [
            MapEntry("m0", "M/A", HR, 0, u16, Order.ABCD),
            MapEntry("m1", "M/B", HR, 1, i16, Order.ABCD),
            MapEntry("m2", "M/Ranged", HR, 2, u16, Order.ABCD),
            MapEntry("m3", "M/RO", HR, 3, u16, Order.ABCD),
            MapEntry("m4", "P/X", HR, 4, u16, Order.ABCD),
            MapEntry("m5", "P/Nope", HR, 5, u16, Order.ABCD),
            MapEntry("m6", "P/Gone", HR, 6, u16, Order.ABCD),
            MapEntry("m7", "M/Twice", HR, 7, u16, Order.ABCD),
            MapEntry("m8", "M/Twice", HR, 8, u16, Order.ABCD),
            MapEntry("m10", "M/C", HR, 10, u16, Order.ABCD),
            MapEntry("m11", "P/Y", HR, 11, u16, Order.ABCD),
        ]
        cfg = ServerConfig(endpoints=("tcp:502",), map=tuple(entries), idle_timeout=0,
                           max_requests_in_flight=4)
        self.server = ModbusServer(cfg, self.store, self.clock)
        self.server.start()
        self.seen: list[tuple[str, Any]] = []  # another endpoint (OPC UA, MQTT ...)
        self.store.subscribe("**", self._seen, name="other endpoint", initial=False)
        self.clock.advance(0)

    def _seen(self, changes: list[Change]) -> None:
        self.seen.extend((c.tag.path, c.value.value) for c in changes)

    def connect(self) -> tuple[ModbusServerProtocol, StringTransport]:
        proto = self.server.factory().buildProtocol(None)
        tr = StringTransport()
        proto.makeConnection(tr)
        return proto, tr

    def hr(self, address: int, count: int = 1) -> list[int]:
        data = self.server.image.read_registers(HR, address, count)
        assert isinstance(data, bytes)
        return list(struct.unpack(f">{count}H", data))


def adu(tid: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, 1) + pdu


def fc06(tid: int, address: int, value: int) -> bytes:
    return adu(tid, struct.pack(">BHH", 6, address, value))


def fc10(tid: int, address: int, values: list[int]) -> bytes:
    n = len(values)
    return adu(tid, struct.pack(f">BHHB{n}H", 0x10, address, n, 2 * n, *values))


def fc03(tid: int, address: int, count: int) -> bytes:
    return adu(tid, struct.pack(">BHH", 3, address, count))


def exc(tid: int, fc: int, code: int) -> bytes:
    return adu(tid, bytes((fc | 0x80, code)))


def take(tr: StringTransport) -> bytes:
    out: bytes = tr.value()
    tr.clear()
    return out


def test_memory_write_answers_at_once_and_others_see_it() -> None:
    rig = Rig()
    proto, tr = rig.connect()
    # a write and a read of it pipelined in one segment: the read sees the new value
    proto.dataReceived(fc06(1, 0, 0xBEEF) + fc03(2, 0, 1))
    assert take(tr) == fc06(1, 0, 0xBEEF) + adu(2, b"\x03\x02\xbe\xef")
    assert rig.store.read("M/A").value == 0xBEEF
    # the image did not need a reactor turn; the other endpoint gets it on the next one
    assert rig.seen == []
    rig.clock.advance(0)
    assert rig.seen == [("M/A", 0xBEEF)]
    assert rig.server.stats.requests[6] == 1


def test_memory_write_without_other_subscribers_schedules_nothing() -> None:
    rig = Rig()
    for sub in rig.store.subscriptions:
        if sub.name == "other endpoint":
            sub.cancel()
    proto, tr = rig.connect()
    proto.dataReceived(fc06(1, 1, 0xFFFE))  # int16 -2
    assert take(tr) == fc06(1, 1, 0xFFFE)
    assert rig.store.read("M/B").value == -2
    assert rig.clock.getDelayedCalls() == []  # no flush turn: the image was updated directly
    assert rig.hr(1) == [0xFFFE]


def test_write_after_pending_update_is_not_overwritten_by_it() -> None:
    """An older change still pending for the image must not follow the written value."""
    rig = Rig()
    proto, tr = rig.connect()
    rig.store.apply([Update("M/A", 11)])  # delivered to the image on the next turn
    proto.dataReceived(fc06(1, 0, 12))
    assert take(tr) == fc06(1, 0, 12)
    rig.clock.advance(0)
    assert rig.hr(0) == [12] and rig.store.read("M/A").value == 12
    assert rig.seen == [("M/A", 12)]  # conflated for the other endpoint


def test_refused_single_writes_change_nothing() -> None:
    rig = Rig()
    proto, tr = rig.connect()
    proto.dataReceived(fc06(1, 2, 101))  # above the tag's range
    assert take(tr) == exc(1, 6, 3)
    proto.dataReceived(fc06(2, 3, 1))  # read-only tag
    assert take(tr) == exc(2, 6, 2)
    proto.dataReceived(fc06(3, 9, 1))  # unmapped
    assert take(tr) == exc(3, 6, 2)
    proto.dataReceived(fc06(4, 5, 1))  # the owner refuses: BadUserAccessDenied -> 01
    assert take(tr) == exc(4, 6, 1)
    proto.dataReceived(fc06(5, 6, 1))  # no owner running: BadNotConnected -> 0B
    assert take(tr) == exc(5, 6, 0x0B)
    proto.dataReceived(adu(6, struct.pack(">BHHB", 6, 0, 1, 0)))  # FC06 with 6 data bytes
    assert take(tr) == exc(6, 6, 3)
    rig.clock.advance(0)
    assert rig.seen == []
    assert [rig.store.read(p).value for p in ("M/Ranged", "M/RO", "P/Nope", "P/Gone")] == \
        [3, 4, 7, 8]
    assert rig.hr(2, 5) == [3, 4, 6, 7, 8]
    assert rig.server.stats.exceptions[(6, 3)] == 2


def test_multi_register_write_with_one_refused_value_writes_nothing() -> None:
    rig = Rig()
    proto, tr = rig.connect()
    proto.dataReceived(fc10(1, 0, [50, 60, 101]))  # 101 is outside M/Ranged's range
    assert take(tr) == exc(1, 0x10, 3)
    proto.dataReceived(fc10(2, 0, [50, 60, 70, 80]))  # M/RO is read-only
    assert take(tr) == exc(2, 0x10, 2)
    rig.clock.advance(0)
    assert rig.seen == []
    assert rig.hr(0, 4) == [1, 2, 3, 4]
    assert [rig.store.read(p).value for p in ("M/A", "M/B", "M/Ranged")] == [1, 2, 3]
    # all valid: all written, answered at once
    proto.dataReceived(fc10(3, 0, [50, 60, 70]))
    assert take(tr) == adu(3, struct.pack(">BHH", 0x10, 0, 3))
    assert rig.hr(0, 3) == [50, 60, 70]
    rig.clock.advance(0)
    assert sorted(rig.seen) == [("M/A", 50), ("M/B", 60), ("M/Ranged", 70)]


def test_tag_mapped_twice_in_one_range_is_written_once() -> None:
    rig = Rig()
    proto, tr = rig.connect()
    proto.dataReceived(fc10(1, 7, [22, 22]))
    assert take(tr) == adu(1, struct.pack(">BHH", 0x10, 7, 2))
    assert rig.store.read("M/Twice").value == 22
    assert rig.hr(7, 2) == [22, 22]
    assert rig.store.stats.writes == 1


def test_tag_written_twice_with_different_values_is_refused() -> None:
    """One request, one tag, two values: 03, and nothing changes (not the last one wins)."""
    rig = Rig()
    proto, tr = rig.connect()
    proto.dataReceived(fc10(1, 7, [21, 22]))
    assert take(tr) == exc(1, 0x10, 3)
    assert rig.store.read("M/Twice").value == 5
    assert rig.hr(7, 2) == [5, 5]
    assert rig.store.stats.writes == 0


def test_plc_write_waits_for_the_owner_and_keeps_order() -> None:
    rig = Rig()
    proto, tr = rig.connect()
    proto.dataReceived(fc06(1, 4, 99) + fc03(2, 4, 1))
    assert tr.value() == b""  # the reply waits for the PLC; the read waits behind it
    assert [(p, v) for p, v, _ in rig.plc.calls] == [("P/X", 99)]
    reader, rtr = rig.connect()  # another connection still reads the old value meanwhile
    reader.dataReceived(fc03(1, 4, 1))
    assert take(rtr) == adu(1, b"\x03\x02\x00\x06")
    rig.plc.answer()
    assert take(tr) == fc06(1, 4, 99) + adu(2, b"\x03\x02\x00\x63")
    # a refused PLC write: its exception, the value unchanged
    proto.dataReceived(fc06(3, 4, 5))
    rig.plc.answer(Quality.BAD_OUT_OF_RANGE)
    assert take(tr) == exc(3, 6, 3)
    # no answer at all: BadTimeout after the store's write timeout -> 0B
    proto.dataReceived(fc06(4, 4, 5))
    rig.clock.advance(5.0)
    assert take(tr) == exc(4, 6, 0x0B)
    assert rig.store.read("P/X").value == 99 and rig.hr(4) == [99]


def test_mixed_owners_answer_after_all_and_memory_part_shows_at_once() -> None:
    rig = Rig()
    proto, tr = rig.connect()
    proto.dataReceived(fc10(1, 10, [31, 32]))  # M/C (memory) and P/Y (PLC) in one request
    assert tr.value() == b""
    reader, rtr = rig.connect()
    reader.dataReceived(fc03(1, 10, 2))
    assert take(rtr) == adu(1, struct.pack(">BBHH", 3, 4, 31, 10))  # P/Y not yet
    rig.plc.answer()
    assert take(tr) == adu(1, struct.pack(">BHH", 0x10, 10, 2))
    assert rig.hr(10, 2) == [31, 32]
    # the PLC refuses: exception 04 for BadDeviceFailure, although M/C was written (two
    # owners cannot write atomically; the values were validated before either write)
    proto.dataReceived(fc10(2, 10, [41, 42]))
    rig.plc.answer(Quality.BAD_DEVICE_FAILURE)
    assert take(tr) == exc(2, 0x10, 4)
    assert rig.hr(10, 2) == [41, 32]
    rig.clock.advance(0)
    assert ("M/C", 41) in rig.seen and ("P/Y", 42) not in rig.seen


def test_whole_fc06_frames_take_the_short_way_with_the_same_outcome() -> None:
    """A whole FC06 frame on a single-register tag skips the frame decoder and the write
    planner (``_write_register_fast``); the same frames split in two take the normal way.
    Replies, stored values, image, notifications and counters must not differ."""
    rigs = [Rig(), Rig()]
    conns = [r.connect() for r in rigs]
    handled: list[list[int]] = [[], []]
    for (proto, _tr), log in zip(conns, handled, strict=True):
        normal = proto._handle

        def spy(frame: Any, normal: Any = normal, log: list[int] = log) -> Any:
            log.append(frame[0])
            return normal(frame)

        proto._handle = spy  # type: ignore[method-assign]

    def both(frame: bytes, plc: Quality | None = None) -> bytes:
        out = []
        for i, (rig, (proto, tr)) in enumerate(zip(rigs, conns, strict=True)):
            if i == 0:
                proto.dataReceived(frame)
            else:
                proto.dataReceived(frame[:5])
                proto.dataReceived(frame[5:])
            if plc is not None:
                rig.plc.answer(plc)
            rig.clock.advance(0)
            out.append(take(tr))
        assert out[0] == out[1], frame
        return out[0]

    assert both(fc06(1, 0, 0xBEEF)) == fc06(1, 0, 0xBEEF)  # memory uint16
    assert both(fc06(2, 0, 0xBEEF)) == fc06(2, 0, 0xBEEF)  # the same value again
    assert both(fc06(3, 1, 0x8000)) == fc06(3, 1, 0x8000)  # memory int16: -32768
    assert both(fc06(4, 2, 50)) == fc06(4, 2, 50)  # a ranged tag: coerced the normal way
    assert both(fc06(5, 2, 101)) == exc(5, 6, 3)
    assert both(fc06(6, 3, 1)) == exc(6, 6, 2)  # read-only
    assert both(fc06(7, 9, 1)) == exc(7, 6, 2)  # unmapped
    assert both(fc06(8, 4, 77), plc=Quality.GOOD) == fc06(8, 4, 77)  # the owner answers later
    assert both(fc06(9, 4, 78), plc=Quality.BAD_OUT_OF_RANGE) == exc(9, 6, 3)
    assert both(fc06(10, 5, 1)) == exc(10, 6, 1)  # the owner refuses
    assert both(fc06(11, 6, 1)) == exc(11, 6, 0x0B)  # no owner running
    assert both(fc06(12, 7, 33)) == fc06(12, 7, 33)  # a tag mapped twice: both registers
    for rig in rigs:  # a Bad value (a source went away): the write makes it Good again
        rig.store.set_quality("M/A", Quality.BAD_NOT_CONNECTED)
        rig.store.remove("M/C")
        rig.clock.advance(0)
    assert both(fc06(13, 0, 5)) == fc06(13, 0, 5)
    assert both(fc06(14, 10, 5)) == exc(14, 6, 2)  # its tag is gone
    assert both(fc03(15, 0, 9)) == adu(15, struct.pack(">BB9H", 3, 18, 5, 0x8000, 50, 4, 77,
                                                        7, 8, 33, 33))
    a, b = rigs
    assert a.seen == b.seen and a.seen
    assert [a.store.read(p) for p in a.store.paths()] == [b.store.read(p) for p in b.store.paths()]
    assert a.store.stats == b.store.stats
    assert a.server.stats == b.server.stats
    for t in a.server.image.tables:
        assert (a.server.image.tables[t].values == b.server.image.tables[t].values).all()
        assert (a.server.image.tables[t].bad == b.server.image.tables[t].bad).all()
        assert a.server.image.tables[t].bad_total == b.server.image.tables[t].bad_total
    # the short way was taken where it applies (M/A, M/B, P/X, P/Nope, P/Gone), the normal
    # way otherwise; a split frame always takes the normal way
    assert handled[0] == [4, 5, 6, 7, 12, 14, 15]
    assert handled[1] == list(range(1, 16))


def test_short_way_keeps_order_behind_a_pending_write_and_framing_checks() -> None:
    rig = Rig()
    proto, tr = rig.connect()
    proto.dataReceived(fc06(1, 4, 99))  # waits for the PLC
    proto.dataReceived(fc06(2, 0, 42))  # queued behind it, not answered before it
    assert tr.value() == b"" and rig.store.read("M/A").value == 1
    rig.plc.answer()
    assert take(tr) == fc06(1, 4, 99) + fc06(2, 0, 42)
    assert rig.store.read("M/A").value == 42
    # unit ids not served are refused as before
    rig.server.units = frozenset({1})
    proto.dataReceived(adu(3, struct.pack(">BHH", 6, 0, 43))[:6] + b"\x07" +
                       struct.pack(">BHH", 6, 0, 43))
    assert take(tr) == struct.pack(">HHHBBB", 3, 0, 3, 7, 0x86, 0x0B)
    # a protocol id other than 0 is a framing error: nothing written, connection closed
    proto.dataReceived(struct.pack(">HHHBBHH", 4, 1, 6, 1, 6, 0, 44))
    assert take(tr) == b"" and tr.disconnecting
    assert rig.store.read("M/A").value == 42
