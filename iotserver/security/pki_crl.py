"""The local CA's certificate revocation list: issued, kept current, published.

Strict OPC UA clients (node-opcua, UaExpert, the .NET stack) check revocation for every CA in a
server certificate's chain and refuse the certificate when the issuer has no CRL (node-opcua:
Bad_CertificateRevocationUnknown, OPC UA Part 4 6.1.3 "Certificate revocation"). The local CA
therefore publishes a CRL, empty unless something was revoked:

* ``<data_dir>/tls/ca.crl`` (PEM) beside ``ca.pem``, for clients to import with it;
* ``<pki_dir>/issuers/crl/iotserver-ca.crl`` (DER, the form OPC UA PKI folders hold) beside the
  copy of the CA certificate in ``issuers/certs``.

A CRL is valid for :data:`CRL_DAYS` (its nextUpdate, RFC 5280 5.1.2.5) and is renewed when less
than :data:`RENEW_DAYS` remain, when it is missing, or when it was not signed by the current CA.
Renewal keeps the revoked entries and increases the CRL number (RFC 5280 5.2.3). Renewing needs
``ca.key``; when the key is kept offline, the stored CRL is used as it is and a warning says
what to run where the key lives.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from iotserver.security.pki_files import _write_file, load_cert, load_key

log = logging.getLogger("iotserver.security")

CRL_DAYS = 365
RENEW_DAYS = 30
CHECK_INTERVAL_S = 86_400.0  # a running server looks at its CRL once a day
CRL_NAME = "ca.crl"
OPCUA_CRL_NAME = "iotserver-ca.crl"
_CLOCK_SKEW = _dt.timedelta(minutes=5)


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return 0


def issue_crl(
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    *,
    number: int = 1,
    days: int = CRL_DAYS,
    revoked: Iterable[x509.RevokedCertificate] = (),
    now: _dt.datetime | None = None,
) -> x509.CertificateRevocationList:
    """A CRL of ``ca_cert`` listing ``revoked`` (usually nothing), valid for ``days``."""
    if ca_cert.public_key() != ca_key.public_key():
        raise ValueError("the CA private key does not belong to the CA certificate")
    now = now or _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - _CLOCK_SKEW)
        .next_update(now + _dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_cert.public_key())  # type: ignore[arg-type]
    builder = builder.add_extension(aki, critical=False)
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    # Ed25519/Ed448 sign without a separate digest
    algorithm = (None if isinstance(ca_key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey))
                 else hashes.SHA256())
    return builder.sign(ca_key, algorithm)


def load_crl(path: Path) -> x509.CertificateRevocationList:
    data = Path(path).read_bytes()
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise ValueError(f"{path}: not a PEM or DER CRL ({exc})") from None


def _signed_by(crl: x509.CertificateRevocationList, ca_cert: x509.Certificate) -> bool:
    if crl.issuer != ca_cert.subject:
        return False
    try:
        return bool(crl.is_signature_valid(ca_cert.public_key()))  # type: ignore[arg-type]
    except (TypeError, ValueError, InvalidSignature):
        return False


def renewal_reason(crl: x509.CertificateRevocationList | None, ca_cert: x509.Certificate, *,
                   now: _dt.datetime | None = None, renew_days: int = RENEW_DAYS) -> str | None:
    """Why ``crl`` must be renewed (missing, another issuer, bad signature, near its
    nextUpdate), or None when it is current."""
    if crl is None:
        return "there is no CRL"
    now = now or _now()
    if not _signed_by(crl, ca_cert):
        return "the CRL is not signed by the current CA"
    next_update = crl.next_update_utc
    if next_update is None:
        return "the CRL has no nextUpdate"
    if next_update <= now:
        return f"the CRL expired on {next_update:%Y-%m-%d}"
    if next_update - now < _dt.timedelta(days=renew_days):
        return f"the CRL expires on {next_update:%Y-%m-%d}"
    return None


@dataclass(frozen=True)
class CrlState:
    """The CRL after :func:`ensure_crl`: where it is, whether it was (re)issued, and a problem
    to warn about (``None`` when it is current)."""

    path: Path
    crl: x509.CertificateRevocationList | None
    renewed: bool = False
    problem: str | None = None


def ensure_crl(tls_dir: Path, *, now: _dt.datetime | None = None, days: int = CRL_DAYS,
               renew_days: int = RENEW_DAYS, force: bool = False) -> CrlState:
    """Load ``<tls_dir>/ca.crl``, issuing or renewing it with ``ca.key`` when needed.

    Raises ValueError / OSError for unreadable CA files; an unusable old CRL is replaced.
    """
    tls_dir = Path(tls_dir)
    path = tls_dir / CRL_NAME
    ca_cert = load_cert(tls_dir / "ca.pem")
    old: x509.CertificateRevocationList | None = None
    if path.exists():
        try:
            old = load_crl(path)
        except (ValueError, OSError) as exc:
            log.warning("%s", exc)
    reason = "renewal was asked for" if force else renewal_reason(
        old, ca_cert, now=now, renew_days=renew_days)
    if reason is None:
        return CrlState(path, old)
    key_path = tls_dir / "ca.key"
    if not key_path.exists():
        return CrlState(path, old, problem=(
            f"{path}: {reason}, and {key_path} is not here to sign a new one; run "
            f"'iotserver certs crl' where the CA key is kept and copy {CRL_NAME} back"))
    ca_key = load_key(key_path)
    if ca_cert.public_key() != ca_key.public_key():
        raise ValueError(f"{key_path} is not the private key of {tls_dir / 'ca.pem'}")
    # a renewal keeps what the same CA revoked; a new CA starts a new list
    same_ca = old is not None and _signed_by(old, ca_cert)
    revoked = list(old) if old is not None and same_ca else []
    number = crl_number(old) + 1 if old is not None and same_ca else 1
    crl = issue_crl(ca_cert, ca_key, number=number, days=days,  # type: ignore[arg-type]
                    revoked=revoked, now=now)
    _write_file(path, crl.public_bytes(serialization.Encoding.PEM), 0o644, True)
    log.info("CRL %s issued (%s), next update %s", path, reason,
             f"{crl.next_update_utc:%Y-%m-%d}")
    return CrlState(path, crl, renewed=True)


def publish_crl(crl: x509.CertificateRevocationList, folder: Path,
                name: str = OPCUA_CRL_NAME) -> Path:
    """Write ``crl`` as DER into an OPC UA ``issuers/crl`` (or ``trusted/crl``) folder, unless
    the same CRL is already there."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    der = crl.public_bytes(serialization.Encoding.DER)
    if not path.exists() or path.read_bytes() != der:
        _write_file(path, der, 0o644, True)
    return path


