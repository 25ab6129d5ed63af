from __future__ import annotations

import logging
import sys
from typing import Any

from twisted.logger import LogLevel, formatEventAsClassicLogText, globalLogPublisher

from iotserver.logs import PEER_ERROR_INTERVAL, TwistedLogHandler, forward_stdlib_logging


def test_stdlib_records_reach_twisted_logger_with_level_and_namespace() -> None:
    forward_stdlib_logging()
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        logging.getLogger("pymodbus.client").warning("device %s timed out", "plc1")
        logging.getLogger("asyncua.server").info("chatty detail")  # quiet library: filtered
        try:
            raise ValueError("bad")
        except ValueError:
            logging.getLogger("iotserver.x").exception("failed")
    finally:
        globalLogPublisher.removeObserver(events.append)
    mine = [e for e in events if e.get("log_namespace", "").startswith(("pymodbus", "asyncua",
                                                                         "iotserver.x"))]
    assert [(e["log_namespace"], e["log_level"], e["text"]) for e in mine] == [
        ("pymodbus.client", LogLevel.warn, "device plc1 timed out"),
        ("iotserver.x", LogLevel.error, "failed (ValueError: bad)"),
    ]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def seconds(self) -> float:
        return self.now


def _capture(handler: TwistedLogHandler, emit: Any) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        emit()
    finally:
        globalLogPublisher.removeObserver(events.append)
    return [e for e in events if e.get("log_namespace", "").startswith(("asyncua", "mine"))]


def _record(name: str, level: int, msg: str, *args: Any, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("inner detail")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)


def test_tracebacks_are_forwarded() -> None:
    handler = TwistedLogHandler(FakeClock())
    events = _capture(handler, lambda: handler.emit(
        _record("mine.lib", logging.ERROR, "it broke", exc=True)))
    assert len(events) == 1
    failure = events[0]["log_failure"]
    assert failure.check(ValueError) and failure.getTracebackObject() is not None
    assert "Traceback" in formatEventAsClassicLogText(events[0])  # what twistd writes


def test_peer_errors_are_warnings_rate_limited_with_a_count() -> None:
    clock = FakeClock()
    handler = TwistedLogHandler(clock)
    name = "asyncua.server.binary_server_asyncio"

    def flood() -> None:
        for _ in range(2000):
            handler.emit(_record(name, logging.ERROR,
                                 "Exception raised while parsing message from client",
                                 exc=True))
        clock.now += PEER_ERROR_INTERVAL
        handler.emit(_record(name, logging.ERROR,
                             "Exception raised while parsing message from client", exc=True))

    events = _capture(handler, flood)
    assert len(events) == 2  # one line, then one line with the count of the others
    assert all(e["log_level"] == LogLevel.warn and "log_failure" not in e for e in events)
    assert "1999 similar events not logged" in formatEventAsClassicLogText(events[1])
    assert "ValueError: inner detail" in events[0]["text"]


def test_asyncua_decoding_exceptions_are_peer_errors_other_exceptions_keep_tracebacks() -> None:
    from asyncua.common.utils import NotEnoughData

    handler = TwistedLogHandler(FakeClock())
    name = "asyncua.server.binary_server_asyncio"

    def emit(exc: BaseException, msg: str) -> None:
        try:
            raise exc
        except BaseException:
            handler.emit(logging.LogRecord(name, logging.ERROR, __file__, 1, msg, (),
                                           sys.exc_info()))

    events = _capture(handler, lambda: (
        emit(NotEnoughData("short"), "Exception raised while processing message from client"),
        emit(KeyError("ours"), "Error while processing message")))
    peer, bug = events
    assert peer["log_level"] == LogLevel.warn and "log_failure" not in peer
    assert bug["log_level"] == LogLevel.error and bug["log_failure"].check(KeyError)
