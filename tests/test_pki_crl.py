"""The local CA's CRL: issue, keep current, publish (``iotserver.security.pki_crl``)."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.task import Clock

from iotserver.security import pki, pki_crl

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def tls(tmp_path: Path) -> Path:
    folder = tmp_path / "tls"
    pki.ensure_server_material(folder, hostnames=["localhost"], ip_addresses=["127.0.0.1"])
    return folder


def _revoked(serial: int) -> x509.RevokedCertificate:
    return (x509.RevokedCertificateBuilder().serial_number(serial)
            .revocation_date(NOW - dt.timedelta(days=1)).build())


def test_issue_crl_is_signed_by_the_ca_and_has_a_next_update(tls: Path) -> None:
    ca, key = pki.load_cert(tls / "ca.pem"), pki.load_key(tls / "ca.key")
    crl = pki_crl.issue_crl(ca, key, number=7, days=30, now=NOW)  # type: ignore[arg-type]
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl.issuer == ca.subject
    assert crl.last_update_utc <= NOW
    assert crl.next_update_utc == NOW + dt.timedelta(days=30)
    assert len(list(crl)) == 0 and pki_crl.crl_number(crl) == 7
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest  # clients find the issuer by its key id


def test_issue_crl_refuses_a_key_of_another_ca(tls: Path) -> None:
    ca = pki.load_cert(tls / "ca.pem")
    _, other_key = pki.create_ca("someone else")
    with pytest.raises(ValueError, match="does not belong"):
        pki_crl.issue_crl(ca, other_key)


def test_ensure_crl_creates_once_then_keeps_it(tls: Path) -> None:
    first = pki_crl.ensure_crl(tls, now=NOW)
    assert first.renewed and first.problem is None and first.path == tls / "ca.crl"
    assert (tls / "ca.crl").read_bytes().startswith(b"-----BEGIN X509 CRL-----")
    assert stat.S_IMODE((tls / "ca.crl").stat().st_mode) == 0o644
    data = (tls / "ca.crl").read_bytes()
    again = pki_crl.ensure_crl(tls, now=NOW + dt.timedelta(days=300))
    assert not again.renewed and (tls / "ca.crl").read_bytes() == data


@pytest.mark.parametrize("days_later", [340, 400])  # near, and past, its nextUpdate
def test_ensure_crl_renews_near_or_past_expiry_keeping_entries(tls: Path,
                                                              days_later: int) -> None:
    ca, key = pki.load_cert(tls / "ca.pem"), pki.load_key(tls / "ca.key")
    old = pki_crl.issue_crl(ca, key, number=4, revoked=[_revoked(1234)],  # type: ignore[arg-type]
                            now=NOW)
    (tls / "ca.crl").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    later = NOW + dt.timedelta(days=days_later)
    state = pki_crl.ensure_crl(tls, now=later)
    assert state.renewed and state.crl is not None
    assert state.crl.next_update_utc == later + dt.timedelta(days=pki_crl.CRL_DAYS)
    assert pki_crl.crl_number(state.crl) == 5
    assert state.crl.get_revoked_certificate_by_serial_number(1234) is not None
    assert pki_crl.load_crl(tls / "ca.crl") == state.crl


def test_a_crl_of_another_ca_or_garbage_is_replaced(tls: Path) -> None:
    other_ca, other_key = pki.create_ca("old CA")
    foreign = pki_crl.issue_crl(other_ca, other_key, number=9, revoked=[_revoked(5)], now=NOW)
    (tls / "ca.crl").write_bytes(foreign.public_bytes(serialization.Encoding.DER))
    state = pki_crl.ensure_crl(tls, now=NOW)
    assert state.renewed and state.crl is not None
    assert state.crl.issuer == pki.load_cert(tls / "ca.pem").subject
    assert pki_crl.crl_number(state.crl) == 1 and len(list(state.crl)) == 0
    (tls / "ca.crl").write_bytes(b"not a CRL")
    assert pki_crl.ensure_crl(tls, now=NOW).renewed


def test_without_the_ca_key_a_stale_crl_is_a_warning_not_a_guess(tls: Path) -> None:
    pki_crl.ensure_crl(tls, now=NOW)
    (tls / "ca.key").rename(tls.parent / "ca.key.offline")
    fresh = pki_crl.ensure_crl(tls, now=NOW + dt.timedelta(days=10))
    assert fresh.problem is None and not fresh.renewed
    stale = pki_crl.ensure_crl(tls, now=NOW + dt.timedelta(days=400))
    assert not stale.renewed and stale.crl is not None
    assert stale.problem is not None and "expired" in stale.problem
    assert "iotserver certs crl" in stale.problem
    (tls / "ca.crl").unlink()
    missing = pki_crl.ensure_crl(tls, now=NOW)
    assert missing.crl is None and missing.problem is not None and not (tls / "ca.crl").exists()


def test_renewal_reason() -> None:
    ca, key = pki.create_ca("CA")
    crl = pki_crl.issue_crl(ca, key, days=100, now=NOW)
    assert pki_crl.renewal_reason(None, ca, now=NOW) == "there is no CRL"
    assert pki_crl.renewal_reason(crl, ca, now=NOW) is None
    assert "expires" in (pki_crl.renewal_reason(crl, ca, now=NOW + dt.timedelta(days=80)) or "")
    assert "expired" in (pki_crl.renewal_reason(crl, ca, now=NOW + dt.timedelta(days=101)) or "")
    other, _ = pki.create_ca("CA")  # same name, other key: the signature decides
    assert "not signed" in (pki_crl.renewal_reason(crl, other, now=NOW) or "")


def test_keeper_publishes_der_copies_and_renews_on_its_daily_check(tls: Path,
                                                                  tmp_path: Path) -> None:
    clock = Clock()
    today = [NOW]
    warnings: list[str] = []
    keeper = pki_crl.CrlKeeper(tls, clock, warn=warnings.append, now=lambda: today[0])
    keeper.start()
    issuers = tmp_path / "pki" / "issuers" / "crl"
    copy = keeper.add_folder(issuers)
    assert copy == issuers / pki_crl.OPCUA_CRL_NAME
    first = x509.load_der_x509_crl(copy.read_bytes())
    assert first == pki_crl.load_crl(tls / "ca.crl")
    clock.advance(pki_crl.CHECK_INTERVAL_S)  # a day later: nothing to do
    assert x509.load_der_x509_crl(copy.read_bytes()) == first
    today[0] = NOW + dt.timedelta(days=pki_crl.CRL_DAYS - 1)
    clock.advance(pki_crl.CHECK_INTERVAL_S)
    renewed = x509.load_der_x509_crl(copy.read_bytes())
    assert pki_crl.crl_number(renewed) == pki_crl.crl_number(first) + 1
    assert renewed.next_update_utc is not None and renewed.next_update_utc > today[0]
    assert warnings == []
    keeper.stop()
    assert clock.getDelayedCalls() == []
    keeper.stop()  # idempotent


def test_keeper_warns_and_keeps_checking_when_the_key_is_gone(tls: Path) -> None:
    clock = Clock()
    today = [NOW]
    warnings: list[str] = []
    keeper = pki_crl.CrlKeeper(tls, clock, warn=warnings.append, now=lambda: today[0])
    keeper.start()
    (tls / "ca.key").unlink()
    today[0] = NOW + dt.timedelta(days=400)
    clock.advance(pki_crl.CHECK_INTERVAL_S)
    assert len(warnings) == 1 and "expired" in warnings[0]
    assert len(clock.getDelayedCalls()) == 1
    keeper.stop()
