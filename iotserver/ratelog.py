"""Rate-limited logging of what peers do wrong, shared by every protocol.

A server under abuse (a client sending garbage, a login flood, a connection storm) must neither
fill the log nor hide it: each kind of event (``key``) is logged at most once per ``interval``
seconds, and the next line that gets through says how many similar events were not logged
meanwhile. MQTT, Modbus, OPC UA (through the stdlib forwarder in :mod:`iotserver.logs`), the
console and the login module all use one of these.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Protocol

from twisted.logger import Logger, LogLevel

_log = Logger(namespace="iotserver")

class Seconds(Protocol):
    """The part of a clock this needs (the reactor, ``task.Clock``, a monotonic wrapper)."""

    def seconds(self) -> float: ...


MAX_KEYS = 1000  # keys are kinds of events, a few dozen; bound them all the same


class RateLimitedLog:
    """``warn(key, fmt, **kw)`` / ``info(...)`` log at most once per ``interval`` s per ``key``.

    ``suppressed`` counts every line not logged, per key, since start (for stats pages).
    """

    def __init__(self, clock: Seconds, interval: float = 10.0, logger: Logger = _log) -> None:
        self.clock = clock
        self.interval = interval
        self.log = logger
        self._next: dict[str, float] = {}
        self._pending: Counter[str] = Counter()
        self.suppressed: Counter[str] = Counter()

    def warn(self, key: str, fmt: str, **kw: Any) -> bool:
        return self.emit(LogLevel.warn, key, fmt, **kw)

    def info(self, key: str, fmt: str, **kw: Any) -> bool:
        return self.emit(LogLevel.info, key, fmt, **kw)

    def emit(self, level: LogLevel, key: str, fmt: str, *, logger: Logger | None = None,
             **kw: Any) -> bool:
        """Log unless ``key`` was logged less than ``interval`` s ago; True when logged."""
        now = self.clock.seconds()
        if now < self._next.get(key, 0.0):
            self._pending[key] += 1
            self.suppressed[key] += 1
            return False
        pending = self._pending.pop(key, 0)
        if len(self._next) > MAX_KEYS:
            self._next.clear()
            self._pending.clear()
        if len(self.suppressed) > MAX_KEYS:
            self.suppressed.clear()
        self._next[key] = now + self.interval
        if pending:
            fmt += " ({suppressed} similar events not logged)"
            kw["suppressed"] = pending
        (logger or self.log).emit(level, fmt, **kw)
        return True
