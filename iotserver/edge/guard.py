"""The door of every listener: connection limits and timeouts around a protocol factory.

:class:`GuardedFactory` wraps one listener's factory. It refuses a connection before any
protocol exists when the listener or the peer address has used up its slots, and puts a
:class:`Guard` between the transport and each protocol it builds::

    tcp.Server -> [TLSMemoryBIOProtocol ->] Guard -> protocol (MQTT, Modbus, SSH)

The guard hands the protocol the real transport (so the protocol's own fast paths and its
``registerProducer`` talk to the socket or the TLS layer directly); it only sees what the
transport delivers (``dataReceived``, ``handshakeCompleted``, ``connectionLost``) and runs the
timers:

- TLS handshake: ``handshake_timeout`` from the TCP connect until ``handshakeCompleted`` (a
  socket that never sends ClientHello);
- login: ``login_timeout`` from the connect until the protocol says it is greeted (MQTT: the
  session is open; Modbus: a first complete request; SSH: a user authenticated);
- frame: ``frame_timeout`` from the moment a frame is begun (the protocol holds bytes of an
  unfinished frame) until it is complete, so a peer trickling one byte every few seconds is
  closed however often it sends;
- idle: ``idle_timeout`` without a byte received.

The protocol is asked through a :class:`Probe`; ``partial`` is checked after each delivery.
TLS records: the guard sees decrypted data only, so a TLS peer that trickles a record is held
by the idle and login timeouts rather than the frame timeout.

A slot is freed the moment the connection is lost or the guard closes it. Twisted accepts up
to 100 connections in one go before it reads the end-of-file of connections their peers
already closed; so when a listener looks full, the guard first asks the kernel about each open
socket (a non-blocking ``MSG_PEEK``) and frees those whose peer has gone. A short-lived
connection churn is then never refused below the limit.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from iotserver.clock import Clock
from iotserver.edge.limits import EdgeStats, Limits

__all__ = ["DEFAULT_PROBE", "Guard", "GuardedFactory", "Probe", "RateLimitedLog"]

log = Logger(namespace="iotserver.edge")


def _never(proto: Any) -> bool:
    return False


@dataclass(frozen=True)
class Probe:
    """How the guard reads a protocol's progress.

    ``partial(p)``: bytes of an unfinished frame are buffered. ``greeted(p)``: the login or
    first frame is done; None means "a delivery left no partial frame behind", i.e. a first
    complete frame was received.
    """

    partial: Callable[[Any], bool] = _never
    greeted: Callable[[Any], bool] | None = None


DEFAULT_PROBE = Probe()


class RateLimitedLog:
    """``warn(key, fmt, **kw)``: at most one line per ``interval`` s and key, with the count of
    the lines left out meanwhile (a connection storm must not fill the log)."""

    def __init__(self, clock: Clock, interval: float = 10.0, logger: Logger = log) -> None:
        self.clock = clock
        self.interval = interval
        self.log = logger
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, key: str, fmt: str, **kw: Any) -> None:
        now = self.clock.seconds()
        if now < self._next.get(key, 0.0):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._next[key] = now + self.interval
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            fmt += " ({suppressed} similar events not logged)"
            kw["suppressed"] = suppressed
        self.log.warn(fmt, **kw)


def _peer_host(addr: Any) -> str | None:
    host = getattr(addr, "host", None)
    return host if isinstance(host, str) else None


class GuardedFactory(Factory):
    """One listener's limits around its protocol factory (see module docstring).

    ``tls_context``: serve TLS with this context factory (the TLS layer is put outside the
    guard, so the handshake is timed and a refused connection costs no handshake).
    """

    noisy = False

    def __init__(self, name: str, wrapped: Any, limits: Limits, clock: Clock, *,
                 probe: Probe = DEFAULT_PROBE, tls_context: Any = None,
                 ratelog: RateLimitedLog | None = None) -> None:
        self.name = name
        self.wrapped = wrapped
        self.limits = limits
        self.clock = clock
        self.probe = probe
        self.stats = EdgeStats()
        self.ratelog = ratelog or RateLimitedLog(clock)
        self.guards: set[Guard] = set()  # holding a slot
        self.live: set[Guard] = set()  # connected (a closed guard stays until its loss)
        self._per_peer: dict[str, int] = {}
        self._tls: Any = None
        if tls_context is not None:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            self._tls = TLSMemoryBIOFactory(tls_context, False, cast(Any, self))

    def __repr__(self) -> str:
        return f"<GuardedFactory {self.name}>"

    def logPrefix(self) -> str:
        return self.name

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    # -- admission ---------------------------------------------------------------------------
    def buildProtocol(self, addr: Any) -> Any:
        limits, stats = self.limits, self.stats
        host = _peer_host(addr)
        if stats.open >= limits.max_connections:
            self.sweep()
            if stats.open >= limits.max_connections:
                stats.refused_listener_full += 1
                self.ratelog.warn(f"full:{self.name}", "{name}: max_connections ({n}) reached, "
                                  "refusing {peer}", name=self.name, n=limits.max_connections,
                                  peer=host)
                return None
        if host is not None and self._per_peer.get(host, 0) >= limits.max_connections_per_peer:
            self.sweep()
            if self._per_peer.get(host, 0) >= limits.max_connections_per_peer:
                stats.refused_peer_full += 1
                self.ratelog.warn(f"peer:{self.name}", "{name}: {peer} has "
                                  "max_connections_per_peer ({n}) open, refusing another",
                                  name=self.name, peer=host, n=limits.max_connections_per_peer)
                return None
        inner = self.wrapped.buildProtocol(addr)
        if inner is None:
            return None
        guard = Guard(self, inner, host)
        self.guards.add(guard)
        self.live.add(guard)
        stats.open += 1
        stats.accepted += 1
        stats.open_maximum = max(stats.open_maximum, stats.open)
        if host is not None:
            self._per_peer[host] = self._per_peer.get(host, 0) + 1
        if self._tls is not None:
            return self._tls.protocol(self._tls, guard)
        return guard

    def release(self, guard: Guard) -> None:
        """Free the guard's slot (idempotent)."""
        if guard not in self.guards:
            return
        self.guards.discard(guard)
        self.stats.open -= 1
        host = guard.host
        if host is not None:
            left = self._per_peer.get(host, 1) - 1
            if left > 0:
                self._per_peer[host] = left
            else:
                self._per_peer.pop(host, None)

    def sweep(self) -> int:
        """Free the slots of connections whose peer has closed already; how many were freed."""
        freed = 0
        for guard in list(self.guards):
            if guard.peer_gone():
                freed += 1
                guard.close()
        return freed


