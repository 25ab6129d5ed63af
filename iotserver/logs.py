"""Forward stdlib ``logging`` (asyncua, pymodbus) into ``twisted.logger``.

Under twistd, stdlib log records otherwise end up as ``stderr#error`` lines; forwarded, they get
the right level, the library's name as namespace, and go wherever twistd logs.
"""

from __future__ import annotations

import logging

from twisted.logger import Logger, LogLevel

_LEVELS = (
    (logging.CRITICAL, LogLevel.critical),
    (logging.ERROR, LogLevel.error),
    (logging.WARNING, LogLevel.warn),
    (logging.INFO, LogLevel.info),
)

# Libraries that are chatty at INFO: only their warnings and errors reach our log by default.
QUIET_LIBRARIES = ("asyncua", "pymodbus", "aiosqlite")


class TwistedLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        level = next(
            (lv for threshold, lv in _LEVELS if record.levelno >= threshold), LogLevel.debug
        )
        try:
            text = record.getMessage()
        except Exception:  # a library's bad format string must not break logging
            text = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            text += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
        Logger(namespace=record.name).emit(level, "{text}", text=text)


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
