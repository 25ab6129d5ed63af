"""The audit trail: every write and every login attempt, from every protocol, in a bounded,
rotating JSON-lines file in the data directory and in the log.

One object per server (``core.audit``) is both the tag store's :class:`AuditSink` and the login
module's :class:`LoginAudit`. On the event loop a record is only appended to a list (the
protocols' write fast paths call it once per write); every ``flush_interval`` seconds the list
goes to one writer thread, which formats the JSON lines, appends them to ``audit.jsonl``,
fsyncs once per batch and rotates the file when it would pass ``max_bytes``
(``audit.jsonl.1`` .. ``audit.jsonl.<max_files - 1>``, oldest dropped). The log gets at most
``log_limit`` write lines per flush and one line counting the rest (the file has them all).

Record format (one JSON object per line, keys in this order)::

    {"time": "2026-12-03T12:00:00.123456Z", "event": "write", "principal": "alice",
     "protocol": "mqtt", "peer": "127.0.0.1:50312", "tag": "Line1/Setpoint", "value": 42.5,
     "result": "Good", "code": 0}
    {"time": "...", "event": "login", "principal": "alice", "protocol": "opcua",
     "peer": "127.0.0.1", "method": "password", "result": "failed", "detail": ""}

``principal`` is ``""`` for anonymous clients and plain Modbus (only an address); ``value`` is
the value as the client sent it (a string ``repr`` when JSON has no such type).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from iotserver.clock import Clock
from iotserver.ratelog import RateLimitedLog
from iotserver.tags.model import Quality
from iotserver.tags.writer import Writer

log = Logger(namespace="iotserver.audit")

MAX_QUEUED = 1_000_000  # records waiting for the disk; beyond, records are counted as lost


@dataclass(frozen=True)
class AuditConfig:
    """``[audit]``: the audit file (in the data directory unless ``file`` is set)."""

    enabled: bool = True
    file: Path | None = None  # default <data_dir>/audit.jsonl
    max_bytes: int = 10 * 1024 * 1024
    max_files: int = 5  # the file and its rotated copies
    flush_interval: float = 1.0
    log_limit: int = 20  # write lines per flush in the log (the file has every write)

    def path(self, data_dir: Path) -> Path:
        return self.file or data_dir / "audit.jsonl"

    def summary(self) -> list[str]:
        if not self.enabled:
            return ["audit file: off (writes and logins are still logged)"]
        return [f"audit file: {self.file or '<data_dir>/audit.jsonl'}, "
                f"{self.max_files} x {self.max_bytes} bytes"]


def parse(r: Any) -> AuditConfig:
    """Read ``[audit]`` (a :class:`iotserver.confparse.Reader`)."""
    cfg = AuditConfig(
        enabled=r.bool("enabled", True),
        file=r.path("file", None),
        max_bytes=r.int("max_bytes", 10 * 1024 * 1024, min=4096, max=1 << 40),
        max_files=r.int("max_files", 5, min=1, max=1000),
        flush_interval=r.float("flush_interval", 1.0, positive=True, max=60),
        log_limit=r.int("log_limit", 20, min=0, max=100_000),
    )
    r.done()
    return cfg


def _plain(value: Any) -> Any:
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    return repr(value)


def _json_value(value: Any) -> str:
    kind = type(value)
    if kind is int or kind is bool:
        return "true" if value is True else "false" if value is False else str(value)
    if kind is float and value == value and value not in (float("inf"), float("-inf")):
        return repr(value)
    return json.dumps(value, default=_plain, ensure_ascii=False)


class _Formatter:
    """JSON lines with the parts that repeat (the second, the writer, the tag, the result)
    encoded once: a Modbus or MQTT write flood is formatted at a few microseconds a line."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""
        self._writers: dict[Writer, str] = {}
        self._paths: dict[str, str] = {}
        self._results: dict[int, str] = {}

    def time(self, seconds: float) -> str:
        whole = int(seconds)
        if whole != self._second:
            self._second = whole
            self._prefix = _dt.datetime.fromtimestamp(whole, _dt.UTC).strftime(
                "%Y-%m-%dT%H:%M:%S")
        micros = min(int((seconds - whole) * 1_000_000), 999_999)
        return f"{self._prefix}.{micros:06d}Z"

    def line(self, record: tuple[Any, ...]) -> str:
        if record[0] != "write":
            _, t, protocol, peer, user, method, outcome, detail = record
            return json.dumps({
                "time": self.time(t), "event": "login", "principal": user or "",
                "protocol": protocol, "peer": peer, "method": method, "result": outcome,
                "detail": detail}, ensure_ascii=False) + "\n"
        _, t, writer, path, value, quality = record
        who = self._writers.get(writer)
        if who is None:
            if len(self._writers) > 10_000:
                self._writers.clear()
            who = self._writers[writer] = (
                f'"principal": {json.dumps(writer.principal, ensure_ascii=False)}, '
                f'"protocol": {json.dumps(writer.protocol, ensure_ascii=False)}, '
                f'"peer": {json.dumps(writer.peer, ensure_ascii=False)}')
        tag = self._paths.get(path)
        if tag is None:
            if len(self._paths) > 100_000:
                self._paths.clear()
            tag = self._paths[path] = json.dumps(path, ensure_ascii=False)
        code = int(quality)
        result = self._results.get(code)
        if result is None:
            try:
                text = Quality(code).text
            except ValueError:
                text = f"0x{code:08X}"
            result = self._results[code] = f'"result": "{text}", "code": {code}'
        return (f'{{"time": "{self.time(t)}", "event": "write", {who}, "tag": {tag}, '
                f'"value": {_json_value(value)}, {result}}}\n')


