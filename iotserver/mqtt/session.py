"""Messages and sessions: what the broker keeps per client id, with or without a connection.

A ``Message`` is built once per PUBLISH and shared by every subscriber it goes to; it caches its
encoded form per (version, QoS, retain, subscription identifiers...) so fan-out to N clients of
one protocol version encodes once and only splices packet identifiers (``with_packet_id``).

A ``Session`` owns the per-client delivery state of MQTT 4.3 and 4.4: outgoing QoS 1/2 messages
in flight (bounded by the client's Receive Maximum and our ``max_inflight``), a bounded queue
behind them (offline, window full, or transport paused), and the packet identifiers of inbound
QoS 2 messages awaiting PUBREL. It talks to a connection through a small interface
(``write_publish``, ``write_pubrel``, ``paused``, ``send_window``) and to persistence through
``store`` (None for sessions that end with their connection).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from iotserver.mqtt.codec import encode_publish_with_offset, encode_varint
from iotserver.mqtt.packets import MQTT_5, NO_PROPERTIES, Properties, SubscriptionOptions, Will

if TYPE_CHECKING:
    from iotserver.mqtt.limits import BrokerStats

NEVER = 0xFFFFFFFF

# Delivery states (persisted as integers).
QUEUED = 0  # not sent on the current connection (may hold a packet id from an earlier one)
SENT = 1  # PUBLISH sent, waiting for PUBACK / PUBREC
RELEASED = 2  # PUBREC received, PUBREL sent, waiting for PUBCOMP


class Message:
    """One application message as routed: immutable content plus an encoding cache.

    ``expiry_at`` is the clock time the Message Expiry Interval ends (None: never). ``origin``
    is the publishing client id (None for server-originated messages), for No Local.
    """

    __slots__ = ("_enc", "db_id", "expiry_at", "last_value", "origin", "payload", "props", "qos",
                 "refs", "retain", "topic")

    def __init__(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                 props: Properties = NO_PROPERTIES, expiry_at: float | None = None,
                 origin: str | None = None) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.props = props
        self.expiry_at = expiry_at
        self.origin = origin
        self._enc: dict[Any, tuple[bytes, int]] = {}
        self.db_id = 0  # row id in the persistence's message table (0: not stored)
        self.refs = 0  # persisted queue entries that reference it
        # A tag value: only the latest one per topic matters, so a reader that cannot keep
        # up gets the newest message of each topic instead of a queue that overflows.
        self.last_value = False

    def __repr__(self) -> str:
        return f"Message({self.topic!r}, {self.payload[:32]!r}, qos={self.qos})"

    def remaining(self, now: float) -> int | None:
        """Seconds of message expiry left, rounded up; None without expiry; <= 0: expired."""
        if self.expiry_at is None:
            return None
        return math.ceil(self.expiry_at - now)

    def encode(self, version: int, qos: int, retain: bool, subids: tuple[int, ...] = (),
               now: float = 0.0, alias: int = 0, alias_only: bool = False
               ) -> tuple[bytes, int] | None:
        """(PUBLISH bytes with packet id 1 when QoS > 0, offset of the packet id), or None if
        the message has expired. v5 forwards the remaining expiry interval (MQTT-3.3.2-6)."""
        if version != MQTT_5:
            key: Any = qos * 2 + retain
            if self.expiry_at is not None and self.expiry_at <= now:
                return None
        elif not subids and not alias and self.expiry_at is None:
            key = 8 + qos * 2 + retain
        else:
            left = self.remaining(now)
            if left is not None and left <= 0:
                return None
            key = (qos, retain, subids, left, alias, alias_only)
        hit = self._enc.get(key)
        if hit is not None:
            return hit
        if type(key) is int and (version != MQTT_5 or self.props is NO_PROPERTIES):
            out = self._plain(version == MQTT_5, qos, retain)
            self._enc[key] = out
            return out
        props = self.props
        if version == MQTT_5 and (subids or alias or self.expiry_at is not None):
            props = replace(props, subscription_identifiers=subids,
                            message_expiry_interval=self.remaining(now),
                            topic_alias=alias or None)
        out = encode_publish_with_offset("" if alias_only else self.topic, self.payload, qos,
                                         retain, False, 1 if qos else None, props, version)
        if len(self._enc) > 64:
            self._enc.clear()
        self._enc[key] = out
        return out


    def _plain(self, v5: bool, qos: int, retain: bool) -> tuple[bytes, int]:
        """PUBLISH without properties, built directly: the topic and payload were validated
        when the message entered the broker, so the codec's checks would be repeated work."""
        tb = self.topic.encode()
        n = len(tb)
        size = 2 + n + (2 if qos else 0) + v5 + len(self.payload)
        b0 = 0x30 | (qos << 1) | retain
        header = bytes((b0, size)) if size < 128 else bytes((b0,)) + encode_varint(size)
        if not qos and not v5:  # the common case (tag telemetry), in one concatenation
            return header + n.to_bytes(2, "big") + tb + self.payload, -1
        parts = [header, n.to_bytes(2, "big"), tb]
        if qos:
            parts.append(b"\x00\x01")
        if v5:
            parts.append(b"\x00")
        parts.append(self.payload)
        return b"".join(parts), len(header) + 2 + n if qos else -1


