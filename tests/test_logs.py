from __future__ import annotations

import logging
from typing import Any

from twisted.logger import LogLevel, globalLogPublisher

from iotserver.logs import forward_stdlib_logging


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
