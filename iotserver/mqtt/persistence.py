"""Durable broker state: retained messages and persistent sessions in SQLite (WAL).

Writes never block the event loop and never cost a commit per message:

- the broker records operations in an in-memory buffer keyed by row, so a row written twice
  in one batch is written once, and a queue entry added and removed before the commit (a
  message delivered and acknowledged within milliseconds) never touches the disk;
- one writer thread applies a whole buffer in one transaction (group commit);
- the PUBACK/PUBREC of a QoS 1/2 message that reached a persistent session (or a retained
  store) waits for the commit that covers it: ``token()`` names the batch the buffered
  operations will be in, ``when_committed(token, fn)`` runs ``fn`` once it is durable.
  A batch with a waiter is committed at once, or ``commit_interval`` after the previous
  commit started if that was more recent (operations arriving meanwhile join the batch);
  batches without one (subscriptions, retained updates from the tag bridge) are committed
  within ``LAZY_INTERVAL``, which coalesces high-rate retained updates per topic.

Tables: ``sessions``, ``subs``, ``queue`` (one row per message per session, in ``seq`` order),
``messages`` (content, shared by queue rows; reference-counted in memory), ``retained``.
Times are wall-clock seconds (the event loop's clock does not survive a restart).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from iotserver.clock import Clock
from iotserver.mqtt.codec import decode_packet, encode
from iotserver.mqtt.packets import (
    MQTT_5,
    NO_PROPERTIES,
    Connect,
    Properties,
    Publish,
    RetainHandling,
    SubscriptionOptions,
    Will,
)
from iotserver.mqtt.session import Delivery, Message, Session, Subscription

log = Logger(namespace="iotserver.mqtt")

LAZY_INTERVAL = 0.25

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (client_id TEXT PRIMARY KEY, expiry INTEGER NOT NULL,
    version INTEGER NOT NULL, user TEXT, disconnected_at REAL);
CREATE TABLE IF NOT EXISTS subs (client_id TEXT NOT NULL, filter TEXT NOT NULL,
    options INTEGER NOT NULL, subid INTEGER, PRIMARY KEY (client_id, filter));
CREATE TABLE IF NOT EXISTS queue (client_id TEXT NOT NULL, seq INTEGER NOT NULL,
    msg_id INTEGER NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, subids TEXT,
    pid INTEGER NOT NULL, state INTEGER NOT NULL, PRIMARY KEY (client_id, seq));
CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, topic TEXT NOT NULL,
    payload BLOB NOT NULL, qos INTEGER NOT NULL, props BLOB, expiry REAL);
CREATE TABLE IF NOT EXISTS retained (topic TEXT PRIMARY KEY, payload BLOB NOT NULL,
    qos INTEGER NOT NULL, props BLOB, expiry REAL);
CREATE TABLE IF NOT EXISTS wills (client_id TEXT PRIMARY KEY, connect BLOB NOT NULL, user TEXT);
CREATE TABLE IF NOT EXISTS inbound (client_id TEXT NOT NULL, pid INTEGER NOT NULL,
    PRIMARY KEY (client_id, pid));
"""

_SQL = {
    "session_put": "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?)",
    "sub_put": "INSERT OR REPLACE INTO subs VALUES (?, ?, ?, ?)",
    "sub_del": "DELETE FROM subs WHERE client_id = ? AND filter = ?",
    "q_put": "INSERT OR REPLACE INTO queue VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    "q_upd": "UPDATE queue SET pid = ?, state = ? WHERE client_id = ? AND seq = ?",
    "q_del": "DELETE FROM queue WHERE client_id = ? AND seq = ?",
    "m_put": "INSERT OR REPLACE INTO messages VALUES (?, ?, ?, ?, ?, ?)",
    "m_del": "DELETE FROM messages WHERE id = ?",
    "r_put": "INSERT OR REPLACE INTO retained VALUES (?, ?, ?, ?, ?)",
    "r_del": "DELETE FROM retained WHERE topic = ?",
    "w_put": "INSERT OR REPLACE INTO wills VALUES (?, ?, ?)",
    "w_del": "DELETE FROM wills WHERE client_id = ?",
    "in_put": "INSERT OR REPLACE INTO inbound VALUES (?, ?)",
    "in_del": "DELETE FROM inbound WHERE client_id = ? AND pid = ?",
}
_SESSION_DEL = (
    "DELETE FROM sessions WHERE client_id = ?",
    "DELETE FROM subs WHERE client_id = ?",
    "DELETE FROM queue WHERE client_id = ?",
    "DELETE FROM inbound WHERE client_id = ?",
)


