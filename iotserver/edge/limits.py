"""Per-listener connection limits and timeouts, their configuration keys and their counters.

Every listener (each MQTT ``[[mqtt.listeners]]`` entry, each endpoint of ``[modbus.server]``,
the console) has its own :class:`Limits`: a full plain Modbus port never keeps a Modbus/TCP
Security client out, and the other way round. The keys are the same in every section::

    max_connections = 64            # open connections on this listener
    max_connections_per_peer = 32   # of them from one peer address
    handshake_timeout = 10.0        # s for the TLS handshake (tls:/ssl: listeners)
    login_timeout = 10.0            # s until the first complete frame / the login
    frame_timeout = 10.0            # s a frame once begun may take to complete (trickling)
    idle_timeout = 300.0            # s without a byte received (0 = never)

Each protocol supplies its defaults (:data:`MODBUS`, :data:`MQTT`, :data:`CONSOLE`); 0 turns a
timeout off. docs/security.md lists them all.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = ["CONSOLE", "EVENTS", "MODBUS", "MQTT", "EdgeStats", "Limits", "read_limits"]


@dataclass(frozen=True)
class Limits:
    """What one listener allows (see module docstring); timeouts in seconds, 0 = off."""

    max_connections: int = 64
    max_connections_per_peer: int = 32
    handshake_timeout: float = 10.0
    login_timeout: float = 10.0
    frame_timeout: float = 10.0
    idle_timeout: float = 300.0


#: Modbus frames are at most 260 bytes: a frame that takes 10 s is not a slow link.
MODBUS = Limits(max_connections=64, max_connections_per_peer=32, login_timeout=10.0,
                frame_timeout=10.0, idle_timeout=300.0)
#: MQTT: after CONNECT the keepalive rules (MQTT-3.1.2-24), so no idle timeout by default;
#: a large PUBLISH over a slow link may take a while.
MQTT = Limits(max_connections=1000, max_connections_per_peer=200, login_timeout=10.0,
              frame_timeout=60.0, idle_timeout=0.0)
#: SSH console: OpenSSH's LoginGraceTime idea, shorter; an admin's open prompt may sit idle.
CONSOLE = Limits(max_connections=8, max_connections_per_peer=4, login_timeout=30.0,
                 frame_timeout=30.0, idle_timeout=0.0)

_MAX_TIMEOUT = 7 * 86400.0


def read_limits(r: Any, defaults: Limits) -> Limits:
    """The limit keys of one config table (a ``confparse.Reader``), on top of ``defaults``.

    Errors name the key, the line and the range expected (``Reader``'s messages).
    """
    values: dict[str, Any] = {}
    for f in fields(Limits):
        default = getattr(defaults, f.name)
        if f.name.startswith("max_"):
            values[f.name] = r.int(f.name, default, min=1, max=1_000_000)
        else:
            values[f.name] = r.float(f.name, default, min=0.0, max=_MAX_TIMEOUT)
    limits = replace(defaults, **values)
    if limits.max_connections_per_peer > limits.max_connections:
        limits = replace(limits, max_connections_per_peer=limits.max_connections)
    return limits


#: Counter names, one per event that a limit or timeout caused.
EVENTS = ("refused_listener_full", "refused_peer_full", "handshake_timeouts",
          "login_timeouts", "frame_timeouts", "idle_timeouts")


class EdgeStats:
    """Counters of one listener (plain integers: cheap to bump, easy to publish)."""

    __slots__ = ("accepted", "open", "open_maximum", *EVENTS)

    def __init__(self) -> None:
        self.accepted = 0
        self.open = 0
        self.open_maximum = 0
        self.refused_listener_full = 0
        self.refused_peer_full = 0
        self.handshake_timeouts = 0
        self.login_timeouts = 0
        self.frame_timeouts = 0
        self.idle_timeouts = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    @staticmethod
    def total(stats: list[EdgeStats]) -> dict[str, int]:
        """Sum over listeners (``open_maximum`` is summed too: an upper bound)."""
        out = dict.fromkeys(EdgeStats.__slots__, 0)
        for s in stats:
            for name in EdgeStats.__slots__:
                out[name] += getattr(s, name)
        return out
