"""``$SYS/broker/...``: broker statistics published periodically as retained messages.

Topic names follow mosquitto's where one exists, so existing dashboards work. Values are
plain UTF-8 text. Only ``$SYS/#`` subscriptions receive them (MQTT-4.7.2-1: ``#`` alone does
not match ``$`` topics); they are not persisted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger(namespace="iotserver.mqtt")

VERSION = "iotserver MQTT broker (MQTT 3.1.1, 5.0)"


def sys_values(broker: Any) -> dict[str, str]:
    """Topic (below ``$SYS/broker/``) -> value, computed now."""
    st = broker.stats
    clients = broker.clients
    sessions = broker.sessions
    uptime = int(broker.clock.seconds() - st.started)
    store = broker.store
    values = {
        "version": VERSION,
        "uptime": f"{uptime} seconds",
        "clients/connected": len(clients),
        "clients/disconnected": len(sessions) - len(clients),
        "clients/total": len(sessions),
        "clients/maximum": st.clients_maximum,
        "clients/accepted": st.clients_total,
        "clients/refused": st.connections_refused,
        "clients/protocol_errors": st.protocol_errors,
        "clients/sessions_reassigned": st.sessions_reassigned,
        "messages/received": st.messages_received,
        "messages/sent": st.messages_sent,
        "publish/messages/received": st.publish_received,
        "publish/messages/sent": st.publish_sent,
        "publish/messages/dropped": st.dropped_total,
        "publish/messages/conflated": st.conflated,
        "bytes/received": st.bytes_received,
        "bytes/sent": st.bytes_sent,
        "retained messages/count": broker.retained_count,
        "subscriptions/count": broker.subscription_count,
        "store/messages/count": sum(len(s.queue) + len(s.inflight) + len(s.latest)
                                    for s in sessions.values()),
    }
    for reason, count in st.dropped.items():
        values[f"publish/messages/dropped/{reason}"] = count
    if store is not None:
        values["persistence/commits"] = store.commits
        values["persistence/rows"] = store.rows_written
    return {k: str(v) for k, v in values.items()}


class SysPublisher:
    """Publishes ``sys_values`` every ``interval`` seconds (only values that changed)."""

    def __init__(self, broker: Any, interval: float,
                 extra: Callable[[], dict[str, str]] | None = None) -> None:
        self.broker = broker
        self.interval = interval
        self.extra = extra  # more topic -> value pairs (the listeners' edge counters)
        self._last: dict[str, str] = {}
        self._loop: LoopingCall | None = None

    def start(self) -> None:
        if self.interval <= 0 or self._loop is not None:
            return
        self._loop = LoopingCall(self.publish)
        self._loop.clock = self.broker.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: log.failure("$SYS publisher stopped", f))

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def publish(self) -> None:
        publish = self.broker.publish_internal
        values = sys_values(self.broker)
        if self.extra is not None:
            values.update(self.extra())
        for name, value in values.items():
            if self._last.get(name) != value:
                self._last[name] = value
                publish(f"$SYS/broker/{name}", value.encode(), 0, True)