class CrlKeeper:
    """Keeps ``<tls_dir>/ca.crl`` current and copies it into every registered folder.

    ``check`` runs at start and then once per :data:`CHECK_INTERVAL_S` on ``clock`` (an
    ``IReactorTime``), so a server that runs for a year never serves an expired CRL.
    """

    def __init__(self, tls_dir: Path, clock: Any = None,
                 warn: Callable[[str], None] | None = None,
                 now: Callable[[], _dt.datetime] = _now) -> None:
        self.tls_dir = Path(tls_dir)
        self.clock = clock
        self.now = now
        self.folders: list[Path] = []
        self.state: CrlState | None = None
        self._warn = warn or (lambda text: log.warning("%s", text))
        self._call: Any = None

    def check(self) -> CrlState:
        self.state = state = ensure_crl(self.tls_dir, now=self.now())
        if state.problem:
            self._warn(state.problem)
        if state.crl is not None:
            for folder in self.folders:
                publish_crl(state.crl, folder)
        return state

    def add_folder(self, folder: Path) -> Path | None:
        """Publish the CRL into ``folder`` now and after every renewal."""
        self.folders.append(folder)
        if self.state is not None and self.state.crl is not None:
            return publish_crl(self.state.crl, folder)
        return None

    def start(self) -> None:
        self.check()
        self._schedule()

    def _schedule(self) -> None:
        if self.clock is not None:
            self._call = self.clock.callLater(CHECK_INTERVAL_S, self._tick)

    def _tick(self) -> None:
        self._call = None
        try:
            self.check()
        except (OSError, ValueError) as exc:
            self._warn(f"CRL check failed: {exc}")
        self._schedule()

    def stop(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
