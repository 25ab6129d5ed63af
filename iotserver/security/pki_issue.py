"""Key and certificate generation on ``cryptography``: RSA 2048 keys, the local CA, TLS server
and client certificates, OPC UA application instance certificates, and the Modbus/TCP Security
role extension (a non-critical X.509v3 extension, OID 1.3.6.1.4.1.50316.802.1, holding one
ASN.1 UTF8String) written into client certificates and read back by ``read_modbus_role``.
Re-exported by ``iotserver.security.pki``, whose docstring gives the key and file policy.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MODBUS_ROLE_OID = x509.ObjectIdentifier("1.3.6.1.4.1.50316.802.1")

RSA_KEY_SIZE = 2048
# Devices with a slightly slow clock must not reject a certificate issued a moment ago.
_CLOCK_SKEW = _dt.timedelta(minutes=5)
_UTF8STRING_TAG = 0x0C


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
