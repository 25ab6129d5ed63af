"""Tests for iotserver.security.tls: real TLS handshakes on loopback, endpoint strings."""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from iotserver.security import pki
from iotserver.security.tls import (
    cert_identity,
    client_context_factory,
    parse_tls_description,
    peer_certificate,
    reload_tls,
    server_context_factory,
    server_endpoint,
)

TIMEOUT = 10


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    foreign_cert: Path  # issued by another CA, same name
    foreign_key: Path


@pytest.fixture(scope="module")
def pki_files(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("tls")
    material = pki.ensure_server_material(d, hostnames=["localhost"], ip_addresses=["127.0.0.1"])
    ca_key = pki.load_key(d / "ca.key")
    cert, key = pki.issue_client_cert(material.ca_cert, ca_key, "plc-7", role="Operator")  # type: ignore[arg-type]
    pki.write_cert_pem(cert, d / "client.pem")
    pki.write_key_pem(key, d / "client.key")
    other_ca, other_key = pki.create_ca("Rogue CA")
    cert, key = pki.issue_client_cert(other_ca, other_key, "plc-7")
    pki.write_cert_pem(cert, d / "foreign.pem")
    pki.write_key_pem(key, d / "foreign.key")
    return Pki(
        material.ca_cert_path,
        material.cert_path,
        material.key_path,
        d / "client.pem",
        d / "client.key",
        d / "foreign.pem",
        d / "foreign.key",
    )


@pytest.fixture
def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


# ----------------------------------------------------------------------------- test peers


@implementer(IHandshakeListener)
class EchoServer(Protocol):
    """Echoes; on handshake records who the peer is (or greets it and hangs up, for s_client)."""

    factory: ServerFactory

    def connectionMade(self) -> None:
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self.factory.connections.append(self)

    def handshakeCompleted(self) -> None:
        cert = peer_certificate(self.transport)
        identity = cert_identity(cert) if cert is not None else None
        self.factory.identities.append(identity)
        self.factory.roles.append(pki.read_modbus_role(cert) if cert is not None else None)
        if self.factory.greet:
            assert self.transport is not None
            self.transport.write(f"hello {identity}\n".encode())
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        # a Deferred fired with a Failure errbacks: keep the reason aside
        self.reason = reason
        self.lost.callback(None)


@dataclass
class ServerFactory(Factory):
    greet: bool = False
    connections: list[EchoServer] = field(default_factory=list)
    identities: list[str | None] = field(default_factory=list)
    roles: list[str | None] = field(default_factory=list)
    protocol = EchoServer

    async def all_closed(self, reactor: Any) -> None:
        for conn in self.connections:
            await conn.lost.addTimeout(TIMEOUT, reactor)


class PingClient(Protocol):
    """Sends ping, hangs up once it is echoed."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"ping")

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received == b"ping":
            assert self.transport is not None
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        # a Deferred fired with a Failure errbacks: keep the reason aside
        self.reason = reason
        self.lost.callback(None)


async def ping(reactor: Any, port: int, client_ctx: Any) -> tuple[PingClient, Failure]:
    endpoint = wrapClientTLS(client_ctx, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    client = await connectProtocol(endpoint, PingClient()).addTimeout(TIMEOUT, reactor)
    await client.lost.addTimeout(TIMEOUT, reactor)
    assert client.reason is not None
    return client, client.reason


def tls_description(port: int, files: Pki, client_auth: str | None = "required") -> str:
    desc = f"tls:{port}:interface=127.0.0.1:cert={files.server_cert}:key={files.server_key}"
    if client_auth is not None:
        desc += f":ca={files.ca}:clientAuth={client_auth}"
    return desc


async def serve_and_ping(
    reactor: Any, description: str, client_ctx: Any, **server_kw: Any
) -> tuple[ServerFactory, PingClient, Failure]:
    """Listen on ``description`` (port 0: the port is read back), run one ping session,
    close everything."""
    factory = ServerFactory(**server_kw)
    listening = await server_endpoint(reactor, description).listen(factory)
    try:
        client, reason = await ping(reactor, listening.getHost().port, client_ctx)
        await factory.all_closed(reactor)
    finally:
        await listening.stopListening()
    return factory, client, reason


# ----------------------------------------------------------------------------- handshakes


@pytest_twisted.ensureDeferred
async def test_client_with_our_certificate_is_accepted(
    reactor: Any, pki_files: Pki
) -> None:
    ctx = client_context_factory(
        "localhost",
        ca_path=pki_files.ca,
        cert_path=pki_files.client_cert,
        key_path=pki_files.client_key,
    )
    factory, client, _reason = await serve_and_ping(
        reactor, tls_description(0, pki_files), ctx
    )
    assert client.received == b"ping"
    assert factory.identities == ["plc-7"]
    assert factory.roles == ["Operator"]


@pytest.mark.parametrize("which", ["no certificate", "other CA"])
@pytest_twisted.ensureDeferred
async def test_client_without_valid_certificate_is_refused(
    reactor: Any, pki_files: Pki, which: str
) -> None:
    if which == "no certificate":
        ctx = client_context_factory("localhost", ca_path=pki_files.ca)
    else:
        ctx = client_context_factory(
            "localhost",
            ca_path=pki_files.ca,
            cert_path=pki_files.foreign_cert,
            key_path=pki_files.foreign_key,
        )
    factory, client, reason = await serve_and_ping(
        reactor, tls_description(0, pki_files), ctx
    )
    assert client.received == b""
    assert factory.identities == []  # the server never completed a handshake
    # TLS 1.3: the client learns of the refusal from the server's alert after its own Finished
    assert reason.check(SSL.Error) is not None, reason
    server_reason = factory.connections[0].reason
    assert server_reason is not None and server_reason.check(SSL.Error) is not None, server_reason


@pytest_twisted.ensureDeferred
async def test_optional_client_certificate(reactor: Any, pki_files: Pki) -> None:
    desc = tls_description(0, pki_files, client_auth="optional")
    anonymous = client_context_factory("localhost", ca_path=pki_files.ca)
    factory, client, _ = await serve_and_ping(reactor, desc, anonymous)
    assert client.received == b"ping" and factory.identities == [None]

    with_cert = client_context_factory(
        "127.0.0.1",
        ca_path=pki_files.ca,
        cert_path=pki_files.client_cert,
        key_path=pki_files.client_key,
    )
    factory, client, _ = await serve_and_ping(reactor, desc, with_cert)
    assert client.received == b"ping" and factory.identities == ["plc-7"]

    # optional still means verified: a certificate from another CA fails the handshake
    foreign = client_context_factory(
        "localhost",
        ca_path=pki_files.ca,
        cert_path=pki_files.foreign_cert,
        key_path=pki_files.foreign_key,
    )
    factory, client, _reason = await serve_and_ping(reactor, desc, foreign)
    assert client.received == b"" and factory.identities == []


@pytest_twisted.ensureDeferred
async def test_server_without_client_auth(reactor: Any, pki_files: Pki) -> None:
    desc = tls_description(0, pki_files, client_auth=None)
    ctx = client_context_factory(
        "localhost",
        ca_path=pki_files.ca,
        cert_path=pki_files.client_cert,
        key_path=pki_files.client_key,
    )
    factory, client, _ = await serve_and_ping(reactor, desc, ctx)
    # no CertificateRequest was sent, so the client's certificate never reaches the server
    assert client.received == b"ping" and factory.identities == [None]


@pytest_twisted.ensureDeferred
async def test_client_checks_the_server_name(reactor: Any, pki_files: Pki) -> None:
    desc = tls_description(0, pki_files, client_auth=None)
    wrong = client_context_factory("plc.example.com", ca_path=pki_files.ca)
    _factory, client, reason = await serve_and_ping(reactor, desc, wrong)
    assert client.received == b""
    assert reason.check(VerificationError) and "plc.example.com" in str(reason.value), reason

    wrong_ip = client_context_factory("127.0.0.2", ca_path=pki_files.ca)
    _factory, client, reason = await serve_and_ping(reactor, desc, wrong_ip)
    assert client.received == b""
    assert reason.check(VerificationError) and "127.0.0.2" in str(reason.value), reason


@pytest_twisted.ensureDeferred
async def test_client_checks_the_server_ca(reactor: Any, pki_files: Pki) -> None:
    desc = tls_description(0, pki_files, client_auth=None)
    untrusting = client_context_factory("localhost", ca_path=pki_files.foreign_cert)
    _factory, client, reason = await serve_and_ping(reactor, desc, untrusting)
    assert client.received == b"" and reason.check(SSL.Error), reason


@pytest_twisted.ensureDeferred
async def test_context_factory_passed_by_caller(
    reactor: Any, pki_files: Pki
) -> None:
    server_ctx = server_context_factory(
        pki_files.server_cert,
        pki_files.server_key,
        ca_path=pki_files.ca,
        require_client_cert=True,
    )
    assert IOpenSSLServerConnectionCreator.providedBy(server_ctx)
    factory = ServerFactory()
    endpoint = server_endpoint(reactor, "tls:0:interface=127.0.0.1", server_ctx)
    listening = await endpoint.listen(factory)
    try:
        ctx = client_context_factory(
            "127.0.0.1",
            ca_path=pki_files.ca,
            cert_path=pki_files.client_cert,
            key_path=pki_files.client_key,
        )
        client, _ = await ping(reactor, listening.getHost().port, ctx)
        await factory.all_closed(reactor)
    finally:
        await listening.stopListening()
    assert client.received == b"ping" and factory.identities == ["plc-7"]


# ----------------------------------------------------------------------------- unit level


def test_server_context_settings(pki_files: Pki) -> None:
    options: Any = server_context_factory(
        pki_files.server_cert, pki_files.server_key, ca_path=pki_files.ca
    )
    context = options.getContext()
    flags = context.set_options(0)  # returns the current option mask
    for old in (SSL.OP_NO_SSLv3, SSL.OP_NO_TLSv1, SSL.OP_NO_TLSv1_1):
        assert flags & old
    assert not flags & SSL.OP_NO_TLSv1_2 and not flags & SSL.OP_NO_TLSv1_3
    assert context.get_verify_mode() == SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE
    # the CertificateRequest names our CA (clients with several certificates choose by it)
    ca_names = SSL.Connection(context, None).get_client_ca_list(as_cryptography=True)
    assert ca_names == [pki.load_cert(pki_files.ca).subject]

    required: Any = server_context_factory(
        pki_files.server_cert,
        pki_files.server_key,
        ca_path=pki_files.ca,
        require_client_cert=True,
    )
    assert required.getContext().get_verify_mode() & SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    plain: Any = server_context_factory(pki_files.server_cert, pki_files.server_key)
    assert plain.getContext().get_verify_mode() == SSL.VERIFY_NONE


def test_server_context_argument_errors(tmp_path: Path, pki_files: Pki) -> None:
    with pytest.raises(ValueError, match="needs ca_path"):
        server_context_factory(pki_files.server_cert, pki_files.server_key, verify_client_cert=True)
    with pytest.raises(ValueError, match="needs client certificate verification"):
        server_context_factory(
            pki_files.server_cert, pki_files.server_key, require_client_cert=True
        )
    with pytest.raises(ValueError, match="is not the private key of"):
        server_context_factory(pki_files.server_cert, pki_files.client_key)
    with pytest.raises(FileNotFoundError):
        server_context_factory(tmp_path / "missing.pem", pki_files.server_key)
    with pytest.raises(ValueError, match="both cert_path and key_path"):
        client_context_factory("localhost", ca_path=pki_files.ca, cert_path=pki_files.client_cert)


def _chain_sent(server_ctx: Any) -> list[str]:
    """Handshake in memory (no socket) and return the subjects of the certificates the
    server sent, leaf first."""
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_connect_state()
    for _ in range(20):  # a TLS handshake takes a few flights
        for conn in (client, server):
            with contextlib.suppress(SSL.WantReadError):
                conn.do_handshake()
        for src, dst in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                dst.bio_write(src.bio_read(65536))
        chain = client.get_peer_cert_chain(as_cryptography=True)
        if chain and client.get_state_string() == b"SSL negotiation finished successfully":
            return [c.subject.rfc4514_string() for c in chain]
    raise AssertionError("the in-memory handshake did not finish")


def test_server_context_sends_chain_from_bundle(tmp_path: Path, pki_files: Pki) -> None:
    from cryptography import x509

    def subject(path: Path) -> str:
        return x509.load_pem_x509_certificate(path.read_bytes()).subject.rfc4514_string()

    bundle = tmp_path / "chain.pem"
    bundle.write_bytes(pki_files.server_cert.read_bytes() + pki_files.ca.read_bytes())
    ctx = server_context_factory(bundle, pki_files.server_key).getContext()  # leaf first
    assert _chain_sent(ctx) == [subject(pki_files.server_cert), subject(pki_files.ca)]
    leaf_only = server_context_factory(pki_files.server_cert, pki_files.server_key).getContext()
    assert _chain_sent(leaf_only) == [subject(pki_files.server_cert)]


def test_cert_identity_fallbacks() -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    ca_cert, ca_key = pki.create_ca("id CA")
    cert, _ = pki.issue_client_cert(ca_cert, ca_key, "hmi-1")
    assert cert_identity(cert) == "hmi-1"

    def bare(san: list[x509.GeneralName] | None) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(ca_cert.subject)
            .public_key(ca_key.public_key())
            .serial_number(1)
            .not_valid_before(cert.not_valid_before_utc)
            .not_valid_after(cert.not_valid_after_utc)
        )
        if san is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=True)
        return builder.sign(ca_key, hashes.SHA256())

    assert cert_identity(bare([x509.DNSName("dev.plant")])) == "dev.plant"
    assert cert_identity(bare([x509.RFC822Name("ops@plant")])) == "ops@plant"
    uri = bare([x509.UniformResourceIdentifier("urn:plant:hmi"), x509.DNSName("later")])
    assert cert_identity(uri) == "urn:plant:hmi"
    with pytest.raises(ValueError, match="no CN"):
        cert_identity(bare(None))


def test_peer_certificate_on_plain_transport() -> None:
    from twisted.internet.testing import StringTransport

    assert peer_certificate(StringTransport()) is None
    assert peer_certificate(object()) is None


def test_parse_tls_description() -> None:
    opts = parse_tls_description(
        r"tls:8883:interface=\:\:1:cert=/etc/a\:b.pem:key=k.pem:ca=ca.pem:clientAuth=required"
    )
    assert opts == {
        "port": "8883",
        "interface": "::1",
        "cert": "/etc/a:b.pem",
        "key": "k.pem",
        "ca": "ca.pem",
        "clientAuth": "required",
    }
    assert parse_tls_description("tls:port=802") == {"port": "802"}
    for bad, message in [
        ("tls:", "port must be a number"),
        ("tls:interface=x", "missing port"),
        ("tls:80:81", "unexpected positional"),
        ("tls:80:certfile=x", "unknown option 'certfile'"),
        ("tls:80:cert=a:cert=b", "given twice"),
        ("tls:80:clientAuth=yes", "clientAuth must be one of"),
        ("tls:80:backlog=lots", "backlog must be a number"),
        ("tls:80\\", "lone backslash"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_tls_description(bad)


def test_server_endpoint_choices(reactor: Any, pki_files: Pki) -> None:
    from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint

    assert isinstance(server_endpoint(reactor, "tcp:0:interface=127.0.0.1"), TCP4ServerEndpoint)
    ctx = server_context_factory(pki_files.server_cert, pki_files.server_key)
    assert isinstance(server_endpoint(reactor, "tls:0", ctx), SSL4ServerEndpoint)
    with pytest.raises(ValueError, match="only applies to tls"):
        server_endpoint(reactor, "tcp:0", ctx)
    with pytest.raises(ValueError, match="conflict with the context factory"):
        server_endpoint(reactor, f"tls:0:cert={pki_files.server_cert}", ctx)
    with pytest.raises(ValueError, match="missing cert and key"):
        server_endpoint(reactor, "tls:0")
    with pytest.raises(ValueError, match="clientAuth=required needs ca"):
        server_endpoint(
            reactor,
            f"tls:0:cert={pki_files.server_cert}:key={pki_files.server_key}:clientAuth=required",
        )


# ----------------------------------------------------------------------------- openssl s_client


async def s_client(port: int, *args: str) -> tuple[str, int]:
    from twisted.internet.utils import getProcessOutputAndValue

    out, err, code = await getProcessOutputAndValue(
        "/usr/bin/openssl",
        ["s_client", "-connect", f"127.0.0.1:{port}", "-ign_eof", *args],
    )
    return (out + err).decode("utf-8", "replace"), code


@pytest.mark.interop
@pytest.mark.skipif(not Path("/usr/bin/openssl").exists(), reason="needs /usr/bin/openssl")
@pytest_twisted.ensureDeferred
async def test_openssl_s_client(reactor: Any, pki_files: Pki) -> None:
    assert shutil.which("openssl")
    factory = ServerFactory(greet=True)
    listening = await server_endpoint(reactor, tls_description(0, pki_files)).listen(
        factory
    )
    port = listening.getHost().port
    try:
        common = ["-CAfile", str(pki_files.ca), "-verify_return_error"]
        output, code = await s_client(
            port,
            *common,
            "-servername",
            "localhost",
            "-verify_hostname",
            "localhost",
            "-cert",
            str(pki_files.client_cert),
            "-key",
            str(pki_files.client_key),
        )
        assert code == 0, output
        assert "hello plc-7" in output
        assert "Verify return code: 0 (ok)" in output
        assert "Acceptable client certificate CA names" in output and "iotserver local CA" in output

        output, code = await s_client(
            port,
            *common,
            "-tls1_2",
            "-cert",
            str(pki_files.client_cert),
            "-key",
            str(pki_files.client_key),
        )
        assert code == 0 and "hello plc-7" in output and "TLSv1.2" in output, output

        output, _ = await s_client(port, *common)  # no client certificate
        assert "hello" not in output
        assert "certificate required" in output or "alert" in output, output
        await factory.all_closed(reactor)
    finally:
        await listening.stopListening()
    assert factory.identities == ["plc-7", "plc-7"]


# ----------------------------------------------------------------------------- reloading


class CertClient(PingClient):
    """A PingClient that notes the server certificate it was shown."""

    def dataReceived(self, data: bytes) -> None:
        self.server_cert = peer_certificate(self.transport)
        super().dataReceived(data)


async def server_serial(reactor: Any, port: int, ca: Path) -> int:
    ctx = client_context_factory("localhost", ca_path=ca)
    endpoint = wrapClientTLS(ctx, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    client = await connectProtocol(endpoint, CertClient()).addTimeout(TIMEOUT, reactor)
    await client.lost.addTimeout(TIMEOUT, reactor)
    assert client.received == b"ping"
    return int(client.server_cert.serial_number)


def renew(d: Path, material: Any, **kw: Any) -> int:
    """Write a new server certificate and key over the old files; returns its serial."""
    cert, key = pki.issue_server_cert(material.ca_cert, pki.load_key(d / "ca.key"), "localhost",
                                      dns_names=["localhost"], ip_addresses=["127.0.0.1"], **kw)
    pki.write_cert_pem(cert, material.cert_path, force=True)
    pki.write_key_pem(key, material.key_path, force=True)
    return int(cert.serial_number)


@pytest_twisted.ensureDeferred
async def test_reload_serves_a_renewed_certificate_to_new_connections(
        reactor: Any, tmp_path: Path) -> None:
    material = pki.ensure_server_material(tmp_path, hostnames=["localhost"],
                                          ip_addresses=["127.0.0.1"])
    reloadable: list[Any] = []
    desc = (f"tls:0:interface=127.0.0.1:cert={material.cert_path}"
            f":key={material.key_path}")
    factory = ServerFactory()
    listening = await server_endpoint(reactor, desc, reloadable=reloadable).listen(factory)
    port = listening.getHost().port
    try:
        first = await server_serial(reactor, port, material.ca_cert_path)
        assert first == material.cert.serial_number and len(reloadable) == 1
        new = renew(tmp_path, material)
        assert await server_serial(reactor, port, material.ca_cert_path) == first
        assert reload_tls("test", reloadable) == []
        assert await server_serial(reactor, port, material.ca_cert_path) == new
        # a renewal that is already expired is refused; the current certificate stays
        good_cert, good_key = material.cert_path.read_bytes(), material.key_path.read_bytes()
        renew(tmp_path, material, days=-1)
        problems = reload_tls("test", reloadable)
        assert len(problems) == 1 and "expired" in problems[0]
        assert str(material.cert_path) in problems[0]
        assert await server_serial(reactor, port, material.ca_cert_path) == new
        # a key that does not belong to the certificate: refused as well
        material.cert_path.write_bytes(good_cert)
        other = pki.generate_key()
        pki.write_key_pem(other, material.key_path, force=True)
        problems = reload_tls("test", reloadable)
        assert len(problems) == 1 and "private key" in problems[0]
        material.key_path.write_bytes(good_key)
        assert reload_tls("test", reloadable) == []
        await factory.all_closed(reactor)
    finally:
        await listening.stopListening()
