"""Certificate inspection: ``cert_info`` (what ``certs show`` prints: names, fingerprint,
validity, key and extended key usage, Modbus role) and ``check_validity``, which warns before a
certificate expires and raises ``CertificateExpiredError`` once it has (or is not yet valid).
Re-exported by ``iotserver.security.pki``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iotserver.security.pki_files import load_cert, load_cert_chain
from iotserver.security.pki_issue import _now, read_modbus_role


class CertificateExpiredError(Exception):
    """A certificate is expired or not yet valid; the message names the file and the date."""

    def __init__(
        self,
        message: str,
        *,
        path: Path | None,
        not_before: _dt.datetime,
        not_after: _dt.datetime,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.not_before = not_before
        self.not_after = not_after


# --------------------------------------------------------------------------- inspection


@dataclass(frozen=True)
class CertInfo:
    """What ``certs show`` prints about one certificate."""

    path: Path | None
    subject: str
    issuer: str
    common_name: str | None
    serial_number: str
    sha256_fingerprint: str
    not_before: _dt.datetime
    not_after: _dt.datetime
    days_left: int
    is_ca: bool
    self_signed: bool
    public_key: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    uris: tuple[str, ...]
    emails: tuple[str, ...]
    key_usage: tuple[str, ...]
    extended_key_usage: tuple[str, ...]
    modbus_role: str | None


_KEY_USAGE_NAMES = (
    ("digital_signature", "digitalSignature"),
    ("content_commitment", "nonRepudiation"),
    ("key_encipherment", "keyEncipherment"),
    ("data_encipherment", "dataEncipherment"),
    ("key_agreement", "keyAgreement"),
    ("key_cert_sign", "keyCertSign"),
    ("crl_sign", "cRLSign"),
)

_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
}


def _ext_value(cert: x509.Certificate, ext_type: type[x509.ExtensionType]) -> object | None:
    try:
        return cert.extensions.get_extension_for_class(ext_type).value
    except x509.ExtensionNotFound:
        return None


def _common_name(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _describe_key(cert: x509.Certificate) -> str:
    pub = cert.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        return f"RSA {pub.key_size}"
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return f"EC {pub.curve.name}"
    return type(pub).__name__.removeprefix("_").removesuffix("PublicKey")


def _days_left(not_after: _dt.datetime, now: _dt.datetime) -> int:
    return int((not_after - now) // _dt.timedelta(days=1))


def cert_info(
    source: str | Path | x509.Certificate, *, now: _dt.datetime | None = None
) -> CertInfo:
    """A summary of a certificate (the first one when ``source`` is a bundle file)."""
    path = None if isinstance(source, x509.Certificate) else Path(source)
    cert = source if isinstance(source, x509.Certificate) else load_cert(source)
    now = now or _now()

    san = _ext_value(cert, x509.SubjectAlternativeName)
    if isinstance(san, x509.SubjectAlternativeName):
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        emails = tuple(san.get_values_for_type(x509.RFC822Name))
    else:
        dns = ips = uris = emails = ()

    bc = _ext_value(cert, x509.BasicConstraints)
    ku = _ext_value(cert, x509.KeyUsage)
    key_usage = (
        tuple(label for attr, label in _KEY_USAGE_NAMES if getattr(ku, attr))
        if isinstance(ku, x509.KeyUsage)
        else ()
    )
    eku = _ext_value(cert, x509.ExtendedKeyUsage)
    eku_names = (
        tuple(_EKU_NAMES.get(oid, oid.dotted_string) for oid in eku)
        if isinstance(eku, x509.ExtendedKeyUsage)
        else ()
    )
    return CertInfo(
        path=path,
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        common_name=_common_name(cert.subject),
        serial_number=f"{cert.serial_number:x}",
        sha256_fingerprint=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER))
        .hexdigest()
        .upper(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        days_left=_days_left(cert.not_valid_after_utc, now),
        is_ca=isinstance(bc, x509.BasicConstraints) and bc.ca,
        self_signed=cert.issuer == cert.subject,
        public_key=_describe_key(cert),
        dns_names=dns,
        ip_addresses=ips,
        uris=uris,
        emails=emails,
        key_usage=key_usage,
        extended_key_usage=eku_names,
        modbus_role=read_modbus_role(cert),
    )


def check_validity(
    path: str | Path, warn_days: int = 30, *, now: _dt.datetime | None = None
) -> str | None:
    """None when every certificate in ``path`` is valid for more than ``warn_days`` days.

    Returns a warning text when one expires within ``warn_days``; raises
    CertificateExpiredError when one is expired or not yet valid (a wrong clock looks the same
    to the peer, so we say which date is at fault).
    """
    path = Path(path)
    now = now or _now()
    warnings: list[str] = []
    for cert in load_cert_chain(path):
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        who = cert.subject.rfc4514_string() or "(empty subject)"
        if now > end:
            raise CertificateExpiredError(
                f"certificate {path} ({who}) expired on {end:%Y-%m-%d %H:%M} UTC",
                path=path,
                not_before=start,
                not_after=end,
            )
        if now < start:
            raise CertificateExpiredError(
                f"certificate {path} ({who}) is not valid before {start:%Y-%m-%d %H:%M} UTC "
                f"(check the system clock)",
                path=path,
                not_before=start,
                not_after=end,
            )
        if end - now <= _dt.timedelta(days=warn_days):
            warnings.append(
                f"certificate {path} ({who}) expires on {end:%Y-%m-%d %H:%M} UTC, "
                f"in {_days_left(end, now)} days"
            )
    return "; ".join(warnings) or None
