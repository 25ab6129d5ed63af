"""Certificates and keys for every TLS listener: a local CA, server, client and OPC UA certificates.

Built on ``cryptography`` only. All keys are RSA 2048: the widest client support (mosquitto,
embedded TLS stacks, PLC firmware) and what OPC UA Basic256Sha256 requires. Private keys are
written with mode 0600 and no file is ever overwritten unless the caller says ``force=True``.

The Modbus/TCP Security role (Modbus/TCP Security spec, "Role-based client authorization") is a
non-critical X.509v3 extension, OID 1.3.6.1.4.1.50316.802.1, holding one ASN.1 UTF8String.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "MODBUS_ROLE_OID",
    "CertInfo",
    "CertificateExpiredError",
    "TlsMaterial",
    "cert_info",
    "check_validity",
    "create_ca",
    "ensure_server_material",
    "generate_key",
    "issue_client_cert",
    "issue_opcua_app_cert",
    "issue_server_cert",
    "load_cert",
    "load_cert_chain",
    "load_key",
    "read_modbus_role",
    "write_cert_der",
    "write_cert_pem",
    "write_key_der",
    "write_key_pem",
]

MODBUS_ROLE_OID = x509.ObjectIdentifier("1.3.6.1.4.1.50316.802.1")

RSA_KEY_SIZE = 2048
# Devices with a slightly slow clock must not reject a certificate issued a moment ago.
_CLOCK_SKEW = _dt.timedelta(minutes=5)
_UTF8STRING_TAG = 0x0C
_ISSUER_KEY_TYPES = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


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


# --------------------------------------------------------------------------- keys and builders


def generate_key() -> rsa.RSAPrivateKey:
    """A new RSA 2048 private key (the one key type used everywhere, see module docstring)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_SIZE)


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _validity(days: int, not_before: _dt.datetime | None) -> tuple[_dt.datetime, _dt.datetime]:
    """Validity window: from a little in the past (clock skew) for ``days`` days.

    A zero or negative ``days`` yields an already expired certificate (used by tests and to
    rehearse expiry handling); its start is then moved back so that start < end still holds.
    """
    now = _now()
    start = not_before if not_before is not None else now - _CLOCK_SKEW
    end = (not_before if not_before is not None else now) + _dt.timedelta(days=days)
    if start >= end:
        start = end - _dt.timedelta(days=1)
    return start, end


def _signing_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    # Ed25519/Ed448 sign without a separate digest; cryptography wants None for them.
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    return hashes.SHA256()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _leaf_builder(
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    subject: x509.Name,
    public_key: rsa.RSAPublicKey,
    days: int,
    not_before: _dt.datetime | None,
) -> x509.CertificateBuilder:
    """Common part of every end-entity certificate issued by our CA."""
    if ca_cert.public_key() != ca_key.public_key():
        raise ValueError("the CA private key does not belong to the CA certificate")
    start, end = _validity(days, not_before)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        # AKI is mandatory under OpenSSL's X509_V_FLAG_X509_STRICT, which Python 3.13's ssl
        # module enables by default: without it Python clients (paho-mqtt) reject the chain.
        .add_extension(_authority_key_id(ca_cert), critical=False)
    )


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """AKI copied from the CA's own SKI, so it matches even for a CA made by another tool."""
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_cert.public_key()  # type: ignore[arg-type]
        )
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _san(
    dns_names: Iterable[str] = (),
    ip_addresses: Iterable[str] = (),
    uris: Iterable[str] = (),
) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    entries += [x509.DNSName(d) for d in dns_names]
    for ip in ip_addresses:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise ValueError(f"not an IP address: {ip!r}") from None
    if not entries:
        raise ValueError("a certificate needs at least one DNS name, IP address or URI")
    return x509.SubjectAlternativeName(entries)


