"""Broker counters and rate-limited logging of what limits refused or dropped.

A broker under abuse (a client flooding a full queue, a connection storm) must neither fill the
log nor hide it: each kind of event is logged through the shared :mod:`iotserver.ratelog`
(at most once per ``interval`` seconds, with the count of events suppressed meanwhile), and
always counted in ``BrokerStats`` (shown in $SYS).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.logger import Logger

from iotserver.clock import Clock
from iotserver.ratelog import RateLimitedLog as _SharedRateLimitedLog

log = Logger(namespace="iotserver.mqtt")


class BrokerStats:
    """Plain integer counters (attribute increments are the cheapest thing on the hot path)."""

    __slots__ = (
        "bytes_received",
        "bytes_sent",
        "clients_maximum",
        "clients_total",
        "conflated",
        "connections_refused",
        "dropped",
        "messages_received",
        "messages_sent",
        "protocol_errors",
        "publish_received",
        "publish_sent",
        "sessions_reassigned",
        "started",
    )

    def __init__(self, started: float = 0.0) -> None:
        self.started = started
        self.messages_received = 0  # every control packet in
        self.messages_sent = 0  # every control packet out
        self.publish_received = 0
        self.publish_sent = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.clients_total = 0  # connections accepted since start
        self.clients_maximum = 0  # most clients connected at once
        self.connections_refused = 0
        self.protocol_errors = 0
        self.sessions_reassigned = 0  # client ids taken by another user (ownership.py)
        self.dropped: Counter[str] = Counter()  # reason -> messages dropped
        self.conflated = 0  # last-value messages replaced by a newer one for a slow reader

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {n: getattr(self, n) for n in self.__slots__ if n != "dropped"}
        out["dropped"] = dict(self.dropped)
        return out


class RateLimitedLog(_SharedRateLimitedLog):
    """The shared rate-limited log (:mod:`iotserver.ratelog`) under the MQTT namespace."""

    def __init__(self, clock: Clock, interval: float = 10.0, logger: Logger = log) -> None:
        super().__init__(clock, interval, logger)


class ConnectRate:
    """Token bucket over CONNECTs per second (``rate`` 0 = unlimited), burst of one second
    (at least one CONNECT)."""

    def __init__(self, clock: Clock, rate: float) -> None:
        self.clock = clock
        self.rate = rate
        self.burst = max(1.0, rate)
        self._tokens = self.burst
        self._last = clock.seconds()

    def allow(self) -> bool:
        if self.rate <= 0:
            return True
        now = self.clock.seconds()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
