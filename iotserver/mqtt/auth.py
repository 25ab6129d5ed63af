"""MQTT client authentication: TLS client certificates, passwords from the user file, anonymous.

Order (first that applies decides):

1. A v5 CONNECT naming an authentication method (enhanced authentication) is refused with
   0x8C Bad authentication method: we implement none.
2. A TLS client certificate whose identity (CN or SAN, verified by the TLS layer) is mapped to a
   user in the user file logs in as that user; username and password are then ignored
   (``certificate_login = false`` turns this off).
3. A username with a password is checked against the user file (scrypt, in a thread so the
   event loop never blocks). Wrong password, unknown user, or a username without password:
   0x86 Bad user name or password.
4. No credentials at all: anonymous (user None) when ``allow_anonymous`` is configured (or the
   listener overrides it), else 0x87 Not authorized.

Failed password logins back off: after ``free_failures`` failures of one user name from one
client address (or of the user name alone when the address is not known), and after
``free_failures_per_peer`` failures from one address over all names, further attempts are refused
at once, without hashing, for a delay that doubles with each failure (capped at ``max_delay``).
A success clears the (address, user) record; records are forgotten after ``forget_after`` idle
seconds. Other users behind the same address (loopback, NAT) keep logging in meanwhile. At most
``max_concurrent`` scrypt checks run at once and at most ``max_queued`` wait, so a flood of
CONNECTs cannot exhaust the thread pool (beyond that: 0x89 Server busy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from iotserver.mqtt.packets import ReasonCode

log = Logger(namespace="iotserver.mqtt.auth")


@dataclass(frozen=True, slots=True)
class AuthResult:
    """Outcome of a login: ``user`` is None for an anonymous login or a refusal."""

    ok: bool
    user: str | None
    reason: ReasonCode = ReasonCode.SUCCESS
    method: str = ""  # "certificate", "password", "anonymous" or "" when refused


_BAD_LOGIN = AuthResult(False, None, ReasonCode.BAD_USER_NAME_OR_PASSWORD)
_NOT_AUTHORIZED = AuthResult(False, None, ReasonCode.NOT_AUTHORIZED)
_BAD_METHOD = AuthResult(False, None, ReasonCode.BAD_AUTHENTICATION_METHOD)
_BUSY = AuthResult(False, None, ReasonCode.SERVER_BUSY)
_ANONYMOUS = AuthResult(True, None, ReasonCode.SUCCESS, "anonymous")


class _Failures:
    __slots__ = ("blocked_until", "count", "last")

    def __init__(self) -> None:
        self.count = 0
        self.blocked_until = 0.0
        self.last = 0.0


def _setting(cfg: Any, name: str, default: Any) -> Any:
    """``cfg.auth.<name>``, else ``cfg.<name>``, else the default (the config grows over time)."""
    auth = getattr(cfg, "auth", None)
    for owner in (auth, cfg):
        value = getattr(owner, name, None) if owner is not None else None
        if value is not None:
            return value
    return default


class Authenticator:
    """Checks CONNECT credentials; one instance per broker, shared by every listener."""

    free_failures = 5  # failed logins per (address, user) before the backoff starts
    free_failures_per_peer = 50  # per address over all user names (password spraying)
    base_delay = 1.0  # seconds refused after the first failure beyond the free ones
    max_delay = 60.0
    forget_after = 600.0  # an idle failure record is dropped after this long
    max_records = 10_000

    def __init__(self, core: Any, cfg: Any) -> None:
        self.core = core
        self.clock = core.clock
        self.allow_anonymous = bool(_setting(cfg, "allow_anonymous", False))
        self.certificate_login = bool(_setting(cfg, "certificate_login", True))
        self.max_concurrent = int(_setting(cfg, "max_concurrent_logins", 4))
        self.max_queued = int(_setting(cfg, "max_queued_logins", 64))
        self._sem = DeferredSemaphore(self.max_concurrent)
        self._failures: dict[str, _Failures] = {}
        self.stats = {"ok": 0, "failed": 0, "throttled": 0, "busy": 0}

    # -- API ------------------------------------------------------------------------------
    def authenticate(
        self,
        client_id: str,
        username: str | None,
        password: bytes | None,
        cert_identity: str | None,
        *,
        peer: str | None = None,
        auth_method: str | None = None,
        allow_anonymous: bool | None = None,
    ) -> Deferred[AuthResult]:
        """Decide a CONNECT; the Deferred never errbacks.

        ``peer`` is the client's address (host) for the backoff; ``auth_method`` the v5
        Authentication Method property, if any; ``allow_anonymous`` the listener's override of
        the configured setting.
        """
        if auth_method is not None:
            return self._done(_BAD_METHOD, client_id, username, peer)
        anonymous_ok = self.allow_anonymous if allow_anonymous is None else allow_anonymous
        if cert_identity is not None and self.certificate_login:
            user = self.core.users.user_for_certificate(cert_identity)
            if user is not None:
                return self._done(
                    AuthResult(True, user.name, ReasonCode.SUCCESS, "certificate"),
                    client_id, user.name, peer,
                )
            log.info(
                "client {cid!r}: certificate identity {ident!r} is not mapped to a user",
                cid=client_id, ident=cert_identity,
            )
        if username is None:
            if password is not None:
                return self._done(_BAD_LOGIN, client_id, username, peer)  # MQTT-3.1.2-22 (3.1.1)
            return self._done(
                _ANONYMOUS if anonymous_ok else _NOT_AUTHORIZED, client_id, None, peer
            )
        if password is None:
            return self._done(_BAD_LOGIN, client_id, username, peer)
        return self._check_password(client_id, username, password, peer)

    # -- password path --------------------------------------------------------------------
    def _keys(self, username: str, peer: str | None) -> list[tuple[str, int]]:
        """Failure records a login counts against, each with its free allowance."""
        if not peer:
            return [(f"user:{username}", self.free_failures)]
        return [
            (f"peer:{peer} user:{username}", self.free_failures),
            (f"peer:{peer}", self.free_failures_per_peer),
        ]

    def _check_password(
        self, client_id: str, username: str, password: bytes, peer: str | None
    ) -> Deferred[AuthResult]:
        keys = self._keys(username, peer)
        now = self.clock.seconds()
        for key, _ in keys:
            record = self._failures.get(key)
            if record is not None and now < record.blocked_until:
                self.stats["throttled"] += 1
                log.info(
                    "client {cid!r} ({who}): login refused without checking, {n} recent "
                    "failures", cid=client_id, who=key, n=record.count,
                )
                return succeed(_BAD_LOGIN)
        try:
            text = password.decode("utf-8")
        except UnicodeDecodeError:
            return succeed(self._failed_result(client_id, username, keys))
        if len(self._sem.waiting) >= self.max_queued:
            self.stats["busy"] += 1
            return succeed(_BUSY)

        def verify(_: object) -> Deferred[Any]:
            d: Deferred[Any] = self.core.users.verify_deferred(username, text)
            return d

        d: Deferred[Any] = self._sem.run(verify, None)

        def checked(user: Any) -> AuthResult:
            if user is None:
                return self._failed_result(client_id, username, keys)
            self._failures.pop(keys[0][0], None)  # the address-wide record stays until it ages
            return self._done_result(
                AuthResult(True, user.name, ReasonCode.SUCCESS, "password"), client_id, user.name
            )

        def crashed(failure: Failure) -> AuthResult:
            log.failure("password check for {user!r} failed", failure, user=username)
            return AuthResult(False, None, ReasonCode.UNSPECIFIED_ERROR)

        d.addCallbacks(checked, crashed)
        return d

    def _failed_result(
        self, client_id: str, username: str, keys: list[tuple[str, int]]
    ) -> AuthResult:
        now = self.clock.seconds()
        self._expire(now)
        count = 0
        for key, free in keys:
            record = self._failures.pop(key, None)  # re-inserted last: the dict stays LRU-ordered
            if record is None:
                record = _Failures()
                if len(self._failures) >= self.max_records:
                    del self._failures[next(iter(self._failures))]
            self._failures[key] = record
            record.count += 1
            record.last = now
            over = record.count - free
            if over > 0:
                delay = min(self.base_delay * 2 ** (over - 1), self.max_delay)
                record.blocked_until = max(record.blocked_until, now + delay)
            count = count or record.count
        self.stats["failed"] += 1
        log.warn(
            "client {cid!r}: bad user name or password for {user!r} ({who}, failure {n})",
            cid=client_id, user=username, who=keys[0][0], n=count,
        )
        return _BAD_LOGIN

    def _expire(self, now: float) -> None:
        # records are in insertion order; an old entry at the front is the likeliest to expire
        while self._failures:
            key, first = next(iter(self._failures.items()))
            if now - first.last < self.forget_after:
                break
            del self._failures[key]

    # -- results --------------------------------------------------------------------------
    def _done(
        self, result: AuthResult, client_id: str, user: str | None, peer: str | None
    ) -> Deferred[AuthResult]:
        return succeed(self._done_result(result, client_id, user))

    def _done_result(self, result: AuthResult, client_id: str, user: str | None) -> AuthResult:
        if result.ok:
            self.stats["ok"] += 1
            log.info(
                "client {cid!r} logged in as {user} ({method})",
                cid=client_id, user=repr(user) if user else "anonymous", method=result.method,
            )
        else:
            self.stats["failed"] += 1
            log.info(
                "client {cid!r} refused: {reason}", cid=client_id, reason=result.reason.name
            )
        return result
