"""The session table: OPC UA sessions of our own, looked up by AuthenticationToken.

Part 4 5.6.2 / 5.7.2: a session is identified by its AuthenticationToken, a secret the client
puts in every RequestHeader; several sessions may share one SecureChannel and each request is
served in the session its token names, and only there. The table

* issues tokens from :mod:`secrets` (32 random bytes, a ByteString NodeId) and random GUID
  SessionIds, so nothing is guessable and nothing repeats after a restart;
* counts sessions in total and per client address against ``max_sessions`` and
  ``max_sessions_per_address`` (refusals are counted and logged);
* ends a session that is not activated within ``session_activation_timeout_s``, and an
  activated one after its revised timeout without a request (Part 4 5.6.2: the client's
  RequestedSessionTimeout, capped by ``max_session_timeout_s``). When a channel is lost its
  sessions without subscriptions end at once: the client has nothing to resume and would fill
  the table (a connect-and-vanish client); sessions with subscriptions wait for their timeout so
  the client can re-activate them on a new channel (Part 4 6.7).

Time comes from an injected clock (``seconds()`` and ``callLater()``: Twisted's ``IReactorTime``
or :class:`LoopClock`), so tests run on ``twisted.internet.task.Clock``.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from asyncua import ua

from iotserver.clock import LoopClock as LoopClock  # re-exported for the service

if TYPE_CHECKING:
    from iotserver.opcua.subscriptions import PendingPublish, Subscription

log = logging.getLogger("iotserver.opcua")

SWEEP_INTERVAL_S = 1.0
MIN_SESSION_TIMEOUT_S = 5.0


class Clock(Protocol):
    def seconds(self) -> float: ...

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any) -> Any: ...


class Channel(Protocol):
    """What the session layer needs from a secure channel (``channel.py``; fakes in tests)."""

    channel_id: int
    address: str  # the client's host (limits, throttle)
    peer: str  # host:port
    is_open: bool

    @property
    def policy_uri(self) -> str: ...

    @property
    def peer_certificate(self) -> bytes | None: ...

    @property
    def policy(self) -> Any: ...  # asyncua's security policy of the channel

    @property
    def sockname(self) -> Any: ...

    def send(self, request_id: int, body: bytes) -> None: ...


@dataclass
class SessionLimits:
    max_sessions: int = 100
    max_per_address: int = 20
    max_timeout_s: float = 600.0
    activation_timeout_s: float = 10.0
    max_publish_requests: int = 20
    max_subscriptions: int = 200
    max_retransmission_queue: int = 64
    max_browse_continuation_points: int = 10


@dataclass
class SessionStats:
    created: int = 0
    activated: int = 0
    closed: int = 0
    timed_out: int = 0
    never_activated: int = 0
    refused_total: int = 0
    refused_per_address: int = 0
    unknown_token: int = 0
    takeover_refused: int = 0
    publish_overflow: int = 0
    retransmission_dropped: int = 0
    republish: int = 0


class Identity:
    """Who a session belongs to: compared on re-activation from another channel (Part 4 5.7.3)."""

    __slots__ = ("key",)

    def __init__(self, user: Any) -> None:
        self.key = (getattr(user, "via", None), getattr(user, "name", None),
                    getattr(user, "access", None))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Identity) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)


@dataclass(eq=False)
class Session:
    """One client session (Part 4 5.6)."""

    session_id: ua.NodeId
    auth_token: ua.NodeId
    name: str
    address: str
    channel: Channel | None
    client_certificate: bytes | None  # None on SecurityPolicy None (Part 4 5.6.2)
    timeout_s: float
    created_at: float
    nonce: bytes = b""
    activated: bool = False
    closed: bool = False
    user: Any = None
    identity: Identity | None = None
    last_activity: float = 0.0
    services: Any = None  # the address space services bound to this session (session.py)
    subscriptions: dict[int, Subscription] = field(default_factory=dict)
    publish_queue: deque[PendingPublish] = field(default_factory=deque)
    # (subscription id, status) StatusChangeNotifications waiting for a Publish request
    pending_status: list[tuple[int, int, int]] = field(default_factory=list)

    def __repr__(self) -> str:
        who = getattr(self.user, "name", None) or "-"
        return f"<Session {self.name!r} {who} from {self.address}>"


def new_auth_token() -> ua.NodeId:
    """An unguessable AuthenticationToken (Part 4 7.2: a secret, random, never reused)."""
    return ua.NodeId(secrets.token_bytes(32), 0, ua.NodeIdType.ByteString)


def new_session_id() -> ua.NodeId:
    return ua.NodeId(uuid.UUID(bytes=secrets.token_bytes(16)), 1, ua.NodeIdType.Guid)


def _token_key(token: ua.NodeId) -> Any:
    return (token.NodeIdType, token.NamespaceIndex, token.Identifier)


class SessionTable:
    """All sessions of the server, by token; limits, timeouts and counts (module docstring)."""

    def __init__(self, clock: Clock, limits: SessionLimits,
                 on_end: Callable[[Session, bool, str], None]) -> None:
        self.clock = clock
        self.limits = limits
        self.stats = SessionStats()
        self._on_end = on_end
        self._by_token: dict[Any, Session] = {}
        self._timer: Any = None

    def __len__(self) -> int:
        return len(self._by_token)

    def __iter__(self) -> Any:
        return iter(list(self._by_token.values()))

    def start(self) -> None:
        if self._timer is None:
            self._timer = self.clock.callLater(SWEEP_INTERVAL_S, self._sweep)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- create / look up / end --------------------------------------------------------------
    def revise_timeout(self, requested_ms: float) -> float:
        """RevisedSessionTimeout in seconds (Part 4 5.6.2)."""
        wanted = requested_ms / 1000.0 if requested_ms == requested_ms else 0.0  # NaN -> 0
        return min(max(wanted, MIN_SESSION_TIMEOUT_S), self.limits.max_timeout_s)

    def create(self, channel: Channel, name: str, requested_timeout_ms: float,
               client_certificate: bytes | None) -> Session:
        """A new, not yet activated session; Bad_TooManySessions past a limit."""
        if len(self._by_token) >= self.limits.max_sessions:
            self.stats.refused_total += 1
            log.warning("OPC UA: session from %s refused: max_sessions (%d) reached",
                        channel.address, self.limits.max_sessions)
            raise ua.UaStatusCodeError(ua.StatusCodes.BadTooManySessions)
        same = sum(1 for s in self._by_token.values() if s.address == channel.address)
        if same >= self.limits.max_per_address:
            self.stats.refused_per_address += 1
            log.warning("OPC UA: session from %s refused: max_sessions_per_address (%d) reached",
                        channel.address, self.limits.max_per_address)
            raise ua.UaStatusCodeError(ua.StatusCodes.BadTooManySessions)
        now = self.clock.seconds()
        session = Session(session_id=new_session_id(), auth_token=new_auth_token(), name=name,
                          address=channel.address, channel=channel,
                          client_certificate=client_certificate,
                          timeout_s=self.revise_timeout(requested_timeout_ms), created_at=now,
                          nonce=secrets.token_bytes(32), last_activity=now)
        self._by_token[_token_key(session.auth_token)] = session
        self.stats.created += 1
        return session

    def get(self, token: ua.NodeId | None) -> Session | None:
        if token is None:
            return None
        session = self._by_token.get(_token_key(token))
        if session is None:
            self.stats.unknown_token += 1
        return session

    def end(self, session: Session, delete_subscriptions: bool, reason: str) -> None:
        """Remove a session (CloseSession, timeout, lost channel); idempotent."""
        if session.closed:
            return
        session.closed = True
        self._by_token.pop(_token_key(session.auth_token), None)
        self.stats.closed += 1
        log.info("OPC UA session %s ended: %s", session, reason)
        self._on_end(session, delete_subscriptions, reason)

    def channel_lost(self, channel: Channel) -> None:
        """The channel's connection is gone: see the module docstring."""
        for session in list(self._by_token.values()):
            if session.channel is not channel:
                continue
            session.channel = None
            session.publish_queue.clear()
            if not session.activated:
                self.stats.never_activated += 1
                self.end(session, True, "connection lost before activation")
            elif not session.subscriptions:
                self.end(session, True, "connection lost")

    # -- timeouts ------------------------------------------------------------------------------
    def _sweep(self) -> None:
        self._timer = self.clock.callLater(SWEEP_INTERVAL_S, self._sweep)
        self.expire(self.clock.seconds())

    def expire(self, now: float) -> None:
        for session in list(self._by_token.values()):
            if not session.activated:
                if now - session.created_at >= self.limits.activation_timeout_s:
                    self.stats.never_activated += 1
                    log.warning("OPC UA: session from %s not activated within %.0f s: closed",
                                session.address, self.limits.activation_timeout_s)
                    self.end(session, True, "never activated")
                continue
            if session.channel is not None and session.channel.is_open \
                    and session.publish_queue:
                session.last_activity = now  # a client waiting on Publish is alive
            if now - session.last_activity >= session.timeout_s:
                self.stats.timed_out += 1
                log.warning("OPC UA: session %s timed out after %.0f s without a request",
                            session, session.timeout_s)
                self.end(session, True, "session timeout")
