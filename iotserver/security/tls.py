"""TLS contexts for our listeners and outgoing connections, and the peer-certificate helpers.

Listeners are configured with endpoint strings. Twisted's own ``ssl:`` server endpoint
(``ssl:8883:privateKey=...:certKey=...``) serves a certificate but cannot verify or require
client certificates, which Modbus/TCP Security (port 802) and certificate login for MQTT need.
Rather than register a Twisted endpoint plugin (a drop-in in ``twisted/plugins/`` would import
pyOpenSSL during twistd's plugin scan, which runs before twistd installs the reactor the user
asked for), ``server_endpoint`` recognises our own
``tls:`` prefix and passes every other description to ``serverFromString`` unchanged::

    tls:PORT[:interface=ADDR][:backlog=N][:cert=PATH:key=PATH][:ca=PATH]
        [:clientAuth=none|optional|required]

``cert``/``key`` may be omitted when the caller supplies a context factory (built from
``server_context_factory``). ``clientAuth`` defaults to ``optional`` when ``ca`` is given.
Escape ``:`` and ``\\`` in values with a backslash, as in Twisted's strings
(``interface=\\:\\:1``). The services listen through ``iotserver.edge.listen``, which
parses these strings with the one endpoint parser and layers TLS (``TLSMemoryBIOProtocol``)
over TCP itself, behind the connection limits; ``server_endpoint`` builds the bare
``SSL4ServerEndpoint`` for tools and tests. Both accept IPv6 interfaces.

All server contexts follow one policy (``SERVER_CIPHERS``): TLS 1.2 or newer, TLS 1.3 preferred
(OpenSSL picks the highest version both sides have); on TLS 1.2 only ECDHE key exchange with
AEAD ciphers (AES-GCM, ChaCha20-Poly1305): no static-RSA key exchange (no forward secrecy) and
no CBC suites. TLS 1.3's own suites are all AEAD with (EC)DHE.

A listener's context can be rebuilt from its files while the server runs
(``ReloadableContextFactory``, on SIGHUP): a renewed certificate is used for every connection
accepted after the reload.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)

from zope.interface import implementer

from iotserver.security.pki import check_validity, load_cert_chain, load_key

_log = Logger(namespace="iotserver.tls")

__all__ = [
    "ReloadableContextFactory",
    "cert_identity",
    "client_context_factory",
    "parse_tls_description",
    "peer_certificate",
    "reload_tls",
    "reloadable_server_context",
    "server_context_factory",
    "server_endpoint",
]

MINIMUM_TLS_VERSION = TLSVersion.TLSv1_2
#: OpenSSL cipher string of the TLS 1.2 suites our servers accept (see module docstring).
SERVER_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def _load_identity(
    cert_path: str | Path, key_path: str | Path
) -> tuple[list[x509.Certificate], Any]:
    """Certificate chain (leaf first) and its private key, checked to belong together."""
    chain = load_cert_chain(cert_path)
    key = load_key(key_path)
    if chain[0].public_key() != key.public_key():
        raise ValueError(f"{key_path} is not the private key of {cert_path}")
    return chain, key


def server_context_factory(
    cert_path: str | Path,
    key_path: str | Path,
    *,
    ca_path: str | Path | None = None,
    require_client_cert: bool = False,
    verify_client_cert: bool | None = None,
) -> IOpenSSLServerConnectionCreator:
    """A server TLS context: our certificate (plus any chain in the file), TLS >= 1.2.

    With ``ca_path`` client certificates are requested and verified against those CAs
    (``verify_client_cert`` defaults to True then); ``require_client_cert`` refuses clients
    without one. A client presenting a certificate that does not verify always fails the
    handshake, so ``peer_certificate`` only ever returns verified certificates.
    """
    verify = ca_path is not None if verify_client_cert is None else verify_client_cert
    if require_client_cert and not verify:
        raise ValueError("require_client_cert needs client certificate verification")
    if verify and ca_path is None:
        raise ValueError("verifying client certificates needs ca_path (the trusted CAs)")
    chain, key = _load_identity(cert_path, key_path)
    ca_certs = load_cert_chain(ca_path) if verify and ca_path is not None else []
    # pyOpenSSL 26 deprecates X509/PKey objects for the context's own certificate and key but
    # its X509Store (Twisted's caCerts) still needs X509: hence the mix.
    options = CertificateOptions(
        privateKey=cast(Any, key),
        certificate=cast(Any, chain[0]),
        extraCertChain=cast(Any, chain[1:]),
        verify=verify,
        caCerts=[crypto.X509.from_cryptography(c) for c in ca_certs] or None,
        requireCertificate=require_client_cert,
        raiseMinimumTo=MINIMUM_TLS_VERSION,
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(SERVER_CIPHERS),
    )
    if verify:
        # Announce the accepted CAs in the CertificateRequest: clients with several
        # certificates (.NET, Java key stores) pick the one to send from this list.
        # getContext() caches the context that every connection is then made from.
        context = options.getContext()
        for ca in ca_certs:
            context.add_client_ca(ca)
    return cast(IOpenSSLServerConnectionCreator, options)


@implementer(IOpenSSLContextFactory)
class ReloadableContextFactory:
    """A server context factory (Twisted's ``IOpenSSLContextFactory``) that can be rebuilt from
    its files: ``reload()`` re-reads them, and every connection accepted afterwards gets the new
    certificate, key and trusted CAs; open connections keep theirs. If the new files do not
    load, do not belong together or hold an expired certificate, ``reload`` raises and the
    previous context stays in use.

    Twisted asks ``getContext()`` once per accepted connection (its
    ``_ContextFactoryToConnectionFactory``), so swapping the options object is all it takes.
    """

    def __init__(self, build: Callable[[], Any], cert_path: str | Path) -> None:
        self._build = build
        self.cert_path = Path(cert_path)
        self._options = build()

    def getContext(self) -> Any:
        return self._options.getContext()

    def reload(self) -> None:
        check_validity(self.cert_path)  # raises for an expired or not yet valid certificate
        self._options = self._build()


def reload_tls(what: str, contexts: list[ReloadableContextFactory]) -> list[str]:
    """Reload every context (SIGHUP); returns what failed, for which the previous certificate
    stays in use."""
    problems = []
    for context in contexts:
        try:
            context.reload()
        except Exception as exc:  # its message names the file and the fault
            problems.append(f"{what} TLS certificate {context.cert_path}: {exc}")
        else:
            _log.info("{what}: TLS certificate reloaded from {path}", what=what,
                      path=str(context.cert_path))
    return problems


def reloadable_server_context(cert_path: str | Path, key_path: str | Path,
                              **options: Any) -> ReloadableContextFactory:
    """``server_context_factory(cert_path, key_path, **options)``, rebuilt by ``reload()``."""
    return ReloadableContextFactory(
        partial(server_context_factory, cert_path, key_path, **options), cert_path)


def client_context_factory(
    hostname: str,
    *,
    ca_path: str | Path | None,
    cert_path: str | Path | None = None,
    key_path: str | Path | None = None,
) -> IOpenSSLClientConnectionCreator:
    """Outgoing TLS: verify the server against ``ca_path`` and its name against ``hostname``.

    ``hostname`` may be a DNS name (checked against SAN DNS entries, sent as SNI) or an IP
    address (checked against SAN IP entries); service-identity does the matching.
    ``ca_path=None`` means the platform's trust store. ``cert_path``/``key_path`` add a client
    certificate.
    """
    if (cert_path is None) != (key_path is None):
        raise ValueError("give both cert_path and key_path for a client certificate, or neither")
    if ca_path is None:
        trust = platformTrust()
    else:
        roots = [
            Certificate(crypto.X509.from_cryptography(c))
            for c in load_cert_chain(ca_path)
        ]
        trust = trustRootFromCertificates(roots)
    extra: dict[str, Any] = {"raiseMinimumTo": MINIMUM_TLS_VERSION}
    if cert_path is not None and key_path is not None:
        chain, key = _load_identity(cert_path, key_path)
        # Passed as cryptography objects via extraCertificateOptions, not as a Twisted
        # PrivateCertificate, which would hand pyOpenSSL its deprecated X509/PKey types.
        extra.update(privateKey=key, certificate=chain[0], extraCertChain=chain[1:])
    return optionsForClientTLS(hostname, trustRoot=trust, extraCertificateOptions=extra)


def peer_certificate(transport: object) -> x509.Certificate | None:
    """The peer's certificate on a TLS transport, None on plain TCP or when it sent none.

    Valid once the handshake is done: call it from ``IHandshakeListener.handshakeCompleted``
    or when data arrives, not from ``connectionMade`` (the handshake has not run yet).
    On our servers it is verified (see ``server_context_factory``).
    """
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    try:
        cert = get()
    except AttributeError:  # TLSMemoryBIOProtocol after connectionLost: no TLS connection
        return None
    if cert is None:
        return None
    return cast(x509.Certificate, cert.to_cryptography())


def cert_identity(cert: x509.Certificate) -> str:
    """The name a certificate logs in as: its CN, else its first SAN DNS name, email or URI."""
    for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attr.value if isinstance(attr.value, str) else attr.value.decode("utf-8")
        if value:
            return value
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        for name in san:
            if isinstance(name, (x509.DNSName, x509.RFC822Name, x509.UniformResourceIdentifier)):
                return name.value
    raise ValueError(
        f"certificate {cert.subject.rfc4514_string()!r} has no CN and no SAN DNS/email/URI"
    )


def parse_tls_description(description: str) -> dict[str, str]:
    """The options of a ``tls:`` description as given (``port`` always present), checked by
    the one endpoint parser (``iotserver.edge.endpoint``); errors say what was expected."""
    from iotserver.edge.endpoint import parse_endpoint, split_description

    if not description.startswith("tls:"):
        raise ValueError(f"not a tls: endpoint description: {description!r}")
    parse_endpoint(description)
    options: dict[str, str] = {}
    for part in split_description(description.partition(":")[2]):
        key, sep, value = part.partition("=")
        options[key if sep else "port"] = value if sep else part
    return options


def server_endpoint(
    reactor: Any,
    description: str,
    context_factory: Any = None,
    reloadable: list[ReloadableContextFactory] | None = None,
) -> IStreamServerEndpoint:
    """A listening endpoint: ``tls:`` (ours, see module docstring) or any Twisted description.

    The services listen through ``iotserver.edge.listen`` (limits, timeouts); this is the
    bare endpoint, for tools and tests.

    ``context_factory`` is used for ``tls:`` descriptions that carry no certificate options,
    and must not be given for other descriptions. The context built from a description's own
    ``cert``/``key``/``ca`` files is appended to ``reloadable`` (when given).
    """
    if not description.startswith("tls:"):
        if context_factory is not None:
            raise ValueError(
                f"a context factory only applies to tls: descriptions: {description!r}"
            )
        endpoint = serverFromString(reactor, description)
        return cast(IStreamServerEndpoint, endpoint)
    from iotserver.edge.endpoint import split_description

    given = {part.partition("=")[0] for part in split_description(description)}
    tls_keys = {"cert", "key", "ca", "clientAuth"} & given
    if context_factory is not None and tls_keys:
        raise ValueError(
            f"{description!r}: {', '.join(sorted(tls_keys))} conflict with the context "
            "factory given by the caller"
        )
    missing = [k for k in ("cert", "key") if k not in given]
    if context_factory is None and missing:
        raise ValueError(f"{description!r}: missing {' and '.join(missing)}=PATH")
    options = parse_tls_description(description)
    if context_factory is not None:
        factory = context_factory
    else:
        ca = options.get("ca")
        mode = options.get("clientAuth", "optional" if ca else "none")
        factory = reloadable_server_context(
            options["cert"],
            options["key"],
            ca_path=ca,
            require_client_cert=mode == "required",
            verify_client_cert=mode != "none",
        )
        if reloadable is not None:
            reloadable.append(factory)
    endpoint = SSL4ServerEndpoint(
        reactor,
        int(options["port"]),
        factory,
        backlog=int(options.get("backlog", "50")),
        interface=options.get("interface", ""),
    )
    return cast(IStreamServerEndpoint, endpoint)
