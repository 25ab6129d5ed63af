"""Memory-tag persistence: writes group-committed on a writer thread, acknowledged only once
durable, and owners that answer at once saying so through the owner protocol."""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from iotserver.tags.model import Access, DataType, Quality, TagDef
from iotserver.tags.persist import MemoryTagPersistence
from iotserver.tags.store import MemoryOwner, TagStore


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.done: queue.Queue[Any] = queue.Queue()
        self.db = MemoryTagPersistence(tmp_path / "m.sqlite3",
                                       call_from_thread=lambda *a: self.done.put(a))
        self.store = TagStore(Clock(), write_timeout=60)
        self.store.register_owner("memory", MemoryOwner(self.store, self.db))
        for name in ("A", "B", "C"):
            self.store.define(TagDef(f"S/{name}", DataType.INT64, access=Access.READ_WRITE,
                                     persist=True, initial=0))
        self.store.define(TagDef("S/Plain", DataType.INT64, access=Access.READ_WRITE,
                                 initial=0))

    def deliver(self, ds: list[Deferred[Any]]) -> list[Any]:
        """Run the writer's results on this thread until every Deferred has fired."""
        while not all(d.called for d in ds):
            fn, *args = self.done.get(timeout=10)
            fn(*args)
        out: list[Any] = []
        for d in ds:
            d.addBoth(out.append)
        return out


def test_write_is_acknowledged_and_applied_only_once_durable(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    try:
        d = rig.store.write("S/A", 7)
        assert not d.called  # the event loop did not wait for the disk
        assert rig.store.read("S/A").value == 0  # nor does anyone see the value before
        assert rig.deliver([d]) == [Quality.GOOD]
        assert rig.store.read("S/A").value == 7
        on_disk = MemoryTagPersistence(tmp_path / "m.sqlite3")
        assert on_disk.load_all()["S/A"][0] == 7
        on_disk.close()
        # a tag without persist answers at once, through the owner's write_inline
        assert rig.store.write_now("S/Plain", 3) is Quality.GOOD
    finally:
        rig.db.close()


def test_many_writes_share_few_commits(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    try:
        with rig.db._lock:  # the disk is busy: writes pile up behind the commit in progress
            ds = [rig.store.write(f"S/{'ABC'[i % 3]}", i) for i in range(300)]
        assert rig.deliver(ds) == [Quality.GOOD] * 300
        # at most the batch taken before the pile-up plus one: one row per tag in each
        assert rig.db.commits <= 2 and rig.db.rows_written <= 4
        assert [rig.store.read(f"S/{n}").value for n in "ABC"] == [297, 298, 299]
        assert rig.db.load_all()["S/C"][0] == 299
    finally:
        rig.db.close()


class FailingDb:
    """A database whose commits fail (disk full, I/O error)."""

    in_transaction = False

    def execute(self, sql: str, *args: Any) -> None:
        if sql == "COMMIT":
            raise OSError("disk I/O error")

    def executemany(self, sql: str, rows: Any) -> None:
        pass

    def close(self) -> None:
        pass


def test_failed_commit_refuses_the_write_and_changes_nothing(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    real = rig.db._db
    rig.db._db = FailingDb()  # type: ignore[assignment]
    try:
        d = rig.store.write("S/B", 5)
        assert rig.deliver([d]) == [Quality.BAD_INTERNAL_ERROR]
        assert rig.store.read("S/B").value == 0
    finally:
        rig.db.close()
        assert real is not None
        real.close()


class Inline:
    """Not a MemoryOwner: answers through write_inline, which the store finds by itself."""

    def __init__(self, store: TagStore) -> None:
        self.store = store
        self.inline = 0
        self.slow = 0

    def write_inline(self, tag: TagDef, value: Any, origin: Any) -> Quality | None:
        if value < 0:
            return None
        self.inline += 1
        return Quality.BAD_OUT_OF_RANGE if value > 100 else Quality.GOOD

    def write_tag(self, tag: TagDef, value: Any) -> Quality:
        self.slow += 1
        return Quality.GOOD


def test_an_owner_that_answers_at_once_says_so_through_the_protocol() -> None:
    store = TagStore(Clock())
    owner = Inline(store)
    store.register_owner("x", owner)
    store.define(TagDef("X/v", DataType.INT64, access=Access.READ_WRITE, owner="x"))
    assert store.write_now("X/v", 5) is Quality.GOOD
    assert store.write_now("X/v", 500) is Quality.BAD_OUT_OF_RANGE
    assert store.write_now("X/v", -1) is Quality.GOOD
    assert (owner.inline, owner.slow) == (2, 1)
    assert store.stats.writes_failed == 1
    store.unregister_owner("x")
    assert store.write_now("X/v", 5) is Quality.BAD_NOT_CONNECTED
