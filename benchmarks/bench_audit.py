"""What the audit trail costs a write: TagStore.write_now with and without the audit sink.

Three rows, measured in one run on the same tag (a memory tag, the Modbus/MQTT fast path):

* ``no audit``: the store as before the audit trail existed (no sink attached);
* ``audit, event loop``: the sink attached, the cost on the event loop only (the record is
  appended to a list, handed over every 20,000 writes; no writer thread);
* ``audit, total``: the sink attached and flushed every 20,000 writes to its writer thread, the
  CPU of formatting, writing and fsyncing the JSON lines included (process CPU time).

Each row is the best of ``--repeat`` runs (the machine's noise only ever adds time).
Run: ``python benchmarks/bench_audit.py [--quick] [--writes 200000]``.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from twisted.internet import task

from iotserver.security.audit import AuditConfig, AuditLog
from iotserver.tags.model import Access, DataType, TagDef
from iotserver.tags.store import MemoryOwner, TagStore
from iotserver.tags.writer import Writer


def run(writes: int, mode: str, tmp: Path) -> float:
    """Microseconds of process CPU per write."""
    clock = task.Clock()
    store = TagStore(clock)
    store.register_owner("memory", MemoryOwner(store))
    store.define(TagDef("Bench/Setpoint", DataType.UINT16, access=Access.READ_WRITE))
    audit: Any = None
    if mode != "none":
        path = tmp / f"audit-{time.monotonic_ns()}.jsonl" if mode == "total" else None
        audit = AuditLog(clock, AuditConfig(log_limit=0, max_bytes=1 << 30), path)
        audit.start()
        store.audit = audit
    writer = Writer("", "modbus", "127.0.0.1:50000")
    write = store.write_now
    t0 = time.process_time()
    for i in range(writes):
        write("Bench/Setpoint", i & 0xFFFF, writer=writer)
        if audit is not None and i % 20_000 == 19_999:
            audit.flush()  # as the flush timer would (one batch a second at 20k writes/s)
    if mode == "total":
        audit.flush()
        done = threading.Event()
        audit._queue.put(done)  # the writer thread sets it once everything is on disk
        done.wait(60)
    used = time.process_time() - t0
    if audit is not None:
        audit._pending.clear()
        audit.stop()
    return used / writes * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="50,000 writes, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.writes, args.repeat = 50_000, 3
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, label in (("none", "no audit"), ("loop", "audit, event loop"),
                            ("total", "audit, total (writer thread included)")):
            rows.append((label, min(run(args.writes, mode, Path(tmp))
                                    for _ in range(args.repeat))))
    base = rows[0][1]
    print(f"TagStore.write_now of a memory tag, {args.writes} writes, best of {args.repeat}")
    print(f"{'':40} {'us/write':>9} {'ratio':>7}")
    for label, us in rows:
        print(f"{label:40} {us:>9.2f} {us / base:>6.2f}x")


if __name__ == "__main__":
    main()
