"""Tests for iotserver.security.pki: issuing, the Modbus role extension, files, expiry."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from iotserver.security import pki

UTC = dt.UTC


@pytest.fixture(scope="module")
def ca() -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    return pki.create_ca("Test CA")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_ca_is_a_ca(ca: tuple[x509.Certificate, rsa.RSAPrivateKey]) -> None:
    cert, key = ca
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert cert.subject == cert.issuer
    assert cert.not_valid_after_utc - cert.not_valid_before_utc >= dt.timedelta(days=3650)


def test_server_cert_sans_and_ekus(ca: tuple[x509.Certificate, rsa.RSAPrivateKey]) -> None:
    cert, key = pki.issue_server_cert(
        *ca, "gw1", dns_names=["gw1.plant.local", "localhost"], ip_addresses=["127.0.0.1", "::1"]
    )
    san = _san(cert)
    assert san.get_values_for_type(x509.DNSName) == ["gw1.plant.local", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert _eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw1"
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.public_key() == key.public_key() and key.key_size == 2048
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 825
    # cryptography's RFC 5280 verifier is strict (AKI, SKI, critical bits): it must accept ours
    verifier = (
        PolicyBuilder().store(Store([ca[0]])).build_server_verifier(x509.DNSName("gw1.plant.local"))
    )
    assert verifier.verify(cert, [])[-1] == ca[0]
    ip_verifier = (
        PolicyBuilder()
        .store(Store([ca[0]]))
        .build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    )
    ip_verifier.verify(cert, [])


def test_server_cert_rejects_bad_input(ca: tuple[x509.Certificate, rsa.RSAPrivateKey]) -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        pki.issue_server_cert(*ca, "gw1", dns_names=[], ip_addresses=["gw1"])
    with pytest.raises(ValueError, match="at least one"):
        pki.issue_server_cert(*ca, "gw1", dns_names=[], ip_addresses=[])
    other_cert, _ = pki.create_ca("Other")
    with pytest.raises(ValueError, match="does not belong"):
        pki.issue_server_cert(other_cert, ca[1], "gw1", dns_names=["a"], ip_addresses=[])


def test_client_cert_eku_and_role_round_trip(
    ca: tuple[x509.Certificate, rsa.RSAPrivateKey],
) -> None:
    cert, _ = pki.issue_client_cert(*ca, "scada-1", role="Operator")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "scada-1"
    assert _eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ext = cert.extensions.get_extension_for_oid(pki.MODBUS_ROLE_OID)
    assert not ext.critical
    assert ext.value.value == b"\x0c\x08Operator"  # DER UTF8String
    assert pki.read_modbus_role(cert) == "Operator"
    cert.verify_directly_issued_by(ca[0])


@pytest.mark.parametrize("role", ["", "Wartung-Überwachung", "r" * 200, "x" * 70000])
def test_role_encodings(ca: tuple[x509.Certificate, rsa.RSAPrivateKey], role: str) -> None:
    cert, _ = pki.issue_client_cert(*ca, "c", role=role)
    assert pki.read_modbus_role(cert) == role


def test_no_role_and_malformed_role(ca: tuple[x509.Certificate, rsa.RSAPrivateKey]) -> None:
    plain, key = pki.issue_client_cert(*ca, "c")
    assert pki.read_modbus_role(plain) is None
    for bad in (b"\x13\x02ab", b"\x0c\x05ab", b"\x0c\x02\xff\xfe", b"\x0c"):
        cert = (
            x509.CertificateBuilder()
            .subject_name(plain.subject)
            .issuer_name(plain.issuer)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(plain.not_valid_before_utc)
            .not_valid_after(plain.not_valid_after_utc)
            .add_extension(x509.UnrecognizedExtension(pki.MODBUS_ROLE_OID, bad), critical=False)
            .sign(ca[1], hashes.SHA256())
        )
        with pytest.raises(ValueError, match="Modbus role"):
            pki.read_modbus_role(cert)


def test_opcua_app_cert(ca: tuple[x509.Certificate, rsa.RSAPrivateKey]) -> None:
    uri = "urn:plant1:iotserver"
    cert, key = pki.issue_opcua_app_cert(
        *ca,
        uri,
        common_name="iotserver OPC UA",
        dns_names=["gw1"],
        ip_addresses=["10.0.0.5"],
        days=365,
    )
    san = _san(cert)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [uri]
    assert san.get_values_for_type(x509.DNSName) == ["gw1"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.content_commitment
    assert ku.key_encipherment and ku.data_encipherment
    assert not ku.key_cert_sign
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    info = pki.cert_info(cert)
    assert info.uris == (uri,) and info.common_name == "iotserver OPC UA"


def test_write_modes_and_no_overwrite(
    tmp_path: Path, ca: tuple[x509.Certificate, rsa.RSAPrivateKey]
) -> None:
    cert, key = ca
    key_path = pki.write_key_pem(key, tmp_path / "ca.key")
    cert_path = pki.write_cert_pem(cert, tmp_path / "ca.pem")
    assert _mode(key_path) == 0o600
    assert _mode(cert_path) & 0o077 in (0o044, 0o004, 0o040, 0)  # umask-dependent, never writable
    original = key_path.read_bytes()
    other_cert, other_key = pki.create_ca("Other")
    with pytest.raises(FileExistsError, match=r"refusing to overwrite.*force=True"):
        pki.write_key_pem(other_key, key_path)
    with pytest.raises(FileExistsError, match=r"ca\.pem"):
        pki.write_cert_pem(other_cert, cert_path)
    assert key_path.read_bytes() == original
    # force replaces, and a key file that was world-readable comes back as 0600
    key_path.chmod(0o644)
    pki.write_key_pem(other_key, key_path, force=True)
    assert _mode(key_path) == 0o600
    assert pki.load_key(key_path).public_key() == other_key.public_key()
    pki.write_cert_pem(other_cert, cert_path, force=True)
    assert pki.load_cert(cert_path) == other_cert
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.key", "ca.pem"]  # no temp files


def test_der_round_trip(tmp_path: Path, ca: tuple[x509.Certificate, rsa.RSAPrivateKey]) -> None:
    cert, key = ca
    der_cert = pki.write_cert_der(cert, tmp_path / "ca.der")
    der_key = pki.write_key_der(key, tmp_path / "ca.key.der")
    assert der_cert.read_bytes()[:1] == b"\x30"
    assert _mode(der_key) == 0o600
    assert pki.load_cert(der_cert) == cert
    assert pki.load_key(der_key).public_key() == key.public_key()
    with pytest.raises(FileExistsError):
        pki.write_key_der(key, der_key)
    (tmp_path / "junk.pem").write_bytes(b"not a certificate")
    with pytest.raises(ValueError, match=r"junk\.pem"):
        pki.load_cert(tmp_path / "junk.pem")


def test_ensure_server_material_is_idempotent(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    first = pki.ensure_server_material(
        directory, hostnames=["gw1", "localhost"], ip_addresses=["127.0.0.1"]
    )
    assert {p.name for p in first.created} == {"ca.pem", "ca.key", "server.pem", "server.key"}
    assert _mode(directory) == 0o700
    assert _mode(directory / "ca.key") == 0o600 and _mode(directory / "server.key") == 0o600
    assert first.cert_path == directory / "server.pem"
    assert _san(first.cert).get_values_for_type(x509.DNSName) == ["gw1", "localhost"]
    first.cert.verify_directly_issued_by(first.ca_cert)

    second = pki.ensure_server_material(directory, hostnames=["other"], ip_addresses=[])
    assert second.created == ()
    assert second.cert == first.cert and second.ca_cert == first.ca_cert
    assert second.key.public_key() == first.key.public_key()

    # the CA key may live offline once the server pair exists
    (directory / "ca.key").rename(tmp_path / "ca.key.offline")
    assert pki.ensure_server_material(directory, hostnames=["gw1"], ip_addresses=[]).created == ()


def test_ensure_server_material_reissues_from_existing_ca(tmp_path: Path) -> None:
    first = pki.ensure_server_material(tmp_path, hostnames=["gw1"], ip_addresses=[])
    first.cert_path.unlink()
    first.key_path.unlink()
    again = pki.ensure_server_material(tmp_path, hostnames=["gw2"], ip_addresses=["10.1.1.1"])
    assert [p.name for p in again.created] == ["server.key", "server.pem"]
    assert again.ca_cert == first.ca_cert and again.cert != first.cert
    again.cert.verify_directly_issued_by(first.ca_cert)


def test_ensure_server_material_refuses_partial_or_mismatched_state(tmp_path: Path) -> None:
    first = pki.ensure_server_material(tmp_path, hostnames=["gw1"], ip_addresses=[])
    first.key_path.unlink()
    with pytest.raises(FileExistsError, match="incomplete set of TLS files"):
        pki.ensure_server_material(tmp_path, hostnames=["gw1"], ip_addresses=[])
    assert not first.key_path.exists()  # nothing was written
    _, stray = pki.create_ca("stray")
    pki.write_key_pem(stray, first.key_path)
    with pytest.raises(ValueError, match="is not the private key of"):
        pki.ensure_server_material(tmp_path, hostnames=["gw1"], ip_addresses=[])
    with pytest.raises(ValueError, match="at least one"):
        pki.ensure_server_material(tmp_path / "empty", hostnames=[], ip_addresses=[])


def test_ensure_server_material_rejects_foreign_server_cert(tmp_path: Path) -> None:
    pki.ensure_server_material(tmp_path, hostnames=["gw1"], ip_addresses=[])
    other_ca, _ = pki.create_ca("Other CA")
    pki.write_cert_pem(other_ca, tmp_path / "ca.pem", force=True)
    with pytest.raises(ValueError, match="was not issued by the CA"):
        pki.ensure_server_material(tmp_path, hostnames=["gw1"], ip_addresses=[])


def test_cert_info(tmp_path: Path, ca: tuple[x509.Certificate, rsa.RSAPrivateKey]) -> None:
    cert, _ = pki.issue_client_cert(*ca, "hmi-2", role="Engineer", days=100)
    path = pki.write_cert_pem(cert, tmp_path / "hmi.pem")
    info = pki.cert_info(path)
    assert info.path == path
    assert info.subject == "CN=hmi-2" and info.issuer == "CN=Test CA"
    assert info.common_name == "hmi-2"
    assert info.modbus_role == "Engineer"
    assert info.days_left in (99, 100)
    assert not info.is_ca and not info.self_signed
    assert info.public_key == "RSA 2048"
    assert info.extended_key_usage == ("clientAuth",)
    assert info.key_usage == ("digitalSignature", "keyEncipherment")
    assert info.not_after == cert.not_valid_after_utc
    assert len(info.sha256_fingerprint) == 64
    ca_info = pki.cert_info(ca[0])
    assert ca_info.is_ca and ca_info.self_signed and ca_info.path is None
    assert ca_info.key_usage == ("keyCertSign", "cRLSign")


def test_check_validity(tmp_path: Path, ca: tuple[x509.Certificate, rsa.RSAPrivateKey]) -> None:
    fresh = pki.write_cert_pem(pki.issue_client_cert(*ca, "ok")[0], tmp_path / "ok.pem")
    assert pki.check_validity(fresh) is None

    soon_cert, _ = pki.issue_client_cert(*ca, "soon", days=10)
    soon = pki.write_cert_pem(soon_cert, tmp_path / "soon.pem")
    warning = pki.check_validity(soon)
    assert warning is not None
    assert str(soon) in warning and f"{soon_cert.not_valid_after_utc:%Y-%m-%d}" in warning
    assert "in 9 days" in warning or "in 10 days" in warning
    assert pki.check_validity(soon, warn_days=5) is None

    old_cert, _ = pki.issue_client_cert(*ca, "old", days=-1)
    old = pki.write_cert_pem(old_cert, tmp_path / "old.pem")
    with pytest.raises(pki.CertificateExpiredError, match="expired on") as err:
        pki.check_validity(old)
    assert str(old) in str(err.value)
    assert f"{old_cert.not_valid_after_utc:%Y-%m-%d}" in str(err.value)
    assert err.value.path == old and err.value.not_after == old_cert.not_valid_after_utc

    start = dt.datetime.now(UTC) + dt.timedelta(days=3)
    future = pki.write_cert_pem(
        pki.issue_client_cert(*ca, "future", not_before=start)[0], tmp_path / "future.pem"
    )
    with pytest.raises(pki.CertificateExpiredError, match=r"not valid before .*clock"):
        pki.check_validity(future)
    # an injected clock sees the same file as fine later on
    assert pki.check_validity(future, now=start + dt.timedelta(days=1)) is None


def test_check_validity_checks_every_certificate_of_a_bundle(
    tmp_path: Path, ca: tuple[x509.Certificate, rsa.RSAPrivateKey]
) -> None:
    leaf, _ = pki.issue_client_cert(*ca, "leaf")
    expired_ca, _ = pki.create_ca("Old CA", days=-1)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(
        pki.write_cert_pem(leaf, tmp_path / "a.pem").read_bytes()
        + pki.write_cert_pem(expired_ca, tmp_path / "b.pem").read_bytes()
    )
    assert len(pki.load_cert_chain(bundle)) == 2
    with pytest.raises(pki.CertificateExpiredError, match="Old CA"):
        pki.check_validity(bundle)


def test_ensure_server_material_accepts_intermediate_chain(tmp_path: Path) -> None:
    root_cert, root_key = pki.create_ca("Corporate Root")
    # an intermediate CA: our create_ca makes roots only, so build one by hand
    inter_key = pki.generate_key()
    now = dt.datetime.now(UTC)
    inter_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Plant Issuing CA")]))
        .issuer_name(root_cert.subject)
        .public_key(inter_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(inter_key.public_key()), critical=False
        )
        .sign(root_key, hashes.SHA256())
    )
    leaf, leaf_key = pki.issue_server_cert(
        inter_cert, inter_key, "gw1", dns_names=["gw1"], ip_addresses=[]
    )
    pki.write_cert_pem(root_cert, tmp_path / "ca.pem")
    pki.write_key_pem(leaf_key, tmp_path / "server.key")
    chain = tmp_path / "server.pem"
    pki.write_cert_pem(leaf, chain)
    with pytest.raises(ValueError, match="was not issued by the CA"):  # intermediate missing
        pki.ensure_server_material(tmp_path, hostnames=["gw1"], ip_addresses=[])
    chain.write_bytes(
        chain.read_bytes() + pki.write_cert_pem(inter_cert, tmp_path / "i.pem").read_bytes()
    )
    material = pki.ensure_server_material(tmp_path, hostnames=["gw1"], ip_addresses=[])
    assert material.cert == leaf and material.ca_cert == root_cert and material.created == ()