def encode_options(o: SubscriptionOptions) -> int:
    """Subscription options as the SUBSCRIBE options byte (3.8.3.1)."""
    return o.qos | (4 if o.no_local else 0) | (8 if o.retain_as_published else 0) \
        | (o.retain_handling << 4)


def decode_options(b: int) -> SubscriptionOptions:
    return SubscriptionOptions(b & 3, bool(b & 4), bool(b & 8), RetainHandling((b >> 4) & 3))


def encode_props(props: Properties) -> bytes | None:
    """PUBLISH properties as bytes (a v5 PUBLISH carrying them), None when empty."""
    if props is NO_PROPERTIES or props.is_empty():
        return None
    return encode(Publish("p", b"", properties=props), MQTT_5)


def decode_props(blob: bytes | None) -> Properties:
    if not blob:
        return NO_PROPERTIES
    packet = decode_packet(blob, MQTT_5)
    assert isinstance(packet, Publish)
    return packet.properties


def encode_will(will: Will) -> bytes:
    """A Will as bytes: a v5 CONNECT carrying it (every will field and property survives)."""
    return encode(Connect("w", MQTT_5, will=will), MQTT_5)


def decode_will(blob: bytes) -> Will:
    packet = decode_packet(bytes(blob), MQTT_5, role="server")
    assert isinstance(packet, Connect) and packet.will is not None
    return packet.will


@dataclass
class Snapshot:
    """Everything loaded at startup (rows as tuples, in table column order)."""

    sessions: list[tuple[Any, ...]] = field(default_factory=list)
    subs: list[tuple[Any, ...]] = field(default_factory=list)
    queue: list[tuple[Any, ...]] = field(default_factory=list)  # ordered by client, seq
    messages: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    retained: list[tuple[Any, ...]] = field(default_factory=list)
    wills: list[tuple[Any, ...]] = field(default_factory=list)
    inbound: list[tuple[Any, ...]] = field(default_factory=list)