@implementer(IHandshakeListener)
class Guard(Protocol):
    """Between one transport and one protocol: limits' timers (see module docstring)."""

    def __init__(self, factory: GuardedFactory, inner: Any, host: str | None) -> None:
        self.gfactory = factory
        self.inner = inner
        self.host = host
        self.greeted = False
        self._last_rx = 0.0
        self._handshake: Any = None
        self._login: Any = None
        self._frame: Any = None
        self._idle: Any = None
        self._closed = False

    def logPrefix(self) -> str:
        prefix = getattr(self.inner, "logPrefix", None)
        return prefix() if callable(prefix) else self.gfactory.name

    def __repr__(self) -> str:
        return f"<Guard {self.gfactory.name} {self.host} {self.inner!r}>"

    # -- from the transport --------------------------------------------------------------------
    def connectionMade(self) -> None:
        limits, clock = self.gfactory.limits, self.gfactory.clock
        self._last_rx = clock.seconds()
        if self.gfactory._tls is not None and limits.handshake_timeout:
            self._handshake = clock.callLater(limits.handshake_timeout, self._timed_out,
                                              "handshake")
        if limits.login_timeout:
            self._login = clock.callLater(limits.login_timeout, self._timed_out, "login")
        if limits.idle_timeout:
            self._idle = clock.callLater(limits.idle_timeout, self._idle_check)
        self.inner.makeConnection(self.transport)

    def handshakeCompleted(self) -> None:
        self._cancel("_handshake")
        if IHandshakeListener.providedBy(self.inner):
            self.inner.handshakeCompleted()

    def dataReceived(self, data: bytes) -> None:
        if self._idle is not None:
            self._last_rx = self.gfactory.clock.seconds()
        self.inner.dataReceived(data)
        if self._closed:
            return
        probe = self.gfactory.probe
        partial = probe.partial(self.inner)
        if partial:
            if self._frame is None and self.gfactory.limits.frame_timeout:
                self._frame = self.gfactory.clock.callLater(self.gfactory.limits.frame_timeout,
                                                            self._timed_out, "frame")
        elif self._frame is not None:
            self._cancel("_frame")
        if not self.greeted and (probe.greeted(self.inner) if probe.greeted is not None
                                 else not partial):
            self._greet()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self._stop_timers()
        self.gfactory.release(self)
        self.gfactory.live.discard(self)
        self.inner.connectionLost(reason)

    # -- timers ----------------------------------------------------------------------------
    def _greet(self) -> None:
        self.greeted = True
        self._cancel("_login")

    def _cancel(self, name: str) -> None:
        call = getattr(self, name)
        if call is not None:
            if call.active():
                call.cancel()
            setattr(self, name, None)

    def _stop_timers(self) -> None:
        for name in ("_handshake", "_login", "_frame", "_idle"):
            self._cancel(name)

    def _idle_check(self) -> None:
        self._idle = None
        limits, clock = self.gfactory.limits, self.gfactory.clock
        quiet = clock.seconds() - self._last_rx
        if quiet < limits.idle_timeout:
            self._idle = clock.callLater(limits.idle_timeout - quiet, self._idle_check)
            return
        if not self._reading():  # we stopped reading it (flow control): not its silence
            self._idle = clock.callLater(limits.idle_timeout, self._idle_check)
            return
        self._timed_out("idle")

    def _reading(self) -> bool:
        """False while the protocol has paused reading from the socket (flow control: a
        Modbus write waiting for a PLC, MQTT's Receive Maximum), when an unfinished frame or
        a silence is our doing, not the peer's."""
        tcp = _tcp_of(self.transport)
        get_readers = getattr(getattr(tcp, "reactor", None), "getReaders", None)
        if tcp is None or get_readers is None:
            return True
        return tcp in get_readers()

    def _timed_out(self, what: str) -> None:
        setattr(self, f"_{what}", None)
        if self._closed:
            return
        if what == "frame" and not self._reading():
            # the rest of the frame is waiting in the socket because we paused it: the frame
            # gets a fresh period once we read again
            self._frame = self.gfactory.clock.callLater(self.gfactory.limits.frame_timeout,
                                                        self._timed_out, "frame")
            return
        if what == "login" and self.gfactory.probe.greeted is not None \
                and self.gfactory.probe.greeted(self.inner):
            self.greeted = True  # greeted while no data came (an asynchronous login)
            return
        f = self.gfactory
        setattr(f.stats, f"{what}_timeouts", getattr(f.stats, f"{what}_timeouts") + 1)
        seconds = getattr(f.limits, f"{what}_timeout")
        reason = {"handshake": "did not complete the TLS handshake",
                  "login": "did not complete its first frame or login",
                  "frame": "did not complete a frame it began",
                  "idle": "sent nothing"}[what]
        f.ratelog.warn(f"{what}:{f.name}", "{name}: {peer} {reason} within {t} s "
                       "({what}_timeout), closing", name=f.name, peer=self.host or "?",
                       reason=reason, t=seconds, what=what)
        self.close()

    # -- closing ---------------------------------------------------------------------------
    def close(self) -> None:
        """Abort the connection now and free its slot at once."""
        if self._closed:
            return
        self._closed = True
        self._stop_timers()
        self.gfactory.release(self)
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def peer_gone(self) -> bool:
        """The peer has closed or reset the socket (its end-of-file is not processed yet)."""
        sock = _socket_of(self.transport)
        if sock is None:
            return False
        try:
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return not data


def _tcp_of(transport: Any) -> Any:
    """The TCP transport under a transport (through a TLS layer), if there is one."""
    for _ in range(3):
        if isinstance(getattr(transport, "socket", None), socket.socket):
            return transport
        transport = getattr(transport, "transport", None)
        if transport is None:
            return None
    return None


def _socket_of(transport: Any) -> socket.socket | None:
    """The TCP socket under a transport (through a TLS layer), if there is one."""
    tcp = _tcp_of(transport)
    return tcp.socket if tcp is not None else None
