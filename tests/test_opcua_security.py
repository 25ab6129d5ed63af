"""Trust list (trusted / issuers / CRLs / rejected) and the user manager, without a network."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from asyncua import ua
from asyncua.common.utils import ServiceError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from twisted.internet import task
from twisted.internet.defer import Deferred

from iotserver.opcua.security import (
    ClientCertificateValidator,
    IotUser,
    IotUserManager,
    TrustList,
    layout,
)
from iotserver.security import pki
from iotserver.security.login import Logins
from iotserver.security.users import Role, User, UserDB, hash_password


def app_cert(ca: tuple[x509.Certificate, object], name: str, uri: str = "urn:t:c"
             ) -> x509.Certificate:
    cert, _ = pki.issue_opcua_app_cert(ca[0], ca[1], uri, common_name=name,  # type: ignore[arg-type]
                                       dns_names=["localhost"], ip_addresses=[])
    return cert


def crl(ca: tuple[x509.Certificate, object], serials: list[int]) -> bytes:
    now = dt.datetime.now(dt.UTC)
    builder = x509.CertificateRevocationListBuilder().issuer_name(ca[0].subject) \
        .last_update(now).next_update(now + dt.timedelta(days=1))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    return builder.sign(ca[1], hashes.SHA256()).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ca() -> tuple[x509.Certificate, object]:
    return pki.create_ca("test CA")


def test_trusted_by_file_by_ca_and_revoked_by_crl(tmp_path: Path, ca: tuple) -> None:
    layout(tmp_path)
    trust = TrustList(tmp_path)
    alice, bob = app_cert(ca, "alice"), app_cert(ca, "bob")
    assert trust.check(alice) == ua.StatusCodes.BadCertificateUntrusted
    pki.write_cert_der(ca[0], tmp_path / "trusted" / "certs" / "ca.der")
    assert trust.check(alice) == 0 and trust.check(bob) == 0  # picked up without restart
    (tmp_path / "trusted" / "crl" / "ca.crl").write_bytes(crl(ca, [bob.serial_number]))
    assert trust.check(alice) == 0
    assert trust.check(bob) == ua.StatusCodes.BadCertificateRevoked


def test_intermediate_in_issuers_and_expired_certificates(tmp_path: Path, ca: tuple) -> None:
    layout(tmp_path)
    trust = TrustList(tmp_path)
    inter_cert, inter_key = pki.create_ca("intermediate")
    # re-sign the intermediate by the root so the chain is leaf -> intermediate -> root
    inter = (x509.CertificateBuilder().subject_name(inter_cert.subject)
             .issuer_name(ca[0].subject).public_key(inter_key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(inter_cert.not_valid_before_utc)
             .not_valid_after(inter_cert.not_valid_after_utc)
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(inter_key.public_key()),
                            critical=False)
             .sign(ca[1], hashes.SHA256()))  # type: ignore[arg-type]
    leaf = app_cert((inter, inter_key), "carol")
    pki.write_cert_der(ca[0], tmp_path / "trusted" / "certs" / "root.der")
    assert trust.check(leaf) == ua.StatusCodes.BadCertificateUntrusted
    pki.write_cert_der(inter, tmp_path / "issuers" / "certs" / "inter.der")
    assert trust.check(leaf) == 0
    old, _ = pki.issue_opcua_app_cert(ca[0], ca[1], "urn:t:c", common_name="old",  # type: ignore[arg-type]
                                      dns_names=["x"], ip_addresses=[], days=-1)
    assert trust.check(old) == ua.StatusCodes.BadCertificateTimeInvalid


def test_validator_rejects_copies_and_checks_uri(tmp_path: Path, ca: tuple) -> None:
    layout(tmp_path)
    validator = ClientCertificateValidator(TrustList(tmp_path))
    cert = app_cert(ca, "scada", uri="urn:t:scada")
    app = ua.ApplicationDescription(ApplicationUri="urn:t:scada")

    def run(c: x509.Certificate, a: ua.ApplicationDescription) -> int:
        coro = validator(c, a)
        try:
            coro.send(None)
        except StopIteration:
            return 0
        except ServiceError as exc:
            return int(exc.code)
        raise AssertionError("validator awaited something")

    assert run(cert, app) == ua.StatusCodes.BadCertificateUntrusted
    (rejected,) = (tmp_path / "rejected" / "certs").iterdir()
    assert rejected.name.startswith("scada [")
    shutil.move(str(rejected), tmp_path / "trusted" / "certs" / rejected.name)
    assert run(cert, app) == 0
    assert run(cert, ua.ApplicationDescription(ApplicationUri="urn:other")) == \
        ua.StatusCodes.BadCertificateUriInvalid


def aio(coro: Any) -> Any:
    """Run an asyncio coroutine (as asyncua's dispatch does) from a Twisted test."""
    return Deferred.fromFuture(asyncio.ensure_future(coro))


@pytest_twisted.ensureDeferred
async def test_user_manager_roles_throttle_and_certificates(tmp_path: Path, ca: tuple) -> None:
    """The awaitable login (what ActivateSession goes through) with the shared throttle."""
    layout(tmp_path)
    db = UserDB(users={
        "alice": User("alice", Role.ENGINEER, hash_password("pw", n=2**10)),
        "dave": User("dave", Role.OPERATOR, None, ("dave-cert",)),
    })
    clock = task.Clock()
    logins = Logins(lambda: db, clock)
    manager = IotUserManager(lambda: db, TrustList(tmp_path, [ca[0]]), allow_anonymous=False,
                             logins=logins)
    user = await aio(manager.login(peer="10.0.0.1", username="alice", password="pw"))
    assert isinstance(user, IotUser) and user.access == "engineer" and user.can_write
    assert await aio(manager.login(peer="10.0.0.1", username="admin", password="x")) is None
    assert await aio(manager.login(peer="10.0.0.1")) is None  # anonymous off
    for _ in range(logins.cfg.free_failures + 1):
        assert await aio(manager.login(peer="10.0.0.1", username="alice", password="wrong")) is None
    # throttled from that address (refused without hashing), not from another one
    assert await aio(manager.login(peer="10.0.0.1", username="alice", password="pw")) is None
    assert logins.stats["throttled"] == 1
    assert await aio(manager.login(peer="10.0.0.2", username="alice", password="pw")) is not None
    dave = app_cert(ca, "dave-cert")  # issued by the server's CA: trusted
    der = dave.public_bytes(serialization.Encoding.DER)
    user = manager.get_user(None, certificate=der)
    assert isinstance(user, IotUser) and user.name == "dave" and not user.can_write
    stranger = pki.issue_opcua_app_cert(*pki.create_ca("other CA"), "urn:x",  # type: ignore[arg-type]
                                        common_name="dave-cert", dns_names=["x"],
                                        ip_addresses=[])[0]
    assert manager.get_user(None, certificate=stranger.public_bytes(
        serialization.Encoding.DER)) is None  # same CN, untrusted issuer
