"""``iotserver certs``: init, client, show, refusal to overwrite, config-derived places."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509

from iotserver import cli
from iotserver.security import pki


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = tmp_path / "state"
    monkeypatch.setenv("IOTSERVER_DATA_DIR", str(data))
    return data


def test_init_creates_ca_server_and_opcua_certificates(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = cli.main(["certs", "init", "--hostname", "gw1.plant.local", "--hostname", "localhost",
                   "--ip", "10.0.0.5", "--application-uri", "urn:gw1:iotserver"])
    assert rc == 0
    tls = data_dir / "tls"
    assert mode(data_dir) == 0o700 and mode(tls) == 0o700
    for key in (tls / "ca.key", tls / "server.key",
                data_dir / "opcua/pki/own/private/iotserver.pem"):
        assert mode(key) == 0o600, key
    out = capsys.readouterr().out
    assert f"wrote {tls / 'server.pem'}" in out and "clients must trust" in out

    server = pki.cert_info(tls / "server.pem")
    assert server.dns_names == ("gw1.plant.local", "localhost")
    assert server.ip_addresses == ("10.0.0.5",)
    app = pki.cert_info(data_dir / "opcua/pki/own/certs/iotserver.der")
    assert app.uris == ("urn:gw1:iotserver",)  # SAN URI == ApplicationUri
    assert not app.is_ca and app.issuer == pki.cert_info(tls / "ca.pem").subject
    issuer_copy = data_dir / "opcua/pki/issuers/certs/iotserver-ca.der"
    assert pki.load_cert(issuer_copy) == pki.load_cert(tls / "ca.pem")
    # the server accepts what init wrote, without creating anything
    material = pki.ensure_server_material(tls, hostnames=["other"], ip_addresses=[])
    assert material.created == ()
    assert material.cert.subject == pki.load_cert(tls / "server.pem").subject


def test_init_never_overwrites_without_force(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["certs", "init"]) == 0
    ca_before = (data_dir / "tls" / "ca.pem").read_bytes()
    capsys.readouterr()
    assert cli.main(["certs", "init"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already exists; use --force" in err
    assert (data_dir / "tls" / "ca.pem").read_bytes() == ca_before

    # --renew keeps the CA and needs --force for the existing server certificates
    assert cli.main(["certs", "init", "--renew"]) == 1
    server_before = (data_dir / "tls" / "server.pem").read_bytes()
    assert cli.main(["certs", "init", "--renew", "--force", "--hostname", "new.local"]) == 0
    assert (data_dir / "tls" / "ca.pem").read_bytes() == ca_before
    assert (data_dir / "tls" / "server.pem").read_bytes() != server_before
    assert pki.cert_info(data_dir / "tls" / "server.pem").dns_names == ("new.local",)

    assert cli.main(["certs", "init", "--force"]) == 0
    assert (data_dir / "tls" / "ca.pem").read_bytes() != ca_before
    assert "no longer valid" in capsys.readouterr().out


def test_client_certificates_with_roles(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["certs", "client", "alice"]) == 1
    assert "run 'iotserver certs init' first" in capsys.readouterr().err
    assert cli.main(["certs", "init"]) == 0
    assert cli.main(["certs", "client", "alice", "--role", "engineer"]) == 0
    out = capsys.readouterr().out
    assert "--cert-name alice" in out
    cert_path = data_dir / "tls" / "clients" / "alice.pem"
    assert mode(data_dir / "tls" / "clients" / "alice.key") == 0o600
    info = pki.cert_info(cert_path)
    assert info.common_name == "alice" and info.modbus_role == "engineer"
    assert "clientAuth" in info.extended_key_usage
    cert = pki.load_cert(cert_path)
    cert.verify_directly_issued_by(pki.load_cert(data_dir / "tls" / "ca.pem"))

    assert cli.main(["certs", "client", "alice"]) == 1
    assert "use --force" in capsys.readouterr().err
    assert cli.main(["certs", "client", "plc-writer", "--role", "ModbusWriter",
                     "--out", str(tmp_path / "out"), "--days", "30"]) == 0
    written = pki.cert_info(tmp_path / "out" / "plc-writer.pem")
    assert written.modbus_role == "ModbusWriter" and written.days_left in (29, 30)
    assert cli.main(["certs", "client", "../evil"]) == 1
    assert "client name" in capsys.readouterr().err


def test_show_lists_names_and_expiry(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["certs", "show"]) == 0
    assert "no certificates" in capsys.readouterr().out
    assert cli.main(["certs", "init", "--hostname", "gw1"]) == 0
    assert cli.main(["certs", "client", "bob", "--role", "operator", "--days", "10"]) == 0
    capsys.readouterr()
    assert cli.main(["certs", "show"]) == 0
    out = capsys.readouterr().out
    assert "CN=iotserver local CA (gw1)" in out
    assert "DNS:gw1, IP:127.0.0.1" in out
    assert "URI:urn:" in out
    assert "role      operator" in out
    blocks = {b.splitlines()[0]: b for b in out.strip().split("\n\n")}
    bob = blocks[str(data_dir / "tls" / "clients" / "bob.pem")]
    assert "WARNING: expires within 30 days" in bob and "days left" in bob
    assert "WARNING" not in blocks[str(data_dir / "tls" / "server.pem")]

    # an expired certificate makes show fail (usable from monitoring)
    ca = pki.load_cert(data_dir / "tls" / "ca.pem")
    ca_key = pki.load_key(data_dir / "tls" / "ca.key")
    old, _ = pki.issue_client_cert(ca, ca_key, "old", days=1,  # type: ignore[arg-type]
                                   not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=5))
    pki.write_cert_pem(old, data_dir / "tls" / "clients" / "old.pem")
    assert cli.main(["certs", "show"]) == 1
    assert "EXPIRED" in capsys.readouterr().out


def test_dir_and_config_choose_the_places(tmp_path: Path, data_dir: Path) -> None:
    conf = tmp_path / "server.toml"
    conf.write_text(f"""
