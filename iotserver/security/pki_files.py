"""Certificate and key files: writing (PEM/DER, private keys mode 0600, never overwriting an
existing file unless ``force=True``), loading PEM bundles or DER files, and
``ensure_server_material``, which loads or on first start creates the CA and server
certificate a TLS listener needs (``TlsMaterial``). Re-exported by ``iotserver.security.pki``.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from iotserver.security.pki_issue import create_ca, issue_server_cert

_ISSUER_KEY_TYPES = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


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
    """Write an unencrypted PKCS#8 PEM private key, mode 0600 (the server reads it unattended)."""
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
    """Load ``ca.pem``, ``server.pem`` and ``server.key`` from ``directory``, created if absent.

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
