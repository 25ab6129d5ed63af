"""twistd glue: command-line options and ``makeService``.

Imported only when twistd runs the ``iotserver`` plugin, after it has installed the reactor the
user asked for; we insist on the asyncio reactor because asyncua and pymodbus run on it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application.service import MultiService
from twisted.python import usage

USAGE_REACTOR = (
    "iotserver needs the asyncio reactor: run 'twistd -n --reactor=asyncio iotserver "
    "[--config FILE]' (or 'iotserver run [--config FILE]')"
)


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run the iotserver industrial IoT server (MQTT, Modbus TCP, OPC UA, tag store). "
        "Without --config the built-in default runs: a simulated plant on loopback listeners."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: the built-in simulated plant)"],
    ]


def _check_reactor() -> Any:
    from twisted.internet import reactor
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    if not isinstance(reactor, AsyncioSelectorReactor):
        sys.stderr.write(USAGE_REACTOR + "\n")
        raise SystemExit(2)
    return reactor


def makeService(options: Options) -> MultiService:
    reactor = _check_reactor()
    from iotserver import app, config
    from iotserver.confparse import ConfigError
    from iotserver.logs import forward_stdlib_logging

    try:
        cfg = config.load(options["config"])
    except ConfigError as exc:
        sys.stderr.write(f"iotserver: configuration error: {exc}\n")
        raise SystemExit(1) from None
    forward_stdlib_logging()
    root, core = app.build(cfg, reactor, stop_reactor=lambda: _fail(reactor))
    root.shutdown_timeout = cfg.server.shutdown_timeout
    _log_summary(cfg)  # buffered by twisted.logger until twistd starts its log observer
    reactor.callWhenRunning(_install_sighup, reactor, core)
    return root


def _install_sighup(reactor: Any, core: Any) -> None:
    """SIGHUP re-reads users and ACLs without dropping connections that are still allowed."""
    import signal

    from iotserver.compat_twisted import event_loop

    loop = event_loop(reactor)
    if loop is not None and hasattr(signal, "SIGHUP"):
        loop.add_signal_handler(signal.SIGHUP, core.reload)


def _log_summary(cfg: Any) -> None:
    from twisted.logger import Logger

    from iotserver.app import summary_lines

    log = Logger(namespace="iotserver")
    for line in summary_lines(cfg):
        log.info("{line}", line=line)
    if cfg.source == "<default>":
        log.warn(
            "running the built-in default configuration (simulated plant, loopback only); "
            "pass --config FILE for a real installation"
        )


_failed = False


def _fail(reactor: Any) -> None:
    """Stop after a start failure and exit non-zero once the reactor has shut down."""
    global _failed
    if _failed:
        return
    _failed = True

    def _exit() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    reactor.addSystemEventTrigger("after", "shutdown", _exit)
    if reactor.running:
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)
