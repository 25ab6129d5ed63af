"""Forward stdlib ``logging`` (asyncua, pymodbus) into ``twisted.logger``.

Under twistd, stdlib log records otherwise end up as ``stderr#error`` lines; forwarded, they get
the right level, the library's name as namespace, their traceback (as a ``log_failure``, which
twisted's log formatting prints), and go wherever twistd logs.

The libraries' lines about what a *peer* did wrong (a malformed OPC UA message, a message over
the size limit, a request without session...) are peer protocol errors, not server errors: they
are logged at warning level through the shared :mod:`iotserver.ratelog` (one line per kind per
``PEER_ERROR_INTERVAL`` seconds, with the count of lines not logged), without a traceback. Every
other warning or error of these libraries is rate-limited the same way but keeps its level and
traceback, so a client cannot flood the log through them either.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from iotserver.ratelog import RateLimitedLog, Seconds

_LEVELS = (
    (logging.CRITICAL, LogLevel.critical),
    (logging.ERROR, LogLevel.error),
    (logging.WARNING, LogLevel.warn),
    (logging.INFO, LogLevel.info),
)

# Libraries that are chatty at INFO: only their warnings and errors reach our log by default.
QUIET_LIBRARIES = ("asyncua", "pymodbus", "aiosqlite")

# Libraries whose warnings and errors are mostly about their peers: rate-limited per kind.
PEER_FACING = ("asyncua", "pymodbus")

# (logger, message template) of records that report a peer's protocol error (asyncua 2.1).
PEER_ERRORS = frozenset({
    ("asyncua.server.binary_server_asyncio", "Got malformed header %s"),
    ("asyncua.server.binary_server_asyncio",
     "Exception raised while parsing message from client"),
    ("asyncua.uaprotocol", "Message size: %s is > configured max message size: %s"),
    ("asyncua.uaprotocol", "Number of message chunks: %s is > configured max chunk count: %s"),
    ("asyncua.server.uaprocessor", "Received request that exceed the transport limits"),
    ("asyncua.server.uaprocessor", "Received an error message type"),
    ("asyncua.server.uaprocessor", "Unsupported message type: %s"),
    ("asyncua.server.uaprocessor", "sending service fault response: %s (%s)"),
})

# A message the peer sent that asyncua could not decode or accept ends in an exception of
# these types (asyncua.ua.uaerrors.UaError and its NotEnoughData, for short messages); any
# other exception while processing may be a server bug and keeps its traceback.
PEER_EXCEPTIONS = ("asyncua.ua.uaerrors._base.UaError",)

PEER_ERROR_INTERVAL = 10.0


def _is_peer_exception(exc: BaseException) -> bool:
    return any(f"{k.__module__}.{k.__qualname__}" in PEER_EXCEPTIONS for k in type(exc).__mro__)


class _Monotonic:
    def seconds(self) -> float:
        return time.monotonic()


class TwistedLogHandler(logging.Handler):
    def __init__(self, clock: Seconds | None = None) -> None:
        super().__init__()
        self.ratelog = RateLimitedLog(clock or _Monotonic(), PEER_ERROR_INTERVAL)

    def emit(self, record: logging.LogRecord) -> None:
        level = next(
            (lv for threshold, lv in _LEVELS if record.levelno >= threshold), LogLevel.debug
        )
        try:
            text = record.getMessage()
        except Exception:  # a library's bad format string must not break logging
            text = str(record.msg)
        exc = record.exc_info[1] if record.exc_info else None
        logger = Logger(namespace=record.name)
        template = record.msg if isinstance(record.msg, str) else ""
        peer_error = (record.name, template) in PEER_ERRORS or (
            exc is not None and record.name.startswith("asyncua") and _is_peer_exception(exc))
        kw: dict[str, Any] = {}
        if exc is not None:
            text += f" ({type(exc).__name__}: {exc})"
            if not peer_error and record.exc_info is not None:  # our bug or theirs: keep it
                kw["log_failure"] = Failure(exc, record.exc_info[0], record.exc_info[2])
        kw["text"] = text
        if peer_error:
            level = LogLevel.warn
        if level >= LogLevel.warn and record.name.startswith(PEER_FACING):
            self.ratelog.emit(level, f"{record.name}:{template or text}", "{text}",
                              logger=logger, **kw)
            return
        logger.emit(level, "{text}", **kw)


_handler: TwistedLogHandler | None = None


def forward_stdlib_logging(level: int = logging.INFO) -> None:
    """Install the forwarding handler on the root logger once (idempotent)."""
    global _handler
    if _handler is not None:
        return
    _handler = TwistedLogHandler()
    root = logging.getLogger()
    root.addHandler(_handler)
    root.setLevel(level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
