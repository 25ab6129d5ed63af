"""Acknowledgements of a client's QoS 1/2 PUBLISHes, kept in order and held until durable.

PUBACK/PUBREC (and the PUBCOMP answering a PUBREL) leave in the order their packets came
(MQTT-4.6.0-2). One may have to wait: for the persistence commit covering a message that reached
a persistent session (group commit, ``persistence.py``), and for interceptors (the tag bridge)
still working on it. Everything behind a waiting acknowledgement waits with it.

``in_flight`` counts the client's unacknowledged QoS 1/2 PUBLISHes against our Receive Maximum
(3.3.4). A 3.1.1 client has no Receive Maximum: when as many acknowledgements are waiting, the
connection stops being read until half of them are gone, so a publisher outrunning the commits
cannot make us buffer without bound.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from iotserver.mqtt.packets import MQTT_5, PUBACK_CODES, ReasonCode

log = Logger(namespace="iotserver.mqtt")

PUBACK, PUBREC, PUBCOMP = 0x40, 0x50, 0x70  # first bytes of the packets


class _Pending:
    __slots__ = ("code", "kind", "pid", "waits")

    def __init__(self, kind: int, pid: int, waits: int, code: int) -> None:
        self.kind = kind
        self.pid = pid
        self.waits = waits  # commits and interceptors still to come
        self.code = code  # reason code (v5 only)


class InboundAcks:
    """The acknowledgement queue of one connection (``conn`` is its ``MqttServerProtocol``)."""

    def __init__(self, conn: Any, limit: int) -> None:
        self.conn = conn
        self.limit = limit  # our Receive Maximum
        self.queue: deque[_Pending] = deque()
        self.in_flight = 0
        self.reading_paused = False

    def __len__(self) -> int:
        return len(self.queue)

    def received(self) -> bool:
        """A QoS 1/2 PUBLISH arrived; False when it exceeds the Receive Maximum."""
        self.in_flight += 1
        return self.in_flight <= self.limit

    def send(self, kind: int, pid: int) -> None:
        """A successful acknowledgement with nothing to wait for."""
        if self.queue:
            self.add(kind, pid)
            return
        if kind != PUBREC:
            self.in_flight -= 1
        self.conn.write(bytes((kind, 2, pid >> 8, pid & 0xFF)))

    def add(self, kind: int, pid: int, code: int = 0,
            pending: list[Deferred[Any]] | None = None, need_commit: bool = False) -> None:
        """Queue an acknowledgement behind earlier ones; it leaves once it is ready."""
        waits = (len(pending) if pending else 0) + need_commit
        entry = _Pending(kind, pid, waits, code)
        self.queue.append(entry)
        if len(self.queue) >= self.limit and not self.reading_paused:
            self.reading_paused = True
            self.conn.transport.pauseProducing()
        if need_commit:
            store = self.conn.broker.store
            store.when_committed(store.token(), lambda ok: self._ready(entry, ok))
        for d in pending or ():
            d.addCallbacks(self._interceptor_done, self._interceptor_failed,
                           callbackArgs=(entry,), errbackArgs=(entry,))
        if not waits:
            self.release()

    def _interceptor_done(self, result: Any, entry: _Pending) -> None:
        if isinstance(result, int) and result and not entry.code:
            entry.code = result if result in PUBACK_CODES else ReasonCode.UNSPECIFIED_ERROR
        self._ready(entry, True)

    def _interceptor_failed(self, failure: Failure, entry: _Pending) -> None:
        log.failure("MQTT: interceptor failed for a message from {cid!r}", failure,
                    cid=self.conn.client_id)
        if not entry.code:
            entry.code = ReasonCode.UNSPECIFIED_ERROR
        self._ready(entry, True)

    def _ready(self, entry: _Pending, ok: bool) -> None:
        if not ok and not entry.code:
            entry.code = ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR  # the commit failed
        entry.waits -= 1
        if entry.waits <= 0 and self.queue and self.queue[0] is entry:
            self.release()

    def release(self) -> None:
        """Write every ready acknowledgement at the head of the queue."""
        conn = self.conn
        queue = self.queue
        v5 = conn.version == MQTT_5
        while queue and queue[0].waits <= 0:
            a = queue.popleft()
            if not conn.is_open:
                continue
            pid = a.pid
            code = a.code if v5 else 0
            if a.kind != PUBREC:
                self.in_flight -= 1
            elif code >= 0x80:
                self.in_flight -= 1  # a failed PUBREC ends the QoS 2 flow (4.3.3)
                if conn.session is not None:
                    conn.session.release_incoming(pid)
            if code:
                conn.write(bytes((a.kind, 3, pid >> 8, pid & 0xFF, code)))
            else:
                conn.write(bytes((a.kind, 2, pid >> 8, pid & 0xFF)))
        if self.in_flight < 0:
            self.in_flight = 0  # ids of an earlier connection (not counted on this one)
        if self.reading_paused and len(queue) <= self.limit // 2:
            self.reading_paused = False
            if conn.is_open:
                conn.transport.resumeProducing()


def after_commit(conn: Any, fn: Callable[[bool], None]) -> None:
    """Call ``fn(ok)`` once everything ``conn``'s session has buffered for persistence so far
    is durable; at once when the session is not persistent. CONNACK, SUBACK and UNSUBACK of
    a persistent session wait for this: acknowledge only what survives a kill -9."""
    session = conn.session
    store = conn.broker.store
    if store is None or session is None or session.store is None:
        fn(True)
        return
    store.when_committed(store.token(), fn)
