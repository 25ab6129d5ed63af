"""MQTT client authentication: TLS client certificates, passwords from the user file, anonymous.

Order (first that applies decides):

1. A v5 CONNECT naming an authentication method (enhanced authentication) is refused with
   0x8C Bad authentication method: we implement none.
2. A TLS client certificate (verified by the TLS layer) whose identities map to a user in the
   user file logs in as that user; username and password are then ignored
   (``certificate_login = false`` turns this off). The mapping rule is the server's one rule,
   :func:`iotserver.security.login.certificate_identities`.
3. A username with a password is checked against the user file by the shared login module
   (:mod:`iotserver.security.login`: scrypt in a thread, one throttle keyed by address and
   user, a bounded number of checks at once). Wrong password, unknown user, a throttled
   attempt, or a username without password: 0x86 Bad user name or password; too many checks
   waiting: 0x89 Server busy.
4. No credentials at all: anonymous (user None) when ``allow_anonymous`` is configured (or the
   listener overrides it), else 0x87 Not authorized.

Every attempt is logged (failures rate-limited) and recorded in the audit trail.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed

from iotserver.mqtt.packets import ReasonCode
from iotserver.security.login import LoginResult, Outcome, logins_of

PROTOCOL = "mqtt"


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
_ANONYMOUS = AuthResult(True, None, ReasonCode.SUCCESS, "anonymous")

_REFUSALS = {
    Outcome.FAILED: _BAD_LOGIN,
    Outcome.THROTTLED: _BAD_LOGIN,  # the same answer: a guesser learns nothing
    Outcome.BUSY: AuthResult(False, None, ReasonCode.SERVER_BUSY),
    Outcome.ERROR: AuthResult(False, None, ReasonCode.UNSPECIFIED_ERROR),
    Outcome.DENIED: _NOT_AUTHORIZED,
}


def _setting(cfg: Any, name: str, default: Any) -> Any:
    """``cfg.auth.<name>``, else ``cfg.<name>``, else the default."""
    auth = getattr(cfg, "auth", None)
    for owner in (auth, cfg):
        value = getattr(owner, name, None) if owner is not None else None
        if value is not None:
            return value
    return default


class Authenticator:
    """Checks CONNECT credentials; one instance per broker, shared by every listener."""

    def __init__(self, core: Any, cfg: Any) -> None:
        self.core = core
        self.logins = logins_of(core)
        self.allow_anonymous = bool(_setting(cfg, "allow_anonymous", False))
        self.certificate_login = bool(_setting(cfg, "certificate_login", True))

    @property
    def stats(self) -> Any:
        return self.logins.stats

    def authenticate(
        self,
        client_id: str,
        username: str | None,
        password: bytes | None,
        cert_identity: Sequence[str] | str | None,
        *,
        peer: str | None = None,
        auth_method: str | None = None,
        allow_anonymous: bool | None = None,
    ) -> Deferred[AuthResult]:
        """Decide a CONNECT; the Deferred never errbacks.

        ``cert_identity``: the verified client certificate's identities in rule order (or one
        identity); ``peer`` the client's address (host) for the throttle; ``auth_method`` the
        v5 Authentication Method property, if any; ``allow_anonymous`` the listener's override
        of the configured setting.
        """
        logins = self.logins
        if auth_method is not None:
            logins.record(PROTOCOL, peer, username, "enhanced", Outcome.DENIED,
                          f"client {client_id!r}, method {auth_method!r} not supported")
            return succeed(_BAD_METHOD)
        anonymous_ok = self.allow_anonymous if allow_anonymous is None else allow_anonymous
        if cert_identity and self.certificate_login:
            user = logins.certificate_user(cert_identity)
            if user is not None:
                logins.record(PROTOCOL, peer, user.name, "certificate", Outcome.OK,
                              f"client {client_id!r}", user=user)
                return succeed(AuthResult(True, user.name, ReasonCode.SUCCESS, "certificate"))
            logins.ratelog.info("mqtt-unmapped-cert", "mqtt: client {cid!r}: certificate "
                                "{ident!r} is not mapped to a user", cid=client_id,
                                ident=cert_identity)
        if username is None:
            if password is not None:  # MQTT-3.1.2-22 (3.1.1)
                logins.record(PROTOCOL, peer, None, "password", Outcome.DENIED,
                              f"client {client_id!r}, password without user name")
                return succeed(_BAD_LOGIN)
            if anonymous_ok:
                logins.record(PROTOCOL, peer, None, "anonymous", Outcome.OK,
                              f"client {client_id!r}")
                return succeed(_ANONYMOUS)
            logins.record(PROTOCOL, peer, None, "anonymous", Outcome.DENIED,
                          f"client {client_id!r}, anonymous access is off")
            return succeed(_NOT_AUTHORIZED)
        if password is None:
            logins.record(PROTOCOL, peer, username, "password", Outcome.FAILED,
                          f"client {client_id!r}, no password")
            return succeed(_BAD_LOGIN)
        d = logins.check_password(PROTOCOL, peer, username, password)
        return d.addCallback(_result)


def _result(result: LoginResult) -> AuthResult:
    if result.ok and result.user is not None:
        return AuthResult(True, result.user.name, ReasonCode.SUCCESS, "password")
    return _REFUSALS.get(result.outcome, _BAD_LOGIN)
