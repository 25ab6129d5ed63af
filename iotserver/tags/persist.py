"""Durable last values of memory tags (setpoints and the like) in SQLite.

WAL journal with ``synchronous=FULL``: each commit is fsynced before ``save`` returns, so a write
acknowledged to a client survives kill -9 and power loss. Memory-tag writes are operator actions
(a few per second at most), so a commit per write costs nothing that matters.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from iotserver.tags.model import Quality


def _encode(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    return json.dumps(value)


class MemoryTagPersistence:
    """A small key-value table: path -> (JSON value, quality, source timestamp)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db: sqlite3.Connection | None = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS memory_tags ("
            " path TEXT PRIMARY KEY, value TEXT NOT NULL,"
            " quality INTEGER NOT NULL, source_ns INTEGER NOT NULL)"
        )

    def save(self, path: str, value: Any, quality: Quality, source_ns: int) -> None:
        if self._db is None:
            raise RuntimeError("persistence is closed")
        self._db.execute(
            "INSERT INTO memory_tags(path, value, quality, source_ns) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(path) DO UPDATE SET value=excluded.value,"
            " quality=excluded.quality, source_ns=excluded.source_ns",
            (path, _encode(value), int(quality), source_ns),
        )

    def load_all(self) -> dict[str, tuple[Any, int, int]]:
        if self._db is None:
            raise RuntimeError("persistence is closed")
        rows = self._db.execute("SELECT path, value, quality, source_ns FROM memory_tags")
        return {p: (json.loads(v), q, ts) for p, v, q, ts in rows}

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
