"""The servers the Modbus benchmarks measure, each run in its own process.

``python servers.py ours PORT``: our Modbus TCP server (Twisted asyncio reactor) mapping holding
registers 0..199 to 200 UInt16 memory tags (writes go through the tag store).
``python servers.py ours+audit PORT``: the same with the audit trail attached (every write
recorded in a JSON-lines file in a temporary directory, as the server does).
``python servers.py ours-persist PORT DIR``: the same with persisted memory tags (SQLite in DIR,
group-committed on a writer thread); ``ours-persist-loop PORT DIR``: the same, but each write
committed and fsynced on the event loop (how persisted writes worked before group commit).
``python servers.py pymodbus PORT``: pymodbus' asyncio ModbusTcpServer with 200 registers.
``python servers.py simplc PORT REGISTERS``: our simulated PLC (for the poller benchmark).
Each prints "ready" once listening and runs until SIGTERM.
"""

from __future__ import annotations

import sys


def ours(port: int, persist: str = "", directory: str = "", audit: bool = False) -> None:
    from twisted.internet import asyncioreactor

    asyncioreactor.install()
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint

    from iotserver.edge.guard import GuardedFactory
    from iotserver.modbus.codec import Table
    from iotserver.modbus.config import MapEntry, ServerConfig
    from iotserver.modbus.encoding import UINT16, Order
    from iotserver.modbus.server import ModbusServer
    from iotserver.modbus.service import PROBE
    from iotserver.tags.model import Access, DataType, TagDef
    from iotserver.tags.store import MemoryOwner, TagStore

    store = TagStore(reactor)  # type: ignore[arg-type]
    persistence: object = None
    if persist:
        from pathlib import Path

        from iotserver.tags.persist import MemoryTagPersistence

        persistence = MemoryTagPersistence(Path(directory) / "memory_tags.sqlite3")
        if persist == "loop":
            persistence = _OnTheLoop(persistence)
    store.register_owner("memory", MemoryOwner(store, persistence))
    if audit:  # every write goes into the audit trail, as in the server
        import tempfile
        from pathlib import Path

        from iotserver.security.audit import AuditLog

        trail = AuditLog(reactor, path=Path(tempfile.mkdtemp()) / "audit.jsonl")  # type: ignore[arg-type]
        trail.start()
        store.audit = trail
    entries = []
    for i in range(200):
        path = f"Bench/R{i}"
        store.define(TagDef(path, DataType.UINT16, access=Access.READ_WRITE, initial=i,
                            persist=bool(persist)))
        entries.append(MapEntry(f"map[{i}]", path, Table.HOLDING_REGISTERS, i, UINT16,
                                Order.ABCD))
    cfg = ServerConfig(endpoints=(f"tcp:{port}",), map=tuple(entries), max_connections=1000,
                       max_connections_per_peer=1000, idle_timeout=0)
    server = ModbusServer(cfg, store, reactor)  # type: ignore[arg-type]
    server.start()

    def listening(_: object) -> None:
        print("ready", flush=True)

    # through the connection edge (limits and timers), as the server runs it
    guarded = GuardedFactory("Modbus TCP", server.factory(), cfg.limits, reactor,  # type: ignore[arg-type]
                             probe=PROBE)
    TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(
        guarded).addCallback(listening)
    reactor.run()  # type: ignore[attr-defined]


class _OnTheLoop:
    """Persistence committing (and fsyncing) each write on the event loop before answering."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def commit(self, path: str, value: object, quality: object, ts: int) -> object:
        from twisted.internet.defer import succeed

        self.inner.save(path, value, quality, ts)  # type: ignore[attr-defined]
        return succeed(None)


def pymodbus_server(port: int) -> None:
    import asyncio
    import logging

    from pymodbus.datastore import (
        ModbusDeviceContext,
        ModbusSequentialDataBlock,
        ModbusServerContext,
    )
    from pymodbus.server import ModbusTcpServer

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

    async def main() -> None:
        block = ModbusSequentialDataBlock(1, list(range(200)))
        ctx = ModbusServerContext(devices=ModbusDeviceContext(hr=block), single=True)
        server = ModbusTcpServer(ctx, address=("127.0.0.1", port))
        await server.serve_forever(background=True)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def simplc(port: int, registers: int) -> None:
    from twisted.internet import defer, reactor

    from iotserver.sim.plc import SimPLC

    plc = SimPLC(port, registers=registers, interval=0.1)

    async def main() -> None:
        await plc.start()
        print("ready", flush=True)

    reactor.callWhenRunning(lambda: defer.ensureDeferred(main()))  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    kind, port_text = sys.argv[1], sys.argv[2]
    if kind == "ours":
        ours(int(port_text))
    elif kind == "ours+audit":
        ours(int(port_text), audit=True)
    elif kind == "ours-persist":
        ours(int(port_text), "thread", sys.argv[3])
    elif kind == "ours-persist-loop":
        ours(int(port_text), "loop", sys.argv[3])
    elif kind == "pymodbus":
        pymodbus_server(int(port_text))
    elif kind == "simplc":
        simplc(int(port_text), int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown server {kind!r}")
