"""OPC UA security: application certificate, trust list with rejected folder, users and roles.

PKI folder (the layout OPC UA stacks share, Part 12 F.1)::

    <pki_dir>/own/certs/iotserver.der      our application instance certificate
    <pki_dir>/own/private/iotserver.pem    its key (0600)
    <pki_dir>/trusted/certs/  trusted/crl/  client certificates / CAs we trust, their CRLs
    <pki_dir>/issuers/certs/  issuers/crl/  CAs used to build chains (not trusted by themselves)
    <pki_dir>/rejected/certs/               copies of refused certificates

An unknown client certificate is refused with Bad_CertificateUntrusted and copied into
``rejected/certs``; the operator trusts it by moving the file to ``trusted/certs`` (picked up on
the next connection attempt, no restart). Certificates issued by the server's local CA
(``<data_dir>/tls/ca.pem``) are trusted as well: whoever holds that CA key administers the server.

Users: username/password against the shared user file through the server's one login module
(scrypt in a thread, awaited before asyncua activates the session, throttled by address and
user: see :class:`IotUserManager`), X509 user tokens mapped to users by the server's one
certificate rule (the user certificate must itself be trusted), anonymous only when
configured. Roles:
operator = read-only, engineer = read/write, admin = read/write and source control. No role
may change the address space (AddNodes etc. are refused for everyone: ``allow_remote_admin``
off, and no session is ever an asyncua Admin).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import time
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import USER_TYPES, PermissionRuleset, User, UserRole
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from twisted.logger import Logger

from iotserver.ratelog import RateLimitedLog, Seconds
from iotserver.security import pki
from iotserver.security.login import Logins, Outcome, may_write
from iotserver.security.login import certificate_identities as certificate_identities
from iotserver.security.users import UserDB

log = Logger(namespace="iotserver.opcua")


class _Monotonic:
    def seconds(self) -> float:
        return time.monotonic()

PROTOCOL = "opcua"  # in the login log and the audit trail

MAX_REJECTED_FILES = 200  # a scanner must not fill the disk with rejected certificates


# --------------------------------------------------------------------------- application cert


@dataclass(frozen=True)
class AppCert:
    cert_path: Path
    key_path: Path
    cert: x509.Certificate
    created: bool


def _san_uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def _self_signed_app_cert(application_uri: str, common_name: str, dns: list[str],
                          ips: list[str], days: int = 825) -> tuple[x509.Certificate, Any]:
    """A self-signed application instance certificate (Part 6 6.2.2), when no CA key exists."""
    import ipaddress

    key = pki.generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _dt.datetime.now(_dt.UTC)
    alt: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri)]
    alt += [x509.DNSName(d) for d in dns]
    alt += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True,
                                     key_encipherment=True, data_encipherment=True,
                                     key_agreement=False, key_cert_sign=True, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def ensure_app_cert(pki_dir: Path, application_uri: str, *, hostnames: list[str],
                    ip_addresses: list[str], ca_cert: x509.Certificate | None,
                    ca_key_path: Path | None) -> AppCert:
    """Load our application certificate, (re)issuing it when missing, expired or for another URI.

    Signed by the server's local CA when its key is available, else self-signed.
    """
    layout(pki_dir)
    cert_path = pki_dir / "own" / "certs" / "iotserver.der"
    key_path = pki_dir / "own" / "private" / "iotserver.pem"
    if cert_path.exists() and key_path.exists():
        cert = pki.load_cert(cert_path)
        key = pki.load_key(key_path)
        now = _dt.datetime.now(_dt.UTC)
        fresh = cert.not_valid_after_utc > now + _dt.timedelta(days=1)
        if cert.public_key() == key.public_key() and fresh and \
                application_uri in _san_uris(cert):
            return AppCert(cert_path, key_path, cert, False)
        log.warn("OPC UA application certificate {path} is expired or names another "
                 "ApplicationUri: issuing a new one", path=str(cert_path))
    common_name = f"iotserver@{(hostnames or ip_addresses or ['localhost'])[0]}"
    ca_key = None
    if ca_cert is not None and ca_key_path is not None and ca_key_path.exists():
        candidate = pki.load_key(ca_key_path)
        if candidate.public_key() == ca_cert.public_key():
            ca_key = candidate
    if ca_key is not None and ca_cert is not None:
        cert, key = pki.issue_opcua_app_cert(
            ca_cert, ca_key, application_uri, common_name=common_name,  # type: ignore[arg-type]
            dns_names=hostnames, ip_addresses=ip_addresses)
    else:
        cert, key = _self_signed_app_cert(application_uri, common_name, hostnames, ip_addresses)
    pki.write_key_pem(key, key_path, force=True)
    pki.write_cert_der(cert, cert_path, force=True)
    if ca_key is not None and ca_cert is not None:
        # clients that verify chains find our issuer here too
        issuer_copy = pki_dir / "issuers" / "certs" / "iotserver-ca.der"
        pki.write_cert_der(ca_cert, issuer_copy, force=True)
    return AppCert(cert_path, key_path, cert, True)


def layout(pki_dir: Path) -> None:
    for sub in ("own/certs", "own/private", "trusted/certs", "trusted/crl", "issuers/certs",
                "issuers/crl", "rejected/certs"):
        (pki_dir / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(pki_dir / "own" / "private", 0o700)


# --------------------------------------------------------------------------- trust list


def thumbprint(cert: x509.Certificate) -> str:
    return hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()


def _common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _load_certs(folder: Path) -> list[x509.Certificate]:
    out: list[x509.Certificate] = []
    if not folder.is_dir():
        return out
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in (".der", ".pem", ".crt", ".cer"):
            try:
                out += pki.load_cert_chain(path)
            except (ValueError, OSError) as exc:
                log.warn("PKI: ignoring {path}: {exc}", path=str(path), exc=str(exc))
    return out


def _load_crls(folder: Path) -> list[x509.CertificateRevocationList]:
    out: list[x509.CertificateRevocationList] = []
    if not folder.is_dir():
        return out
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in (".crl", ".der", ".pem"):
            continue
        try:
            data = path.read_bytes()
            out.append(x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----")
                       else x509.load_der_x509_crl(data))
        except (ValueError, OSError) as exc:
            log.warn("PKI: ignoring CRL {path}: {exc}", path=str(path), exc=str(exc))
    return out


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


class TrustList:
    """The trusted/issuers/rejected folders, re-read whenever one of them changes."""

    def __init__(self, pki_dir: Path, extra_anchors: Iterable[x509.Certificate] = ()) -> None:
        self.pki_dir = pki_dir
        self._extra = list(extra_anchors)
        self._stamp: tuple[float, ...] = ()
        self._trusted: list[x509.Certificate] = []
        self._trusted_der: set[bytes] = set()
        self._issuers: list[x509.Certificate] = []
        self._crls: list[x509.CertificateRevocationList] = []

    def _folders(self) -> list[Path]:
        p = self.pki_dir
        return [p / "trusted", p / "trusted" / "certs", p / "trusted" / "crl",
                p / "issuers" / "certs", p / "issuers" / "crl"]

    def refresh(self) -> None:
        stamp = tuple(f.stat().st_mtime_ns if f.exists() else 0 for f in self._folders())
        if stamp == self._stamp:
            return
        self._stamp = stamp
        p = self.pki_dir
        self._trusted = _load_certs(p / "trusted") + _load_certs(p / "trusted" / "certs")
        self._trusted += self._extra
        self._trusted_der = {c.public_bytes(serialization.Encoding.DER) for c in self._trusted}
        self._issuers = _load_certs(p / "issuers" / "certs")
        self._crls = _load_crls(p / "trusted" / "crl") + _load_crls(p / "issuers" / "crl")

    def check(self, cert: x509.Certificate) -> int:
        """0 when trusted and valid, else the OPC UA status code (Part 4 6.1.3, Table 106)."""
        self.refresh()
        chain = self._chain(cert)
        if chain is None:
            return cast(int, ua.StatusCodes.BadCertificateUntrusted)
        now = _dt.datetime.now(_dt.UTC)
        for link in chain:
            if not link.not_valid_before_utc <= now <= link.not_valid_after_utc:
                return cast(int, ua.StatusCodes.BadCertificateTimeInvalid if link is cert
                            else ua.StatusCodes.BadCertificateIssuerTimeInvalid)
        for child, issuer in itertools.pairwise(chain):
            for crl in self._crls:
                if crl.issuer == issuer.subject and \
                        crl.get_revoked_certificate_by_serial_number(child.serial_number):
                    return cast(int, ua.StatusCodes.BadCertificateRevoked if child is cert
                                else ua.StatusCodes.BadCertificateIssuerRevoked)
        return 0

    def _chain(self, cert: x509.Certificate) -> list[x509.Certificate] | None:
        """cert .. trust anchor, or None when no chain leads to a trusted certificate."""
        if cert.public_bytes(serialization.Encoding.DER) in self._trusted_der:
            return [cert]
        chain = [cert]
        current = cert
        for _ in range(8):
            anchor = next((t for t in self._trusted if _is_ca(t) and _issued_by(current, t)),
                          None)
            if anchor is not None:
                return [*chain, anchor]
            nxt = next((i for i in self._issuers
                        if _is_ca(i) and i not in chain and _issued_by(current, i)), None)
            if nxt is None:
                return None
            chain.append(nxt)
            current = nxt
        return None

    def reject(self, cert: x509.Certificate) -> Path | None:
        """Copy a refused certificate into ``rejected/certs`` for the operator to review."""
        folder = self.pki_dir / "rejected" / "certs"
        name = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in _common_name(cert))
        path = folder / f"{name or 'certificate'} [{thumbprint(cert)}].der"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if path.exists():
                return path
            if sum(1 for _ in folder.iterdir()) >= MAX_REJECTED_FILES:
                log.warn("PKI: {folder} holds {n} files; not storing more rejected "
                         "certificates", folder=str(folder), n=MAX_REJECTED_FILES)
                return None
            pki.write_cert_der(cert, path)
        except (OSError, FileExistsError) as exc:
            log.warn("PKI: cannot store rejected certificate: {exc}", exc=str(exc))
            return None
        return path


class ClientCertificateValidator:
    """asyncua ``certificate_validator``: trust list, validity, ApplicationUri.

    The checks of Part 4 6.1.3 (Table 106) in its order: chain and trust first, so an unknown
    certificate always ends up in ``rejected/`` whatever else is wrong with it.
    """

    def __init__(self, trust: TrustList, clock: Seconds | None = None) -> None:
        self.trust = trust
        # a scanner can present certificates in a loop: these lines are rate-limited
        self.ratelog = RateLimitedLog(clock or _Monotonic(), logger=log)

    async def __call__(self, cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        code = self.trust.check(cert)
        if code == ua.StatusCodes.BadCertificateUntrusted:
            path = self.trust.reject(cert)
            self.ratelog.warn("untrusted", "OPC UA: refused untrusted client certificate "
                              "{cn!r} ({uri}); to trust it, move {path} to {folder}",
                              cn=_common_name(cert), uri=app.ApplicationUri, path=str(path),
                              folder=str(self.trust.pki_dir / "trusted" / "certs"))
        if code:
            raise ServiceError(code)
        if app.ApplicationUri not in _san_uris(cert):
            self.ratelog.warn("uri", "OPC UA: client certificate {cn!r} does not name "
                              "ApplicationUri {uri}", cn=_common_name(cert),
                              uri=app.ApplicationUri)
            raise ServiceError(ua.StatusCodes.BadCertificateUriInvalid)


# --------------------------------------------------------------------------- users


@dataclass
class IotUser(User):  # type: ignore[misc]  # asyncua is untyped
    """asyncua User (role ``User`` for everyone) with our role and login kind."""

    access: str = "operator"  # operator | engineer | admin
    via: str = "anonymous"  # anonymous | password | certificate

    @property
    def can_write(self) -> bool:
        return may_write(self.access)


class IotRuleset(PermissionRuleset):  # type: ignore[misc]  # asyncua is untyped
    """Every session may use the ordinary services; none may change the address space."""

    def __init__(self) -> None:
        # asyncua's list lacks BrowseNext, which we serve (browse.py)
        browse_next = ua.ObjectIds.BrowseNextRequest_Encoding_DefaultBinary
        self._allowed = frozenset(ua.NodeId(t) for t in (*USER_TYPES, browse_next))

    def check_validity(self, user: Any, action_type_id: Any, body: Any) -> bool:
        return action_type_id in self._allowed


class IotUserManager:
    """asyncua user manager over the shared user file and the server's one login path
    (:mod:`iotserver.security.login`: throttle by address and user, scrypt in a thread,
    audit).

    The session layer (``sessionsvc.py``) awaits :meth:`login` for an ActivateSession, so a
    password is hashed in a thread while the loop runs. ``get_user`` is the synchronous
    asyncua-style hook, kept for asyncua code that asks for a user; it verifies on the loop.
    """

    def __init__(self, users: Callable[[], UserDB], trust: TrustList, *,
                 allow_anonymous: bool, logins: Logins | None = None) -> None:
        self._users = users
        self._trust = trust
        self.allow_anonymous = allow_anonymous
        self._logins = logins

    @property
    def logins(self) -> Logins:
        if self._logins is None:
            from twisted.internet import reactor

            self._logins = Logins(self._users, reactor)
        return self._logins

    async def login(self, *, peer: str | None, username: str | None = None,
                    password: str | None = None, certificate: bytes | None = None
                    ) -> User | None:
        """The awaitable login for an ActivateSession: the session's user, or None to refuse
        (Bad_UserAccessDenied). ``peer`` is the client's address (host) for the throttle;
        ``certificate`` the DER of an X509 *user token* (never the channel certificate)."""
        if username is not None:
            result = await self.logins.check_password_async(PROTOCOL, peer, username,
                                                            password or "")
            if not result.ok or result.user is None:
                return None
            return IotUser(role=UserRole.User, name=result.user.name,
                           access=result.user.role.value, via="password")
        return self._token_login(peer, certificate)

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        """asyncua's synchronous hook (see the class docstring)."""
        if username is not None:
            # a caller that did not await login(): verified here, blocking
            if self.logins.throttled(PROTOCOL, None, username, "password"):
                return None
            self.logins.ratelog.warn("opcua-blocking", "OPC UA: password of {user!r} verified "
                                     "on the event loop (not through login())",
                                     user=username)
            user = self._users().verify(username, password or "")
            outcome = Outcome.OK if user is not None else Outcome.FAILED
            self.logins.record(PROTOCOL, None, username, "password", outcome, user=user)
            if user is None:
                return None
            return IotUser(role=UserRole.User, name=user.name, access=user.role.value,
                           via="password")
        return self._token_login(None, certificate)

    def _token_login(self, peer: str | None, certificate: Any) -> User | None:
        if certificate:
            return self._certificate_login(peer, certificate)
        if self.allow_anonymous:
            self.logins.record(PROTOCOL, peer, None, "anonymous", Outcome.OK)
            return IotUser(role=UserRole.User, name="anonymous", access="operator",
                           via="anonymous")
        self.logins.record(PROTOCOL, peer, None, "anonymous", Outcome.DENIED,
                           "anonymous access is off")
        return None

    def _certificate_login(self, peer: str | None, der: bytes) -> User | None:
        try:
            cert = x509.load_der_x509_certificate(bytes(der))
        except ValueError:
            self.logins.record(PROTOCOL, peer, None, "certificate", Outcome.FAILED,
                               "unreadable user certificate")
            return None
        code = self._trust.check(cert)
        if code:
            if code == ua.StatusCodes.BadCertificateUntrusted:
                self._trust.reject(cert)
            self.logins.record(PROTOCOL, peer, _common_name(cert), "certificate",
                               Outcome.FAILED, f"user certificate {ua.StatusCode(code).name}")
            return None
        user = self.logins.certificate_user(cert)
        if user is None:
            self.logins.record(PROTOCOL, peer, _common_name(cert), "certificate",
                               Outcome.DENIED, "trusted but mapped to no user (add it to a "
                               "user's 'certificates' list)")
            return None
        self.logins.record(PROTOCOL, peer, user.name, "certificate", Outcome.OK)
        return IotUser(role=UserRole.User, name=user.name, access=user.role.value,
                       via="certificate")


def role_of(user: Any) -> str:
    """Our role name for an asyncua session user (server-internal sessions count as admin)."""
    if isinstance(user, IotUser):
        return user.access
    if isinstance(user, User) and user.role == UserRole.Admin:
        return "admin"
    return "operator"


def can_write(user: Any) -> bool:
    """The server's one "may write" rule for an OPC UA session user."""
    return may_write(role_of(user))