class Delivery:
    """One message on its way to one session (queued or in flight)."""

    __slots__ = ("msg", "pid", "qos", "retain", "seq", "size", "state", "subids")

    def __init__(self, msg: Message, qos: int, retain: bool, subids: tuple[int, ...],
                 pid: int = 0, state: int = QUEUED, seq: int = 0) -> None:
        self.msg = msg
        self.qos = qos
        self.retain = retain
        self.subids = subids
        self.pid = pid
        self.state = state
        self.seq = seq  # persistence order key within the session (0: not persisted)
        self.size = len(msg.payload) + len(msg.topic)

    def __repr__(self) -> str:
        return f"Delivery({self.msg!r}, qos={self.qos}, pid={self.pid}, state={self.state})"


@dataclass(frozen=True, slots=True)
class Subscription:
    """A session's subscription: ``filter`` as subscribed (``$share/g/...`` included), the
    matching filter ``topic``, the share ``group`` (None: not shared) and its identifier."""

    filter: str
    topic: str
    options: SubscriptionOptions
    subid: int | None = None
    group: str | None = None


class Connection(Protocol):
    """What a session needs from the connection it is attached to (``protocol.py``)."""

    paused: bool
    send_window: int
    version: int

    @property
    def is_open(self) -> bool: ...

    def write_publish(self, msg: Message, qos: int, retain: bool, subids: tuple[int, ...],
                      pid: int, dup: bool) -> bool: ...

    def write_pubrel(self, pid: int) -> None: ...


class SessionStore(Protocol):
    """The persistence operations a session issues (``persistence.BrokerStore``)."""

    def queue_add(self, client_id: str, d: Delivery) -> None: ...

    def queue_update(self, client_id: str, d: Delivery) -> None: ...

    def queue_remove(self, client_id: str, d: Delivery) -> None: ...

    def save_session(self, s: Session) -> None: ...

    def delete_session(self, client_id: str, deliveries: list[Delivery]) -> None: ...

    def save_subscription(self, client_id: str, sub: Subscription) -> None: ...

    def delete_subscription(self, client_id: str, topic_filter: str) -> None: ...

    def inbound_add(self, client_id: str, pid: int) -> None: ...

    def inbound_remove(self, client_id: str, pid: int) -> None: ...

    def token(self) -> int: ...

    def when_committed(self, token: int, fn: Any) -> None: ...