class BrokerStore:
    """The broker's persistence: buffered operations, one writer thread, group commit."""

    def __init__(self, path: Path, clock: Clock, *, commit_interval: float = 0.002,
                 synchronous: str = "full", reactor: Any = None) -> None:
        self.path = path
        self.clock = clock
        self.commit_interval = commit_interval
        self.synchronous = synchronous.upper()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self._pool: ThreadPool | None = None
        self._trigger: Any = None
        self._db: sqlite3.Connection | None = None
        self._ops: dict[Any, tuple[str, Any]] = {}
        self._batch = 1  # number of the batch being buffered
        self._done = 0  # last batch committed
        self._waiters: dict[int, list[Callable[[bool], None]]] = {}
        self._call: Any = None
        self._urgent = False
        self._committing: Deferred[Any] | None = None
        self._next_msg_id = 1
        self._last_start = float("-inf")
        self.commits = 0
        self.rows_written = 0
        self.failed = False
        self.failures = 0
        self.closed = False

    # -- lifecycle ---------------------------------------------------------------------------
    def _run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        assert self._pool is not None
        return deferToThreadPool(self.reactor, self._pool, fn, *args)

    async def open(self) -> Snapshot:
        """Create or open the database and load its state."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._pool = ThreadPool(1, 1, name="mqtt-persistence")
        self._pool.start()
        # its thread is not a daemon: should the service never get to close() (a shutdown
        # that timed out), stop it with the reactor or the process would never exit
        self._trigger = self.reactor.addSystemEventTrigger("during", "shutdown",
                                                           self._stop_pool)
        try:
            snap: Snapshot = await self._run(self._load)
        except BaseException:
            self._stop_pool()
            raise
        return snap

    def _stop_pool(self) -> None:
        if self._trigger is not None:
            with contextlib.suppress(ValueError, KeyError):
                self.reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.stop()

    def _load(self) -> Snapshot:
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._db = db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        db.executescript(_SCHEMA)
        db.execute("DELETE FROM messages WHERE id NOT IN (SELECT msg_id FROM queue)")
        snap = Snapshot()
        snap.sessions = db.execute("SELECT * FROM sessions").fetchall()
        snap.subs = db.execute("SELECT * FROM subs").fetchall()
        snap.queue = db.execute("SELECT * FROM queue ORDER BY client_id, seq").fetchall()
        snap.messages = {row[0]: row for row in db.execute("SELECT * FROM messages")}
        snap.retained = db.execute("SELECT * FROM retained").fetchall()
        snap.wills = db.execute("SELECT * FROM wills").fetchall()
        snap.inbound = db.execute("SELECT * FROM inbound").fetchall()
        self._next_msg_id = max(snap.messages, default=0) + 1
        return snap

    async def close(self) -> None:
        """Commit what is buffered, close the database, stop the thread. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._pool is None:
            return
        while self._committing is not None:
            await self._committing
        if self._ops or self._waiters:
            self._commit()
            while self._committing is not None:
                await self._committing
        try:
            await self._run(self._close_db)
        finally:
            self._stop_pool()

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- operations (event loop thread) ------------------------------------------------------
    def _put(self, key: Any, op: str, params: Any) -> None:
        self._ops[key] = (op, params)
        if self._call is None and self._committing is None and not self.closed:
            self._call = self.clock.callLater(LAZY_INTERVAL, self._commit)

    def save_session(self, s: Session) -> None:
        self._put(("s", s.client_id), "session_put",
                  (s.client_id, s.expiry, s.version, s.user, s.disconnected_at))

    def delete_session(self, client_id: str, deliveries: list[Delivery]) -> None:
        """The session ended: its rows go, its messages lose a reference each."""
        for key in [k for k in self._ops
                    if k[0] in ("s", "sub", "q", "in") and k[1] == client_id]:
            del self._ops[key]
        for d in deliveries:
            if d.seq:
                d.seq = 0
                self._unref(d.msg)
        self._ops.pop(("sd", client_id), None)
        self._put(("sd", client_id), "session_del", (client_id,))

    def save_subscription(self, client_id: str, sub: Subscription) -> None:
        self._put(("sub", client_id, sub.filter), "sub_put",
                  (client_id, sub.filter, encode_options(sub.options), sub.subid))

    def delete_subscription(self, client_id: str, topic_filter: str) -> None:
        self._put(("sub", client_id, topic_filter), "sub_del", (client_id, topic_filter))

    def queue_add(self, client_id: str, d: Delivery) -> None:
        msg = d.msg
        if msg.refs == 0 or not msg.db_id:
            msg.db_id = self._next_msg_id
            self._next_msg_id += 1
            self._put(("m", msg.db_id), "m_put", (msg.db_id, msg.topic, msg.payload, msg.qos,
                                                 encode_props(msg.props),
                                                 self._wall(msg.expiry_at)))
        msg.refs += 1
        self._put(("q", client_id, d.seq), "q_put", self._qrow(client_id, d))

    def queue_update(self, client_id: str, d: Delivery) -> None:
        key = ("q", client_id, d.seq)
        old = self._ops.get(key)
        if old is not None and old[0] == "q_put":
            self._ops[key] = ("q_put", self._qrow(client_id, d))
        else:
            self._put(key, "q_upd", (d.pid, d.state, client_id, d.seq))

    def queue_remove(self, client_id: str, d: Delivery) -> None:
        key = ("q", client_id, d.seq)
        old = self._ops.get(key)
        if old is not None and old[0] == "q_put":
            del self._ops[key]  # added and gone within one batch: never written
        else:
            self._put(key, "q_del", (client_id, d.seq))
        d.seq = 0
        self._unref(d.msg)

    def _unref(self, msg: Message) -> None:
        msg.refs -= 1
        if msg.refs <= 0:
            msg.refs = 0
            key = ("m", msg.db_id)
            old = self._ops.get(key)
            if old is not None and old[0] == "m_put":
                del self._ops[key]
            else:
                self._put(key, "m_del", (msg.db_id,))
            msg.db_id = 0

    def retain_set(self, msg: Message) -> None:
        self._put(("r", msg.topic), "r_put", (msg.topic, msg.payload, msg.qos,
                                             encode_props(msg.props), self._wall(msg.expiry_at)))

    def retain_clear(self, topic: str) -> None:
        self._put(("r", topic), "r_del", (topic,))

    def inbound_add(self, client_id: str, pid: int) -> None:
        """An inbound QoS 2 packet id awaiting PUBREL (its PUBREC waits for this commit)."""
        self._put(("in", client_id, pid), "in_put", (client_id, pid))

    def inbound_remove(self, client_id: str, pid: int) -> None:
        key = ("in", client_id, pid)
        old = self._ops.get(key)
        if old is not None and old[0] == "in_put":
            del self._ops[key]  # released within one batch: never written
        else:
            self._put(key, "in_del", (client_id, pid))

    def will_set(self, client_id: str, will: Will, user: str | None) -> None:
        self._put(("w", client_id), "w_put", (client_id, encode_will(will), user))

    def will_clear(self, client_id: str) -> None:
        self._put(("w", client_id), "w_del", (client_id,))

    def _qrow(self, client_id: str, d: Delivery) -> tuple[Any, ...]:
        subids = ",".join(map(str, d.subids)) if d.subids else None
        return (client_id, d.seq, d.msg.db_id, d.qos, int(d.retain), subids, d.pid, d.state)

    def _wall(self, expiry_at: float | None) -> float | None:
        """Loop clock time -> wall clock time (for message expiry across restarts)."""
        if expiry_at is None:
            return None
        return time.time() + (expiry_at - self.clock.seconds())

    def local(self, wall: float | None) -> float | None:
        """Wall clock time -> loop clock time."""
        if wall is None:
            return None
        return self.clock.seconds() + (wall - time.time())

    # -- group commit ------------------------------------------------------------------------
    def token(self) -> int:
        """The batch that will hold every operation buffered so far."""
        return self._batch

    def when_committed(self, token: int, fn: Callable[[bool], None]) -> None:
        """Call ``fn(ok)`` once batch ``token`` is committed (at once if it already is)."""
        if token <= self._done:
            fn(True)  # committed earlier (a failed batch fired its waiters with False then)
            return
        self._waiters.setdefault(token, []).append(fn)
        if self._committing is None and not self._urgent and not self.closed:
            if self._call is not None and self._call.active():
                self._call.cancel()
            self._urgent = True
            self._call = self.clock.callLater(self._urgent_delay(), self._commit)

    def _urgent_delay(self) -> float:
        """Commit at once when the last commit started long enough ago, else when it did
        ``commit_interval`` ago: low latency when idle, bounded commit rate under load."""
        return max(0.0, self._last_start + self.commit_interval - self.clock.seconds())

    def _commit(self) -> None:
        self._call = None
        self._urgent = False
        if self._pool is None:
            return
        self._last_start = self.clock.seconds()
        number = self._batch
        self._batch += 1
        batch = list(self._ops.values())
        self._ops = {}
        if not batch:
            self._finished(None, number)
            return
        self._committing = d = self._run(self._write, batch)
        d.addBoth(self._finished, number)

    def _write(self, batch: list[tuple[str, Any]]) -> int:
        db = self._db
        assert db is not None
        try:
            db.execute("BEGIN")
            for op, params in batch:
                if op == "session_del":
                    for sql in _SESSION_DEL:
                        db.execute(sql, params)
                else:
                    db.execute(_SQL[op], params)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return len(batch)

    def _finished(self, result: Any, number: int) -> None:
        self._committing = None
        ok = not isinstance(result, Failure)
        if ok:
            if self.failed:
                log.info("MQTT persistence: commits work again after {n} failures",
                         n=self.failures)
            self.failed = False
            self.commits += 1
            self.rows_written += result or 0
        else:
            if not self.failed:  # once per outage, not once per commit
                log.failure("MQTT persistence: commit failed; messages are acknowledged with "
                            "reason 0x83 (v5) and may be lost on restart", result)
            self.failed = True
            self.failures += 1
        self._done = number
        for key in sorted(k for k in self._waiters if k <= number):
            for fn in self._waiters.pop(key):
                try:
                    fn(ok)
                except Exception:
                    log.failure("MQTT persistence: commit callback failed")
        if self.closed:
            return
        if self._waiters:
            self._urgent = True
            self._call = self.clock.callLater(self._urgent_delay(), self._commit)
        elif self._ops:
            self._call = self.clock.callLater(LAZY_INTERVAL, self._commit)

    def settled(self) -> Deferred[None]:
        """Fires once everything buffered so far is committed (tests, shutdown)."""
        d: Deferred[None] = Deferred()
        if not self._ops and self._committing is None and not self._waiters:
            return succeed(None)
        self.when_committed(self.token(), lambda ok: d.callback(None))
        return d


