"""The audit trail: the store reports every write with its writer; the file is bounded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher

from iotserver.security.audit import AuditConfig, AuditLog, RotatingFile, _line
from iotserver.tags.model import Access, DataType, Quality, TagDef
from iotserver.tags.store import MemoryOwner, TagStore, WriteRefused
from iotserver.tags.writer import Writer


class Sink:
    def __init__(self) -> None:
        self.records: list[tuple[Writer, str, Any, Quality]] = []

    def write_done(self, writer: Writer, path: str, value: Any, quality: Quality) -> None:
        self.records.append((writer, path, value, quality))


class SlowOwner:
    def __init__(self) -> None:
        self.pending: list[defer.Deferred[Quality]] = []

    def write_tag(self, tag: TagDef, value: Any) -> defer.Deferred[Quality]:
        d: defer.Deferred[Quality] = defer.Deferred()
        self.pending.append(d)
        return d


def make_store() -> tuple[TagStore, Sink, SlowOwner]:
    store = TagStore(task.Clock())
    store.register_owner("memory", MemoryOwner(store))
    plc = SlowOwner()
    store.register_owner("plc", plc)
    store.define(TagDef("Mem/Setpoint", DataType.FLOAT64, access=Access.READ_WRITE))
    store.define(TagDef("Plc/Setpoint", DataType.INT16, access=Access.READ_WRITE, owner="plc"))
    store.define(TagDef("Mem/ReadOnly", DataType.FLOAT64))
    sink = Sink()
    store.audit = sink
    return store, sink, plc


def test_store_reports_every_write_with_its_writer() -> None:
    store, sink, plc = make_store()
    alice = Writer("alice", "mqtt", "127.0.0.1:5000")
    assert store.write_now("Mem/Setpoint", 1.5, writer=alice) == Quality.GOOD
    store.write("Mem/ReadOnly", 2.0, writer=alice)
    store.write("No/Such", 2.0, writer=alice)
    store.write("Mem/Setpoint", "not a number", principal="legacy")
    d = store.write("Plc/Setpoint", 7, writer=Writer("bob", "opcua", "10.0.0.2:4840"))
    assert len(sink.records) == 4  # the PLC write is reported when its owner answers
    plc.pending[0].errback(WriteRefused(Quality.BAD_OUT_OF_RANGE))
    assert d.result == Quality.BAD_OUT_OF_RANGE  # type: ignore[attr-defined]
    assert [(w.principal, w.protocol, p, v, q) for w, p, v, q in sink.records] == [
        ("alice", "mqtt", "Mem/Setpoint", 1.5, Quality.GOOD),
        ("alice", "mqtt", "Mem/ReadOnly", 2.0, Quality.BAD_NOT_WRITABLE),
        ("alice", "mqtt", "No/Such", 2.0, Quality.BAD_NODE_ID_UNKNOWN),
        ("legacy", "", "Mem/Setpoint", "not a number", Quality.BAD_TYPE_MISMATCH),
        ("bob", "opcua", "Plc/Setpoint", 7, Quality.BAD_OUT_OF_RANGE),
    ]


def test_line_format() -> None:
    w = Writer("alice", "modbus", "127.0.0.1:1502")
    line = json.loads(_line(("write", 0.5, w, "A/B", 3, Quality.GOOD)))
    assert line == {"time": "1970-01-01T00:00:00.500000Z", "event": "write",
                    "principal": "alice", "protocol": "modbus", "peer": "127.0.0.1:1502",
                    "tag": "A/B", "value": 3, "result": "Good", "code": 0}
    odd = json.loads(_line(("write", 0.0, w, "A/B", b"\x00", Quality.BAD_TYPE_MISMATCH)))
    assert odd["value"] == "b'\\x00'" and odd["result"] == "BadTypeMismatch"
    login = json.loads(_line(("login", 0.0, "opcua", "10.0.0.1", None, "anonymous", "denied",
                              "anonymous access is off")))
    assert (login["event"], login["principal"], login["result"]) == ("login", "", "denied")


def test_rotation_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    f = RotatingFile(path, max_bytes=1000, max_files=3)
    line = "x" * 99 + "\n"
    for _ in range(20):
        f.write_lines([line] * 10)  # 1000 bytes a batch
    f.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(p.stat().st_size <= 1000 for p in tmp_path.iterdir())
    assert (path.stat().st_mode & 0o777) == 0o600
    one = RotatingFile(tmp_path / "one.jsonl", max_bytes=200, max_files=1)
    one.write_lines([line] * 7)
    one.close()
    assert (tmp_path / "one.jsonl").stat().st_size <= 200
    assert not (tmp_path / "one.jsonl.1").exists()


@pytest_twisted.ensureDeferred
async def test_audit_log_buffers_on_the_loop_and_writes_in_its_thread(tmp_path: Path) -> None:
    clock = task.Clock()
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(clock, AuditConfig(flush_interval=1.0, log_limit=2), path)
    audit.start()
    try:
        w = Writer("alice", "mqtt", "127.0.0.1:1")
        for i in range(5):
            audit.write_done(w, "A/B", i, Quality.GOOD)
        audit.login("console", "127.0.0.1", "admin", "key", "ok", "SHA256:x")
        assert path.read_text() == ""  # nothing written by the loop itself
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        try:
            clock.advance(1.0)  # the flush timer hands the batch to the writer thread
        finally:
            globalLogPublisher.removeObserver(events.append)
        lines = [formatEvent(e) for e in events if e.get("log_namespace") == "iotserver.audit"]
        assert lines == ["audit: alice (mqtt 127.0.0.1:1) wrote A/B = 0: Good",
                         "audit: alice (mqtt 127.0.0.1:1) wrote A/B = 1: Good",
                         "audit: 4 more records in this interval (all are in the audit file)"]
        await audit.sync()
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        assert [x["value"] for x in lines if x["event"] == "write"] == [0, 1, 2, 3, 4]
        assert [x["principal"] for x in lines if x["event"] == "login"] == ["admin"]
    finally:
        await audit.stop()
    assert audit.written == 6 and audit.lost == 0
