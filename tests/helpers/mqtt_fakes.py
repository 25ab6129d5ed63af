"""An in-memory stand-in for ``persistence.BrokerStore`` whose commits the test triggers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from iotserver.mqtt.session import Delivery, Message, Session, Subscription


class FakeStore:
    """Records operations; ``commit()`` makes everything so far durable and fires waiters."""

    def __init__(self) -> None:
        self.ops: list[tuple[Any, ...]] = []
        self.batch = 1
        self.done = 0
        self.waiters: dict[int, list[Callable[[bool], None]]] = {}
        self.commits = 0
        self.rows_written = 0

    def save_session(self, s: Session) -> None:
        self.ops.append(("session", s.client_id, s.expiry))

    def delete_session(self, client_id: str, deliveries: list[Delivery]) -> None:
        for d in deliveries:
            d.seq = 0
        self.ops.append(("session_del", client_id))

    def save_subscription(self, client_id: str, sub: Subscription) -> None:
        self.ops.append(("sub", client_id, sub.filter))

    def delete_subscription(self, client_id: str, topic_filter: str) -> None:
        self.ops.append(("sub_del", client_id, topic_filter))

    def queue_add(self, client_id: str, d: Delivery) -> None:
        self.ops.append(("q_add", client_id, d.seq, d.msg.payload))

    def queue_update(self, client_id: str, d: Delivery) -> None:
        self.ops.append(("q_upd", client_id, d.seq, d.pid, d.state))

    def queue_remove(self, client_id: str, d: Delivery) -> None:
        self.ops.append(("q_del", client_id, d.seq))
        d.seq = 0

    def inbound_add(self, client_id: str, pid: int) -> None:
        self.ops.append(("in_add", client_id, pid))

    def inbound_remove(self, client_id: str, pid: int) -> None:
        self.ops.append(("in_del", client_id, pid))

    def will_set(self, client_id: str, will: Any, user: str | None) -> None:
        self.ops.append(("w_put", client_id))

    def will_clear(self, client_id: str) -> None:
        self.ops.append(("w_del", client_id))

    def retain_set(self, msg: Message) -> None:
        self.ops.append(("r_put", msg.topic, msg.payload))

    def retain_clear(self, topic: str) -> None:
        self.ops.append(("r_del", topic))

    def token(self) -> int:
        return self.batch

    def when_committed(self, token: int, fn: Callable[[bool], None]) -> None:
        if token <= self.done:
            fn(True)
        else:
            self.waiters.setdefault(token, []).append(fn)

    def commit(self) -> None:
        number = self.batch
        self.batch += 1
        self.done = number
        self.commits += 1
        for key in sorted(k for k in self.waiters if k <= number):
            for fn in self.waiters.pop(key):
                fn(True)