def _key_usage(
    *,
    digital_signature: bool = False,
    content_commitment: bool = False,
    key_encipherment: bool = False,
    data_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=content_commitment,
        key_encipherment=key_encipherment,
        data_encipherment=data_encipherment,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


# --------------------------------------------------------------------------- issuing


def create_ca(
    common_name: str, *, days: int = 3650, not_before: _dt.datetime | None = None
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A self-signed CA that may only sign end-entity certificates (path length 0)."""
    key = generate_key()
    public_key = key.public_key()
    start, end = _validity(days, not_before)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_server_cert(
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    common_name: str,
    *,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str],
    days: int = 825,
    not_before: _dt.datetime | None = None,
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A TLS server certificate; clients match the host name against the SAN, never the CN.

    EKU also carries clientAuth so the same identity can dial out (bridges, OPC UA client).
    """
    key = generate_key()
    cert = (
        _leaf_builder(ca_cert, ca_key, _name(common_name), key.public_key(), days, not_before)
        .add_extension(_san(dns_names, ip_addresses), critical=False)
        .add_extension(_key_usage(digital_signature=True, key_encipherment=True), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, _signing_hash(ca_key))
    )
    return cert, key


def issue_client_cert(
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    name: str,
    *,
    role: str | None = None,
    days: int = 825,
    not_before: _dt.datetime | None = None,
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A TLS client certificate with CN=name; ``role`` adds the Modbus/TCP Security role."""
    key = generate_key()
    builder = (
        _leaf_builder(ca_cert, ca_key, _name(name), key.public_key(), days, not_before)
        .add_extension(_key_usage(digital_signature=True, key_encipherment=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if role is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(MODBUS_ROLE_OID, _der_utf8string(role)), critical=False
        )
    return builder.sign(ca_key, _signing_hash(ca_key)), key


def issue_opcua_app_cert(
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    application_uri: str,
    *,
    common_name: str,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str],
    days: int = 825,
    not_before: _dt.datetime | None = None,
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """An OPC UA application instance certificate (OPC UA Part 6, 6.2.2).

    The SAN URI must equal the server's ApplicationUri, or other stacks refuse the certificate.
    Key usage includes nonRepudiation and dataEncipherment as Part 6 lists them.
    """
    key = generate_key()
    cert = (
        _leaf_builder(ca_cert, ca_key, _name(common_name), key.public_key(), days, not_before)
        .add_extension(_san(dns_names, ip_addresses, [application_uri]), critical=False)
        .add_extension(
            _key_usage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, _signing_hash(ca_key))
    )
    return cert, key


# --------------------------------------------------------------------------- Modbus role


def _der_utf8string(text: str) -> bytes:
    body = text.encode("utf-8")
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(octets)]) + octets
    return bytes([_UTF8STRING_TAG]) + length + body


def _parse_der_utf8string(der: bytes) -> str:
    if len(der) < 2 or der[0] != _UTF8STRING_TAG:
        raise ValueError("Modbus role extension is not an ASN.1 UTF8String")
    first = der[1]
    if first < 0x80:
        n, offset = first, 2
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or len(der) < 2 + count:
            raise ValueError("Modbus role extension has a bad DER length")
        n, offset = int.from_bytes(der[2 : 2 + count], "big"), 2 + count
    if len(der) != offset + n:
        raise ValueError("Modbus role extension length does not match its content")
    try:
        return der[offset:].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("Modbus role extension is not valid UTF-8") from None


def read_modbus_role(cert: x509.Certificate) -> str | None:
    """The Modbus/TCP Security role of a client certificate, or None when it has none.

    Raises ValueError when the extension is present but malformed: a broken role must not be
    mistaken for "no role".
    """
    try:
        ext = cert.extensions.get_extension_for_oid(MODBUS_ROLE_OID)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):  # pragma: no cover - future parsing
        raise TypeError("unexpected parsed form of the Modbus role extension")
    return _parse_der_utf8string(value.value)


# --------------------------------------------------------------------------- files


def _write_file(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Create ``path`` with ``mode``; never replace an existing file unless ``force``.

    Without force, O_EXCL makes "does not exist" and "create" one atomic step. With force the
    data goes to a temporary file first, so a failed write never destroys the old file.
    """
    if not force:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            raise FileExistsError(
                f"{path} already exists; refusing to overwrite it (use force=True to replace it)"
            ) from None
        target = path
    else:
        target = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(target, path)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def _key_bytes(key: PrivateKeyTypes, encoding: serialization.Encoding) -> bytes:
    return key.private_bytes(
        encoding, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_cert_pem(cert: x509.Certificate, path: str | Path, *, force: bool = False) -> Path:
    """Write a certificate as PEM (mode 0644)."""
    path = Path(path)
    _write_file(path, cert.public_bytes(serialization.Encoding.PEM), 0o644, force)
    return path


def write_cert_der(cert: x509.Certificate, path: str | Path, *, force: bool = False) -> Path:
    """Write a certificate as DER, the form OPC UA PKI directories usually hold (mode 0644)."""
    path = Path(path)
    _write_file(path, cert.public_bytes(serialization.Encoding.DER), 0o644, force)
    return path


def write_key_pem(key: PrivateKeyTypes, path: str | Path, *, force: bool = False) -> Path:
    """Write an unencrypted PKCS#8 PEM private key with mode 0600 (the server reads it unattended)."""
    path = Path(path)
    _write_file(path, _key_bytes(key, serialization.Encoding.PEM), 0o600, force)
    return path


def write_key_der(key: PrivateKeyTypes, path: str | Path, *, force: bool = False) -> Path:
    """Write an unencrypted PKCS#8 DER private key with mode 0600."""
    path = Path(path)
    _write_file(path, _key_bytes(key, serialization.Encoding.DER), 0o600, force)
    return path


def _is_pem(data: bytes) -> bool:
    return data.lstrip().startswith(b"-----BEGIN")


def load_cert_chain(path: str | Path) -> list[x509.Certificate]:
    """All certificates of a PEM bundle (leaf first, as written) or the one of a DER file."""
    data = Path(path).read_bytes()
    try:
        if _is_pem(data):
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as e:
        raise ValueError(f"{path}: not a PEM or DER certificate file ({e})") from None


def load_cert(path: str | Path) -> x509.Certificate:
    """The first certificate of a PEM or DER file."""
    return load_cert_chain(path)[0]


def load_key(path: str | Path, *, password: bytes | None = None) -> PrivateKeyTypes:
    """A private key from a PEM or DER file (PKCS#8 or traditional)."""
    data = Path(path).read_bytes()
    try:
        if _is_pem(data):
            return serialization.load_pem_private_key(data, password)
        return serialization.load_der_private_key(data, password)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: cannot load private key ({e})") from None


# --------------------------------------------------------------------------- first start


@dataclass(frozen=True)
class TlsMaterial:
    """The CA certificate, server certificate and server key a TLS listener needs."""

    ca_cert_path: Path
    cert_path: Path
    key_path: Path
    ca_cert: x509.Certificate
    cert: x509.Certificate
    key: PrivateKeyTypes
    # Files this call generated (empty when everything was loaded): worth a log line, since a
    # new ca.pem has to be distributed to the clients.
    created: tuple[Path, ...] = ()


def ensure_server_material(
    directory: Path, *, hostnames: list[str], ip_addresses: list[str]
) -> TlsMaterial:
    """Load ``ca.pem``, ``server.pem`` and ``server.key`` from ``directory``, creating them if absent.

    First start: a local CA (``ca.pem``, ``ca.key``) and a server certificate for ``hostnames``
    and ``ip_addresses``. When only the server pair is missing and the CA key is present, a new
    server certificate is issued. ``ca.key`` is not needed once the server pair exists (it may be
    kept offline). Any other partial state is an error: we do not guess, and never overwrite.
    Existing certificates are not reissued when the names change; the certificate CLI does that.
    """
    directory = Path(directory)
    ca_pem, ca_key_path = directory / "ca.pem", directory / "ca.key"
    server_pem, server_key_path = directory / "server.pem", directory / "server.key"
    exists = {p: p.exists() for p in (ca_pem, ca_key_path, server_pem, server_key_path)}

    if exists[ca_pem] and exists[server_pem] and exists[server_key_path]:
        roots, chain = load_cert_chain(ca_pem), load_cert_chain(server_pem)
        key = load_key(server_key_path)
        _check_pair(chain[0], key, server_pem, server_key_path)
        if not _chains_to(chain[0], chain[1:], roots):
            raise ValueError(f"{server_pem} was not issued by the CA in {ca_pem}")
        return TlsMaterial(ca_pem, server_pem, server_key_path, roots[0], chain[0], key)

    if not hostnames and not ip_addresses:
        raise ValueError("ensure_server_material needs at least one host name or IP address")
    present = sorted(p.name for p, e in exists.items() if e)
    created: list[Path] = []
    if (
        not exists[server_pem]
        and not exists[server_key_path]
        and exists[ca_pem]
        and exists[ca_key_path]
    ):
        ca_cert = load_cert(ca_pem)
        ca_key = load_key(ca_key_path)
        if not isinstance(ca_key, _ISSUER_KEY_TYPES):
            raise ValueError(f"{ca_key_path}: key type cannot sign certificates")
        _check_pair(ca_cert, ca_key, ca_pem, ca_key_path)
    elif not present:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        first = (hostnames or ip_addresses)[0]
        ca_cert, ca_key = create_ca(f"iotserver local CA ({first})")
        created += [write_key_pem(ca_key, ca_key_path), write_cert_pem(ca_cert, ca_pem)]
    else:
        raise FileExistsError(
            f"{directory} holds an incomplete set of TLS files ({', '.join(present)}); expected "
            "ca.pem + server.pem + server.key, or ca.pem + ca.key alone, or none of them. "
            "Refusing to guess: complete or remove them."
        )
    common_name = (hostnames or ip_addresses)[0]
    cert, key = issue_server_cert(
        ca_cert, ca_key, common_name, dns_names=hostnames, ip_addresses=ip_addresses
    )
    created += [write_key_pem(key, server_key_path), write_cert_pem(cert, server_pem)]
    return TlsMaterial(ca_pem, server_pem, server_key_path, ca_cert, cert, key, tuple(created))


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _chains_to(
    leaf: x509.Certificate, intermediates: list[x509.Certificate], roots: list[x509.Certificate]
) -> bool:
    """Whether signatures lead from ``leaf`` through ``intermediates`` to one of ``roots``.

    A sanity check of our own files (names and signatures only; validity dates are
    check_validity's job, and peers do the full verification).
    """
    cert = leaf
    for _ in range(len(intermediates) + 1):
        if any(_issued_by(cert, root) for root in roots):
            return True
        nxt = next((i for i in intermediates if i != cert and _issued_by(cert, i)), None)
        if nxt is None:
            return False
        cert = nxt
    return False


def _check_pair(
    cert: x509.Certificate, key: PrivateKeyTypes, cert_path: Path, key_path: Path
) -> None:
    if cert.public_key() != key.public_key():
        raise ValueError(f"{key_path} is not the private key of {cert_path}")


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
