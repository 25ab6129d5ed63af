"""Durable last values of memory tags (setpoints and the like) in SQLite, group-committed on a
writer thread.

WAL journal with ``synchronous=FULL``: a commit is fsynced before it counts. The event loop
never waits for the disk (an fsync is 0.45 ms on a fast SSD and tens of milliseconds on an SD
card): :meth:`MemoryTagPersistence.commit` buffers the row and returns a Deferred that fires
once a commit holding it is durable, and the memory owner acknowledges the write only then.

Group commit: one writer thread commits whatever is buffered in one transaction, then the
next batch. Rows are buffered per tag, so a tag written many times while a commit runs costs
one row in the next. That bounds what clients can make the disk do: at most one transaction
in flight, each at most one row per persisted tag, however fast they write; the only thing
that grows with the write rate is the list of writes waiting for the next commit, and that
is bounded by the protocols' own limits on writes in flight (Modbus: one per connection,
``max_connections``; MQTT: the in-flight window; OPC UA: requests per session). So no
separate rate limit is needed for persisted memory tags.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from iotserver.tags.model import Quality

_UPSERT = (
    "INSERT INTO memory_tags(path, value, quality, source_ns) VALUES (?, ?, ?, ?)"
    " ON CONFLICT(path) DO UPDATE SET value=excluded.value,"
    " quality=excluded.quality, source_ns=excluded.source_ns"
)


def _encode(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    return json.dumps(value)


class MemoryTagPersistence:
    """A small key-value table: path -> (JSON value, quality, source timestamp).

    ``call_from_thread`` hands results from the writer thread to the event loop (default:
    the reactor's ``callFromThread``).
    """

    def __init__(self, path: Path,
                 call_from_thread: Callable[..., Any] | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # used by this thread until the writer starts, then under _lock by the writer
        self._db: sqlite3.Connection | None = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS memory_tags ("
            " path TEXT PRIMARY KEY, value TEXT NOT NULL,"
            " quality INTEGER NOT NULL, source_ns INTEGER NOT NULL)"
        )
        if call_from_thread is None:
            from twisted.internet import reactor

            call_from_thread = reactor.callFromThread
        self._call_from_thread = call_from_thread
        self._lock = threading.Lock()  # the database connection
        self._cond = threading.Condition()  # the buffer below
        self._rows: dict[str, tuple[str, str, int, int]] = {}
        self._waiters: list[Deferred[None]] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self.commits = 0
        self.rows_written = 0
        self.writes = 0

    # -- the event loop's side -------------------------------------------------------------
    def commit(self, path: str, value: Any, quality: Quality, source_ns: int) -> Deferred[None]:
        """Buffer the tag's value; the Deferred fires once it is durable (errbacks if the
        commit failed)."""
        row = (path, _encode(value), int(quality), source_ns)
        d: Deferred[None] = Deferred()
        with self._cond:
            if self._closing or self._db is None:
                raise RuntimeError("persistence is closed")
            self._rows[path] = row
            self._waiters.append(d)
            self.writes += 1
            self._cond.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._writer, name="memory-tag-persistence",
                                            daemon=True)
            self._thread.start()
        return d

    def save(self, path: str, value: Any, quality: Quality, source_ns: int) -> None:
        """Write one value and wait for its commit (tools and tests; the server uses
        :meth:`commit`)."""
        with self._lock:
            if self._db is None:
                raise RuntimeError("persistence is closed")
            self._db.execute(_UPSERT, (path, _encode(value), int(quality), source_ns))

    def load_all(self) -> dict[str, tuple[Any, int, int]]:
        with self._lock:
            if self._db is None:
                raise RuntimeError("persistence is closed")
            rows = self._db.execute(
                "SELECT path, value, quality, source_ns FROM memory_tags").fetchall()
        return {p: (json.loads(v), q, ts) for p, v, q, ts in rows}

    def close(self) -> None:
        """Commit what is buffered, stop the writer, close the database. Idempotent.

        The Deferreds of the last batch fire on the event loop afterwards."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- the writer thread -----------------------------------------------------------------
    def _writer(self) -> None:
        while True:
            with self._cond:
                while not self._rows and not self._closing:
                    self._cond.wait()
                if not self._rows:
                    return
                rows, self._rows = list(self._rows.values()), {}
                waiters, self._waiters = self._waiters, []
            failure: Failure | None = None
            with self._lock:
                db = self._db
                try:
                    if db is None:
                        raise RuntimeError("persistence is closed")
                    db.execute("BEGIN")
                    db.executemany(_UPSERT, rows)
                    db.execute("COMMIT")
                    self.commits += 1
                    self.rows_written += len(rows)
                except Exception:
                    failure = Failure()
                    if db is not None and db.in_transaction:
                        db.execute("ROLLBACK")
            self._call_from_thread(_fire, waiters, failure)


def _fire(waiters: list[Deferred[None]], failure: Failure | None) -> None:
    for d in waiters:
        if failure is None:
            d.callback(None)
        else:
            d.errback(failure)