def restore(broker: Any, snap: Snapshot) -> tuple[int, int, int]:
    """Load a snapshot into an empty broker: sessions (expired ones dropped), their
    subscriptions and queued messages, retained messages, and the wills of the connections
    the last run ended without a DISCONNECT (``Broker.restore_will``). Returns the counts of
    sessions, queued and retained messages."""
    from iotserver.mqtt.session import NEVER
    from iotserver.mqtt.topics import TopicError, parse_shared

    store: BrokerStore = broker.store
    now = time.time()
    limits = broker.limits
    sessions: dict[str, Session] = {}
    for cid, expiry, version, user, disconnected_at in snap.sessions:
        since = disconnected_at if disconnected_at is not None else now  # killed while online
        if expiry != NEVER and since + expiry <= now:
            store.delete_session(cid, [])
            continue
        s = Session(cid, user=user, version=version, expiry=expiry,
                    max_queued=limits.max_queued_messages,
                    max_queued_bytes=limits.max_queued_bytes, stats=broker.stats,
                    clock=broker.clock)
        s.store = store
        s.ratelog = broker.ratelog
        s.disconnected_at = since
        sessions[cid] = s
        broker.sessions[cid] = s
        if expiry != NEVER:
            broker.schedule_expiry(s, since + expiry - now)
    for cid, topic_filter, options, subid in snap.subs:
        owner = sessions.get(cid)
        if owner is None:
            continue
        try:
            shared = parse_shared(topic_filter)
        except TopicError:
            continue
        group, inner = shared if shared is not None else (None, topic_filter)
        broker.restore_subscription(owner, Subscription(topic_filter, inner,
                                                        decode_options(options), subid, group))
    messages: dict[int, Message] = {}
    per_session: dict[str, list[Delivery]] = {}
    for cid, seq, msg_id, qos, retain, subids, pid, state in snap.queue:
        row = snap.messages.get(msg_id)
        if cid not in sessions or row is None:
            continue
        msg = messages.get(msg_id)
        if msg is None:
            _, topic, payload, mqos, props, expiry = row
            msg = messages[msg_id] = Message(topic, bytes(payload), mqos, False,
                                             decode_props(props), store.local(expiry))
            msg.db_id = msg_id
        msg.refs += 1
        ids = tuple(int(x) for x in subids.split(",")) if subids else ()
        per_session.setdefault(cid, []).append(Delivery(msg, qos, bool(retain), ids, pid, state,
                                                        seq))
    for cid, pid in snap.inbound:
        if cid in sessions:
            sessions[cid].incoming_qos2.add(pid)  # PUBREC sent, PUBREL not yet received
    queued = 0
    for cid, deliveries in per_session.items():
        sessions[cid].restore(deliveries)
        queued += len(deliveries)
    retained = 0
    for topic, payload, qos, props, expiry in snap.retained:
        local = store.local(expiry)
        if local is not None and local <= broker.clock.seconds():
            store.retain_clear(topic)
            continue
        broker.retained.set(Message(topic, bytes(payload), qos, True, decode_props(props), local))
        retained += 1
    for cid, blob, user in snap.wills:
        try:
            will = decode_will(blob)
        except Exception:  # a row we cannot read back is dropped, not fatal
            log.warn("MQTT persistence: the stored will of {cid!r} is unreadable, dropped",
                     cid=cid)
            store.will_clear(cid)
            continue
        broker.restore_will(cid, will, user, sessions.get(cid))
    return len(sessions), queued, retained