[server]
data_dir = "{tmp_path / 'srv'}"
hostnames = ["press.local"]
ip_addresses = ["192.168.1.7"]
""")
    assert cli.main(["certs", "init", "--config", str(conf)]) == 0
    server = pki.cert_info(tmp_path / "srv" / "tls" / "server.pem")
    assert server.dns_names == ("press.local",) and server.ip_addresses == ("192.168.1.7",)
    assert (tmp_path / "srv" / "opcua" / "pki" / "own" / "certs" / "iotserver.der").exists()

    elsewhere = tmp_path / "etc-tls"
    assert cli.main(["certs", "init", "--dir", str(elsewhere), "--ip", "10.1.1.1"]) == 0
    assert (elsewhere / "server.pem").exists()
    assert (elsewhere / "opcua-pki" / "own" / "certs" / "iotserver.der").exists()
    assert not data_dir.exists()  # the default data directory was never touched
    der = (elsewhere / "opcua-pki" / "own" / "certs" / "iotserver.der").read_bytes()
    assert x509.load_der_x509_certificate(der).subject.rfc4514_string() == "CN=iotserver@localhost"


def test_bad_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nbogus = 1\n")
    assert cli.main(["certs", "show", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("iotserver certs: configuration error:") and "bogus" in err


def test_init_and_crl_write_the_local_ca_crl(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from iotserver.security import pki_crl

    assert cli.main(["certs", "crl"]) == 1  # no CA yet: one line, no traceback
    assert "certs init" in capsys.readouterr().err
    assert cli.main(["certs", "init"]) == 0
    tls = data_dir / "tls"
    ca = pki.load_cert(tls / "ca.pem")
    crl = pki_crl.load_crl(tls / "ca.crl")
    assert crl.issuer == ca.subject and crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    copy = data_dir / "opcua/pki/issuers/crl/iotserver-ca.crl"
    assert x509.load_der_x509_crl(copy.read_bytes()) == crl
    assert "import " + str(tls / "ca.crl") in capsys.readouterr().out

    assert cli.main(["certs", "crl", "--days", "10"]) == 0
    out = capsys.readouterr().out
    renewed = pki_crl.load_crl(tls / "ca.crl")
    assert pki_crl.crl_number(renewed) == pki_crl.crl_number(crl) + 1
    assert x509.load_der_x509_crl(copy.read_bytes()) == renewed
    assert f"wrote {copy}" in out and "CRL number 2" in out
    assert cli.main(["certs", "show", "--warn-days", "30"]) == 0
    out = capsys.readouterr().out
    assert str(tls / "ca.crl") in out and "WARNING: next update within 30 days" in out