class Session:
    """Per client id state that outlives connections when ``expiry`` > 0 (MQTT 4.1)."""

    def __init__(self, client_id: str, *, user: str | None = None, version: int = 4,
                 expiry: int = 0, max_queued: int = 1000, max_queued_bytes: int = 8 << 20,
                 stats: BrokerStats | None = None, clock: Any = None) -> None:
        self.client_id = client_id
        self.user = user
        self.version = version
        self.expiry = expiry  # Session Expiry Interval, seconds (NEVER: does not expire)
        self.subs: dict[str, Subscription] = {}
        self.queue: deque[Delivery] = deque()
        self.queued_bytes = 0
        # last-value QoS 0 messages waiting for a paused connection, one per topic (bounded
        # by the number of such topics, i.e. tags: see _keep_latest)
        self.latest: dict[str, Delivery] = {}
        self.latest_bytes = 0
        self.queued_qos0 = 0
        self.inflight: dict[int, Delivery] = {}  # packet id -> delivery, in send order
        self.incoming_qos2: set[int] = set()  # inbound QoS 2 ids awaiting PUBREL (4.3.3)
        self.reserved: set[int] = set()  # ids of queued deliveries parked by resend()
        self.releasing: set[int] = set()  # PUBREC received, PUBREL waits for the commit
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self.conn: Connection | None = None
        self.store: SessionStore | None = None  # set while the session is persistent
        self.stats = stats
        self.clock = clock
        self.ratelog: Any = None  # limits.RateLimitedLog, set by the broker
        self.will: Will | None = None
        self.will_timer: Any = None
        self.expiry_timer: Any = None
        self.disconnected_at: float | None = None  # wall clock time, for expiry after restart
        self._next_pid = 0
        self._next_seq = 1

    def __repr__(self) -> str:
        return (f"Session({self.client_id!r}, online={self.conn is not None}, "
                f"subs={len(self.subs)}, queued={len(self.queue)}, inflight={len(self.inflight)})")

    # -- delivery ----------------------------------------------------------------------------
    def deliver(self, msg: Message, qos: int, retain: bool, subids: tuple[int, ...]) -> bool:
        """Send or queue one message; True when it was written to persistence (the publisher's
        acknowledgement must then wait for the commit)."""
        conn = self.conn
        if conn is not None and not conn.paused:
            if qos == 0:
                conn.write_publish(msg, 0, retain, subids, 0, False)
                return False
            if not self.queue and len(self.inflight) < conn.send_window:
                d = Delivery(msg, qos, retain, subids)
                store = self.store
                if store is not None:
                    d.seq = self._seq()
                d.pid = self._alloc_pid()
                d.state = SENT
                self.inflight[d.pid] = d
                if store is not None:
                    store.queue_add(self.client_id, d)
                if not conn.write_publish(msg, qos, retain, subids, d.pid, False):
                    self._forget(d.pid)
                return store is not None
        elif conn is None and qos == 0:
            return False  # QoS 0 is not queued for offline sessions (MQTT 3.1.2.4, optional)
        elif qos == 0 and msg.last_value:
            self._keep_latest(Delivery(msg, 0, retain, subids))
            return False
        # queue: offline, window full or transport paused (a slow reader); QoS 0 goes first
        full = len(self.queue) >= self.max_queued or \
            self.queued_bytes + len(msg.payload) + len(msg.topic) > self.max_queued_bytes
        if full and (qos == 0 or not self._drop_oldest_qos0()):
            self._count_drop("queue_full" if qos else "queue_full_qos0")
            return False
        return self._enqueue(Delivery(msg, qos, retain, subids))

    def _enqueue(self, d: Delivery) -> bool:
        self.queue.append(d)
        self.queued_bytes += d.size
        if d.qos == 0:
            self.queued_qos0 += 1
            return False
        if self.store is not None:
            d.seq = self._seq()
            self.store.queue_add(self.client_id, d)
            return True
        return False

    def _keep_latest(self, d: Delivery) -> None:
        """A QoS 0 last-value message for a paused connection: it replaces an older one of
        its topic that is still waiting, so a slow reader (or one draining the burst of
        retained messages a SUBSCRIBE sent) is never left with a stale value. At most one per
        topic waits; sent after the queue when the connection can take more."""
        latest = self.latest
        old = latest.pop(d.msg.topic, None)
        if old is not None:
            self.latest_bytes -= old.size
            if self.stats is not None:
                self.stats.conflated += 1
        latest[d.msg.topic] = d
        self.latest_bytes += d.size

    def _drop_oldest_qos0(self) -> bool:
        """Make room for a QoS 1/2 message by dropping the oldest queued QoS 0 one."""
        if not self.queued_qos0:
            return False
        for i, d in enumerate(self.queue):
            if d.qos == 0:
                del self.queue[i]
                self.queued_qos0 -= 1
                self.queued_bytes -= d.size
                self._count_drop("queue_full_qos0")
                return True
        return False  # pragma: no cover - counter and queue disagree

    def _count_drop(self, reason: str) -> None:
        if self.stats is not None:
            self.stats.dropped[reason] += 1
        if self.ratelog is not None and reason != "expired":
            self.ratelog.warn(f"drop:{reason}", "MQTT: {reason}: a message for {cid!r} was "
                              "dropped ({queued} queued)", reason=reason, cid=self.client_id,
                              queued=len(self.queue))

    def fill(self) -> None:
        """Move queued messages into the window while the connection can take them."""
        conn = self.conn
        queue = self.queue
        now = self.clock.seconds() if self.clock is not None else 0.0
        while (queue or self.latest) and conn is not None and not conn.paused:
            if not queue:
                self._fill_latest(conn)
                return
            d = queue[0]
            if d.qos and len(self.inflight) >= conn.send_window:
                return
            queue.popleft()
            self.queued_bytes -= d.size
            if d.qos == 0:
                self.queued_qos0 -= 1
                conn.write_publish(d.msg, 0, d.retain, d.subids, 0, False)
                continue
            if d.msg.expiry_at is not None and d.msg.expiry_at <= now:
                self._count_drop("expired")  # MQTT-3.3.2-5
                self.reserved.discard(d.pid)
                self._removed(d)
                continue
            dup = d.pid != 0  # sent on an earlier connection, parked by resend()
            if dup:
                self.reserved.discard(d.pid)
            else:
                d.pid = self._alloc_pid()
            d.state = SENT
            self.inflight[d.pid] = d
            if self.store is not None and d.qos == 2 and not dup:
                self.store.queue_update(self.client_id, d)  # QoS 2 keeps its id (MQTT-4.4.0-1)
            if not conn.write_publish(d.msg, d.qos, d.retain, d.subids, d.pid, dup):
                self._forget(d.pid)

    def _fill_latest(self, conn: Connection) -> None:
        latest = self.latest
        while latest and not conn.paused:
            topic = next(iter(latest))
            d = latest.pop(topic)
            self.latest_bytes -= d.size
            conn.write_publish(d.msg, 0, d.retain, d.subids, 0, False)

    def resend(self) -> None:
        """After a reconnect: unacknowledged PUBLISH (DUP) and PUBREL first, in their original
        order and with their original packet ids (MQTT-4.4.0-1), then the queue.

        The new connection's window may be smaller than what was in flight: the excess goes
        back to the front of the queue, keeping its packet id, and is sent as the window opens
        (the client's Receive Maximum holds for resends too, MQTT-4.9.0-2)."""
        conn = self.conn
        if conn is None:
            return
        window = conn.send_window
        parked: list[Delivery] = []
        for n, (pid, d) in enumerate(list(self.inflight.items())):
            if d.state == RELEASED:
                if pid not in self.releasing:  # else it goes once durable (_release)
                    conn.write_pubrel(pid)
            elif n >= window:
                del self.inflight[pid]
                self.reserved.add(pid)
                d.state = QUEUED
                parked.append(d)
            elif not conn.write_publish(d.msg, d.qos, d.retain, d.subids, pid, True):
                self._forget(pid)
        if parked:
            self.queue.extendleft(reversed(parked))
            self.queued_bytes += sum(d.size for d in parked)
        self.fill()

    def acked(self, pid: int) -> bool:
        """PUBACK, or PUBCOMP after PUBREL; False for an unknown packet id."""
        d = self.inflight.pop(pid, None)
        if d is None:
            return False
        self._removed(d)
        if self.queue:
            self.fill()
        return True

    def received(self, pid: int, failed: bool) -> bool:
        """PUBREC: release (send PUBREL) or, with an error reason code, end the flow (4.3.3)."""
        d = self.inflight.get(pid)
        if d is None or d.qos != 2:
            return False
        if failed:
            return self.acked(pid)
        if pid in self.releasing:
            return True  # a repeated PUBREC: the PUBREL is on its way
        store = self.store
        if d.state != RELEASED:
            d.state = RELEASED
            if store is not None:
                # Exactly once across kill -9: once the PUBREL is out, the client may deliver
                # the message and forget the packet id, so a restart must find RELEASED (and
                # send PUBREL again), never SENT (which resends the PUBLISH: a duplicate).
                store.queue_update(self.client_id, d)
                self.releasing.add(pid)
                store.when_committed(store.token(), lambda ok: self._release(d))
                return True
        if self.conn is not None:
            self.conn.write_pubrel(pid)
        return True

    def _release(self, d: Delivery) -> None:
        """The RELEASED state of ``d`` is durable: its PUBREL may go out."""
        self.releasing.discard(d.pid)
        conn = self.conn
        # a connection still waiting for its CONNACK gets it from resend() after the CONNACK
        if conn is not None and conn.is_open and self.inflight.get(d.pid) is d:
            conn.write_pubrel(d.pid)

    def add_incoming(self, pid: int) -> bool:
        """An inbound QoS 2 PUBLISH is acknowledged with PUBREC: remember its packet id until
        PUBREL (4.3.3), durably for a persistent session so that a PUBLISH resent after a
        restart is recognised. True when the PUBREC has to wait for the commit."""
        self.incoming_qos2.add(pid)
        if self.store is not None:
            self.store.inbound_add(self.client_id, pid)
            return True
        return False

    def release_incoming(self, pid: int) -> bool | None:
        """PUBREL for an inbound QoS 2 packet id: None when unknown, else whether the PUBCOMP
        has to wait for the commit (the id may be reused for a new message after PUBCOMP)."""
        if pid not in self.incoming_qos2:
            return None
        self.incoming_qos2.discard(pid)
        if self.store is not None:
            self.store.inbound_remove(self.client_id, pid)
            return True
        return False

    def _forget(self, pid: int) -> None:
        """A message the connection could not send (too large, expired): treat as delivered."""
        d = self.inflight.pop(pid, None)
        if d is not None:
            self._removed(d)

    def _removed(self, d: Delivery) -> None:
        if d.seq and self.store is not None:
            self.store.queue_remove(self.client_id, d)

    def _alloc_pid(self) -> int:
        # MQTT-2.2.1-4: an id is free again only once its flow is complete
        inflight = self.inflight
        pid = self._next_pid
        for _ in range(65536):
            pid = pid + 1 if pid < 65535 else 1
            if pid not in inflight and pid not in self.reserved:
                self._next_pid = pid
                return pid
        raise RuntimeError("no free packet identifier")  # pragma: no cover - window <= 65535

    def _seq(self) -> int:
        seq = self._next_seq
        self._next_seq = seq + 1
        return seq

    # -- lifecycle -----------------------------------------------------------------------------
    def attach(self, conn: Connection) -> None:
        self.conn = conn
        self.disconnected_at = None
        self.version = conn.version

    def detach(self) -> None:
        """The connection is gone: in-flight QoS 1/2 stays for redelivery, QoS 0 goes."""
        self.conn = None
        self.latest.clear()
        self.latest_bytes = 0
        if self.queued_qos0:
            kept = deque(d for d in self.queue if d.qos)
            self.queued_bytes = sum(d.size for d in kept)
            self.queued_qos0 = 0
            self.queue = kept

    def restore(self, deliveries: list[Delivery]) -> None:
        """Deliveries loaded from persistence, in order: sent ones back in flight."""
        for d in deliveries:
            if d.seq >= self._next_seq:
                self._next_seq = d.seq + 1
            if d.state in (SENT, RELEASED) and d.pid and d.pid not in self.inflight:
                self.inflight[d.pid] = d
            else:
                d.pid = 0
                d.state = QUEUED
                self.queue.append(d)
                self.queued_bytes += d.size
        if self.inflight:
            self._next_pid = max(self.inflight)

    def persisted(self) -> list[Delivery]:
        """Deliveries written to persistence (their messages hold a reference each)."""
        return [d for d in itertools.chain(self.inflight.values(), self.queue) if d.seq]

    def clear(self) -> list[Delivery]:
        """Drop all deliveries (session end); returns them for reference counting."""
        out = list(self.inflight.values()) + list(self.queue)
        self.inflight.clear()
        self.queue.clear()
        self.queued_bytes = 0
        self.queued_qos0 = 0
        self.latest.clear()
        self.latest_bytes = 0
        self.incoming_qos2.clear()
        self.reserved.clear()
        self.releasing.clear()
        return out
