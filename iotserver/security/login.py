"""One login path for every protocol: password checks off the event loop, one throttle, one
certificate-to-user rule, one "may write" rule, and an audit line for every attempt.

MQTT (:mod:`iotserver.mqtt.auth`), OPC UA (:class:`iotserver.opcua.security.IotUserManager`)
and the SSH console (:mod:`iotserver.console.service`) all log users in through one
:class:`Logins` per server (``core.logins``):

* **Passwords** are verified with scrypt (:mod:`iotserver.security.users`) in the reactor's
  thread pool (``UserDB.verify_deferred``; hashlib releases the GIL while it hashes), never on
  the event loop. At most ``max_concurrent`` checks run at once and at most ``max_queued`` wait;
  beyond that a login is refused as "busy" at once, so a flood cannot exhaust the pool.
* **One throttle** (:class:`Throttle`) with exponential backoff, keyed by (address, user) and by
  address alone: after ``free_failures`` failed logins of one user from one address, that user
  is refused *from that address* without hashing for 1, 2, 4 ... s (at most ``max_delay``);
  after ``free_failures_per_address`` failures from one address over all names (a spray of
  names), that address is refused the same way. Nothing is ever keyed by the user name alone,
  so nobody can lock a named user out from another address. A success clears its (address,
  user) record; idle records are forgotten after ``forget_after`` s. SSH key logins count
  against the same records (a key that is offered and refused is only logged: SSH clients
  offer every key they hold).
* **Certificates** map to users by one rule (:func:`certificate_identities`): the subject CN,
  then every SubjectAltName DNS name, e-mail address and URI, in that order; the first of these
  that a user lists in ``certificates = [...]`` picks the user. MQTT (TLS client certificate)
  and OPC UA (X509 user token) use it alike.
* **May write** (:func:`may_write`): engineers and admins may write, operators may not; every
  protocol asks this one function.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from iotserver.clock import Clock
from iotserver.ratelog import RateLimitedLog
from iotserver.security.users import Role, User, UserDB

log = Logger(namespace="iotserver.login")


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class LoginConfig:
    """``[login]``: the throttle and the verification pool, shared by every protocol."""

    free_failures: int = 5  # per (address, user) before the backoff starts
    free_failures_per_address: int = 50  # per address over all user names
    base_delay: float = 1.0  # s refused after the first failure beyond the free ones
    max_delay: float = 60.0
    forget_after: float = 600.0  # an idle failure record is dropped after this long
    max_records: int = 10_000  # failure records kept (oldest dropped first)
    # scrypt checks running at once (threads): each takes a core for tens of ms, and on a
    # 2-core machine a second one measurably slows the event loop (bench_login_flood.py)
    max_concurrent: int = 1
    max_queued: int = 64  # checks waiting; beyond: refused as busy

    def summary(self) -> list[str]:
        return [f"login throttle: {self.free_failures} free failures per address and user, "
                f"{self.free_failures_per_address} per address, then {self.base_delay:g} s "
                f"doubling up to {self.max_delay:g} s; {self.max_concurrent} password checks "
                f"at once, {self.max_queued} queued"]


def parse(r: Any) -> LoginConfig:
    """Read ``[login]`` (a :class:`iotserver.confparse.Reader`)."""
    cfg = LoginConfig(
        free_failures=r.int("free_failures", 5, min=0, max=1000),
        free_failures_per_address=r.int("free_failures_per_address", 50, min=0, max=100_000),
        base_delay=r.float("base_delay", 1.0, positive=True, max=3600),
        max_delay=r.float("max_delay", 60.0, positive=True, max=86400),
        forget_after=r.float("forget_after", 600.0, positive=True, max=7 * 86400),
        max_records=r.int("max_records", 10_000, min=100, max=10_000_000),
        max_concurrent=r.int("max_concurrent", 1, min=1, max=64),
        max_queued=r.int("max_queued", 64, min=0, max=100_000),
    )
    if cfg.max_delay < cfg.base_delay:
        raise r.error("max_delay", f"expected max_delay >= base_delay ({cfg.base_delay:g})")
    r.done()
    return cfg


# ----------------------------------------------------------------------------- rules


def may_write(role: Role | str | None) -> bool:
    """The one "may write" decision: engineers and admins write, operators (and unknown or
    anonymous users) only read."""
    if role is None:
        return False
    if not isinstance(role, Role):
        try:
            role = Role(role)
        except ValueError:
            return False
    return role.can_write


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def certificate_identities(cert: x509.Certificate) -> tuple[str, ...]:
    """The names a certificate may log in as, in the order they are tried (module docstring)."""
    out = [_text(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        for kind in (x509.DNSName, x509.RFC822Name, x509.UniformResourceIdentifier):
            out += [str(v) for v in san.get_values_for_type(kind)]
    return tuple(dict.fromkeys(v for v in out if v))


def user_for_identities(users: UserDB, identities: Sequence[str] | str) -> User | None:
    """The first user that lists one of ``identities`` (a certificate's, in rule order)."""
    if isinstance(identities, str):
        identities = (identities,)
    for identity in identities:
        user = users.user_for_certificate(identity)
        if user is not None:
            return user
    return None


# ----------------------------------------------------------------------------- throttle


class _Record:
    __slots__ = ("blocked_until", "count", "last")

    def __init__(self) -> None:
        self.count = 0
        self.blocked_until = 0.0
        self.last = 0.0


Key = tuple[str, str | None]  # (address, user name) or (address, None) for the whole address


class Throttle:
    """Exponential backoff after failed logins, per (address, user) and per address."""

    def __init__(self, clock: Clock, cfg: LoginConfig | None = None) -> None:
        self.clock = clock
        self.cfg = cfg or LoginConfig()
        self.records: dict[Key, _Record] = {}  # insertion (= last use) order: oldest first

    def _keys(self, address: str, user: str) -> tuple[tuple[Key, int], tuple[Key, int]]:
        c = self.cfg
        return ((address, user), c.free_failures), ((address, None), c.free_failures_per_address)

    def delay(self, address: str | None, user: str) -> float:
        """Seconds until ``user`` may try again from ``address``; 0.0 when it may try now."""
        now = self.clock.seconds()
        wait = 0.0
        for key, _ in self._keys(address or "", user):
            record = self.records.get(key)
            if record is not None:
                wait = max(wait, record.blocked_until - now)
        return wait

    def failed(self, address: str | None, user: str) -> int:
        """Count a failure; returns the failures of ``user`` from ``address`` so far."""
        now = self.clock.seconds()
        self._expire(now)
        c = self.cfg
        counts = []
        for key, free in self._keys(address or "", user):
            record = self.records.pop(key, None)  # re-inserted last: the dict stays LRU-ordered
            if record is None:
                record = _Record()
                while len(self.records) >= c.max_records:
                    del self.records[next(iter(self.records))]
            self.records[key] = record
            record.count += 1
            record.last = now
            over = record.count - free
            if over > 0:
                backoff = min(c.base_delay * 2 ** min(over - 1, 60), c.max_delay)
                record.blocked_until = max(record.blocked_until, now + backoff)
            counts.append(record.count)
        return counts[0]

    def succeeded(self, address: str | None, user: str) -> None:
        # the address-wide record stays until it ages: a success must not reset a spray
        self.records.pop((address or "", user), None)

    def _expire(self, now: float) -> None:
        forget = self.cfg.forget_after
        while self.records:
            key, first = next(iter(self.records.items()))
            if now - first.last < forget or now < first.blocked_until:
                break
            del self.records[key]


# ----------------------------------------------------------------------------- logins


class Outcome(enum.Enum):
    OK = "ok"
    FAILED = "failed"  # wrong password, unknown user, bad key signature
    THROTTLED = "throttled"  # refused without checking (backoff)
    BUSY = "busy"  # too many checks waiting
    DENIED = "denied"  # credentials fine, but not allowed here (role, unmapped certificate)
    ERROR = "error"  # the check itself crashed


@dataclass(frozen=True, slots=True)
class LoginResult:
    outcome: Outcome
    user: User | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


class LoginAudit(Protocol):
    """Where login attempts are recorded besides the log (:class:`iotserver.security.audit`)."""

    def login(self, protocol: str, peer: str, user: str | None, method: str, outcome: str,
              detail: str = "") -> None: ...


class Logins:
    """The server's one login path (module docstring). ``users`` is called at each login, so
    a reloaded or replaced user file is seen at once."""

    def __init__(self, users: Callable[[], UserDB], clock: Clock, cfg: LoginConfig | None = None,
                 *, audit: LoginAudit | None = None) -> None:
        self.users = users
        self.clock = clock
        self.cfg = cfg or LoginConfig()
        self.audit = audit
        self.throttle = Throttle(clock, self.cfg)
        self._sem = DeferredSemaphore(self.cfg.max_concurrent)
        self.ratelog = RateLimitedLog(clock, logger=log)
        self.stats: Counter[str] = Counter()

    # -- passwords --------------------------------------------------------------------------
    def check_password(self, protocol: str, peer: str | None, name: str,
                       password: str | bytes, *,
                       allow: Callable[[User], str] | None = None) -> Deferred[LoginResult]:
        """Verify a password off the event loop; the Deferred never errbacks.

        ``peer`` is the client's address (host, no port): the throttle's key. ``allow``, given
        the verified user, returns why that user may not log in here ("" when it may): the
        login is then DENIED (not a failure: the password was right).
        """
        address = peer or ""
        if self.throttle.delay(address, name) > 0:
            return succeed(self.record(protocol, address, name, "password", Outcome.THROTTLED))
        if isinstance(password, bytes):
            try:
                password = password.decode("utf-8")
            except UnicodeDecodeError:
                return succeed(self.record(protocol, address, name, "password", Outcome.FAILED,
                                           "password is not UTF-8"))
        if len(self._sem.waiting) >= self.cfg.max_queued:
            return succeed(self.record(protocol, address, name, "password", Outcome.BUSY))
        text = password

        def verify(_: object) -> Deferred[Any]:
            d: Deferred[Any] = self.users().verify_deferred(name, text)
            return d

        d: Deferred[Any] = self._sem.run(verify, None)

        def checked(user: User | None) -> LoginResult:
            if user is None:
                return self.record(protocol, address, name, "password", Outcome.FAILED)
            why = allow(user) if allow is not None else ""
            if why:
                self.throttle.succeeded(address, name)
                return self.record(protocol, address, name, "password", Outcome.DENIED, why)
            return self.record(protocol, address, name, "password", Outcome.OK, user=user)

        def crashed(failure: Failure) -> LoginResult:
            log.failure("password check for {user!r} failed", failure, user=name)
            return self.record(protocol, address, name, "password", Outcome.ERROR)

        d.addCallbacks(checked, crashed)
        return d

    async def check_password_async(self, protocol: str, peer: str | None, name: str,
                                   password: str | bytes) -> LoginResult:
        """:meth:`check_password` for asyncio code (the OPC UA server): awaits the Deferred
        as an asyncio future, so the loop keeps running while the thread hashes."""
        d = self.check_password(protocol, peer, name, password)
        done: list[LoginResult | Failure] = []

        def keep(result: LoginResult | Failure) -> LoginResult | Failure:
            done.append(result)
            return result

        d.addBoth(keep)
        if done:  # answered at once (throttled, busy, a synchronous user file): no loop turn
            d.addErrback(lambda _: None)  # the failure, if any, is raised here
            if isinstance(done[0], Failure):
                done[0].raiseException()
            result: LoginResult = done[0]
            return result
        return await d.asFuture(asyncio.get_running_loop())

    # -- keys and certificates --------------------------------------------------------------
    def throttled(self, protocol: str, peer: str | None, name: str, method: str) -> bool:
        """True (and recorded) when ``name`` may not try from ``peer`` now, whatever the
        credential (SSH keys, which are checked without a password)."""
        if self.throttle.delay(peer or "", name) > 0:
            self.record(protocol, peer or "", name, method, Outcome.THROTTLED)
            return True
        return False

    def certificate_user(self, cert: x509.Certificate | Sequence[str] | str) -> User | None:
        """The user a verified certificate logs in as (the one rule, module docstring)."""
        identities = cert if isinstance(cert, (str, Sequence)) else certificate_identities(cert)
        return user_for_identities(self.users(), identities)

    # -- recording ----------------------------------------------------------------------------
    def record(self, protocol: str, peer: str | None, name: str | None, method: str,
               outcome: Outcome, detail: str = "", *, user: User | None = None) -> LoginResult:
        """Count, throttle, log and audit one login attempt; returns its result."""
        address = peer or ""
        self.stats[outcome.value] += 1
        if outcome is Outcome.FAILED and name is not None:
            n = self.throttle.failed(address, name)
            self.ratelog.warn(f"failed:{protocol}", "{protocol}: login failed for {user!r} from "
                              "{peer} ({method}{detail}; failure {n} from there)",
                              protocol=protocol, user=name, peer=address or "?", method=method,
                              detail=f", {detail}" if detail else "", n=n)
        elif outcome is Outcome.OK:
            if name is not None:
                self.throttle.succeeded(address, name)
            log.info("{protocol}: {user} logged in from {peer} ({method}{detail})",
                     protocol=protocol, user=repr(name) if name else "anonymous",
                     peer=address or "?", method=method, detail=f", {detail}" if detail else "")
        else:
            self.ratelog.warn(f"{outcome.value}:{protocol}", "{protocol}: login {outcome} for "
                              "{user!r} from {peer} ({method}{detail})", protocol=protocol,
                              outcome="refused without checking (too many failures)"
                              if outcome is Outcome.THROTTLED else outcome.value,
                              user=name, peer=address or "?", method=method,
                              detail=f", {detail}" if detail else "")
        if self.audit is not None:
            self.audit.login(protocol, address, name, method, outcome.value, detail)
        return LoginResult(outcome, user if outcome is Outcome.OK else None)


def logins_of(core: Any) -> Logins:
    """``core.logins``, created on first use for a core without one (tests, tools)."""
    logins = getattr(core, "logins", None)
    if logins is None:
        clock = getattr(core, "clock", None)
        if clock is None or not hasattr(clock, "seconds"):
            from twisted.internet import reactor

            clock = reactor
        logins = Logins(lambda: core.users, clock, audit=getattr(core, "audit", None))
        with contextlib.suppress(AttributeError):  # a core that takes no attributes
            core.logins = logins
    return logins