def _line(record: tuple[Any, ...]) -> str:
    """One record as a JSON line (tests; the writer thread keeps its own formatter)."""
    return _Formatter().line(record)


class RotatingFile:
    """Append-only file of at most ``max_bytes`` plus ``max_files - 1`` rotated copies.

    Used from the writer thread only.
    """

    def __init__(self, path: Path, max_bytes: int, max_files: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_files = max_files
        path.parent.mkdir(parents=True, exist_ok=True)
        self._open()

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._f = os.fdopen(fd, "ab")
        self.size = os.fstat(fd).st_size

    def write_lines(self, lines: list[str]) -> None:
        """Append lines (each ending in a newline), rotating first when one would not fit;
        one fsync per call."""
        chunk: list[str] = []
        size = self.size
        for line in lines:
            n = len(line) if line.isascii() else len(line.encode("utf-8"))
            if size and size + n > self.max_bytes:
                self._put(chunk)
                chunk = []
                self.rotate()
                size = 0
            chunk.append(line)
            size += n
        self._put(chunk)
        self.size = size
        self._f.flush()
        os.fsync(self._f.fileno())

    def _put(self, chunk: list[str]) -> None:
        if chunk:
            self._f.write("".join(chunk).encode("utf-8"))

    def rotate(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        keep = self.max_files - 1
        if keep <= 0:
            self.path.unlink(missing_ok=True)
        else:
            for i in range(keep - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._open()

    def close(self) -> None:
        self._f.close()


class AuditLog:
    """The audit trail (module docstring). ``start()`` opens the file; ``stop()`` flushes the
    last records and closes it (a Deferred)."""

    def __init__(self, clock: Clock, cfg: AuditConfig | None = None,
                 path: Path | None = None) -> None:
        self.clock = clock
        self.cfg = cfg or AuditConfig()
        self.path = path
        self._pending: list[tuple[Any, ...]] = []
        self._append = self._pending.append
        self._now = clock.seconds
        self._call: Any = None
        self._queue: queue.SimpleQueue[list[tuple[Any, ...]] | threading.Event | None] = \
            queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._queued = 0  # records handed to the thread, not yet written
        self._lock = threading.Lock()
        self.written = 0
        self.lost = 0
        self.errors = 0
        self.ratelog = RateLimitedLog(clock, logger=log)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Open the file (raises OSError when it cannot be created) and start the writer."""
        if self.path is None or self._thread is not None:
            return
        file = RotatingFile(self.path, self.cfg.max_bytes, self.cfg.max_files)
        self._thread = threading.Thread(target=self._run, args=(file,), name="iotserver-audit",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> Deferred[None]:
        """Hand the last records to the writer and wait (in a thread) until they are on disk."""
        from twisted.internet.threads import deferToThread

        self.flush()
        thread, self._thread = self._thread, None
        if thread is None:
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        self._queue.put(None)
        return deferToThread(thread.join, 10.0)

    def sync(self) -> Deferred[Any]:
        """Fires once every record so far is on disk (tests, the console)."""
        from twisted.internet.threads import deferToThread

        self.flush()
        if self._thread is None:
            return deferToThread(lambda: None)
        done = threading.Event()
        self._queue.put(done)
        return deferToThread(done.wait, 30.0)

    # -- sinks (event loop) -------------------------------------------------------------------
    def write_done(self, writer: Writer, path: str, value: Any, quality: Quality) -> None:
        # the fast paths call this once per write: one bound call and one list append
        self._append(("write", self._now(), writer, path, value, quality))
        if self._call is None:
            self._call = self.clock.callLater(self.cfg.flush_interval, self.flush)

    def login(self, protocol: str, peer: str, user: str | None, method: str, outcome: str,
              detail: str = "") -> None:
        self._pending.append(("login", self.clock.seconds(), protocol, peer, user, method,
                              outcome, detail))
        if self._call is None:
            self._call = self.clock.callLater(self.cfg.flush_interval, self.flush)

    def flush(self) -> None:
        """Log this interval's writes (bounded) and hand every record to the writer thread."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        batch, self._pending = self._pending, []
        self._append = self._pending.append
        if not batch:
            return
        self._log_writes(batch)
        if self._thread is None:
            return
        with self._lock:
            room = MAX_QUEUED - self._queued
            if room < len(batch):
                self.lost += len(batch) - max(room, 0)
                batch = batch[:max(room, 0)]
            self._queued += len(batch)
        if self.errors:
            self.ratelog.warn("errors", "audit: writing {path} failed {n} times so far",
                              path=str(self.path), n=self.errors)
        if self.lost:
            self.ratelog.warn("lost", "audit: the disk does not keep up, {n} records lost so "
                              "far", n=self.lost)
        if batch:
            self._queue.put(batch)

    def _log_writes(self, batch: list[tuple[Any, ...]]) -> None:
        limit = self.cfg.log_limit
        shown = 0
        for i, record in enumerate(batch):
            if record[0] != "write":
                continue  # the login module logs logins itself
            if shown >= limit:
                log.info("audit: {n} more records in this interval (all are in the audit "
                         "file)", n=len(batch) - i)
                return
            shown += 1
            _, _, writer, path, value, quality = record
            q = Quality(quality) if not isinstance(quality, Quality) else quality
            log.info("audit: {who} wrote {tag} = {value!r}: {result}", who=str(writer),
                     tag=path, value=value, result=q.text)

    # -- writer thread ------------------------------------------------------------------------
    def _run(self, file: RotatingFile) -> None:
        fmt = _Formatter()
        try:
            while True:
                batch = self._queue.get()
                if batch is None:
                    return
                if isinstance(batch, threading.Event):
                    batch.set()
                    continue
                try:
                    file.write_lines([fmt.line(r) for r in batch])
                    self.written += len(batch)
                except (OSError, ValueError, TypeError):
                    self.errors += 1  # reported by the loop side via stats; keep running
                finally:
                    with self._lock:
                        self._queued -= len(batch)
        finally:
            file.close()
