"""Two Modbus servers over identical stores, one with its fast paths and one without, for
tests/test_modbus_fastpath.py. Run as a script it serves both on free loopback ports, prints
``ports FAST PLAIN`` and answers ``dump`` on stdin with both stores as one JSON line (until
stdin closes)."""

from __future__ import annotations

import json
import sys
from typing import Any

from iotserver.modbus.codec import Table
from iotserver.modbus.config import MapEntry, ServerConfig
from iotserver.modbus.encoding import ModbusType, Order
from iotserver.modbus.server import ModbusServer
from iotserver.tags.model import Access, DataType, Quality, TagDef
from iotserver.tags.store import MemoryOwner, TagStore, WriteRefused

HR = Table.HOLDING_REGISTERS
RW = Access.READ_WRITE


class Refuser:
    def write_tag(self, tag: TagDef, value: Any) -> Quality:
        raise WriteRefused(Quality.BAD_USER_ACCESS_DENIED)


def make_server(fast: bool, clock: Any) -> ModbusServer:
    store = TagStore(clock)
    store.register_owner("memory", MemoryOwner(store))
    store.register_owner("refuser", Refuser())
    for t in (
        TagDef("M/A", DataType.UINT16, access=RW, initial=1),
        TagDef("M/B", DataType.INT16, access=RW, initial=-2),
        TagDef("M/Ranged", DataType.UINT16, access=RW, low=0, high=100, initial=3),
        TagDef("M/RO", DataType.UINT16, initial=4),
        TagDef("M/Twice", DataType.UINT16, access=RW, initial=5),
        TagDef("M/F", DataType.FLOAT32, access=RW, initial=1.5),
        TagDef("M/Bit0", DataType.BOOLEAN, access=RW, initial=False),
        TagDef("M/Bit5", DataType.BOOLEAN, access=RW, initial=True),
        TagDef("M/Coil", DataType.BOOLEAN, access=RW, initial=False),
        TagDef("P/Nope", DataType.UINT16, access=RW, owner="refuser", initial=7),
        TagDef("P/Gone", DataType.UINT16, access=RW, owner="nobody", initial=8),
    ):
        store.define(t)
    u16, i16, f32 = (ModbusType.parse(n) for n in ("uint16", "int16", "float32"))
    entries = (
        MapEntry("m0", "M/A", HR, 0, u16, Order.ABCD),
        MapEntry("m1", "M/B", HR, 1, i16, Order.ABCD),
        MapEntry("m2", "M/Ranged", HR, 2, u16, Order.ABCD),
        MapEntry("m3", "M/RO", HR, 3, u16, Order.ABCD),
        MapEntry("m4", "M/Twice", HR, 4, u16, Order.ABCD),
        MapEntry("m5", "M/Twice", HR, 5, u16, Order.ABCD),
        MapEntry("m6", "M/F", HR, 6, f32, Order.CDAB),
        MapEntry("m8", "M/Bit0", HR, 8, ModbusType.parse("bit:0"), Order.ABCD),
        MapEntry("m8b", "M/Bit5", HR, 8, ModbusType.parse("bit:5"), Order.ABCD),
        MapEntry("m9", "P/Nope", HR, 9, u16, Order.ABCD),
        MapEntry("m10", "P/Gone", HR, 10, u16, Order.ABCD),
        MapEntry("c0", "M/Coil", Table.COILS, 0, ModbusType.parse("bool"), Order.ABCD),
        MapEntry("i0", "M/A", Table.INPUT_REGISTERS, 0, u16, Order.ABCD),
    )
    cfg = ServerConfig(endpoints=("tcp:502",), map=entries, idle_timeout=0,
                       unit_ids=frozenset({1}), fast_paths=fast)
    server = ModbusServer(cfg, store, clock)
    server.start()
    return server


def snapshot(server: ModbusServer) -> list[tuple[str, Any, int]]:
    store = server.store
    return [(p, store.read(p).value, int(store.read(p).quality)) for p in store.paths()]


def main() -> None:
    from twisted.internet import asyncioreactor

    asyncioreactor.install()
    from twisted.internet import reactor, stdio
    from twisted.protocols.basic import LineReceiver

    servers = [make_server(fast, reactor) for fast in (True, False)]
    ports = [reactor.listenTCP(0, s.factory(), interface="127.0.0.1")  # type: ignore[attr-defined]
             for s in servers]

    class Control(LineReceiver):
        delimiter = b"\n"

        def connectionMade(self) -> None:
            self.sendLine(b"ports %d %d" % tuple(p.getHost().port for p in ports))

        def lineReceived(self, line: bytes) -> None:
            if line.strip() == b"dump":
                self.sendLine(json.dumps([snapshot(s) for s in servers]).encode())

        def connectionLost(self, reason: Any = None) -> None:
            reactor.stop()  # type: ignore[attr-defined]

    stdio.StandardIO(Control())
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())
