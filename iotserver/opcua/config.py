"""The ``[opcua]`` section: the OPC UA server endpoint, its security, and southbound clients.

Parsed into frozen objects; every bad value names its key (``reader.error``), unknown keys are
errors (``reader.done``). ``DEFAULT_TOML`` is the loopback default appended to the built-in
configuration.

Security defaults: Basic256Sha256, Aes128_Sha256_RsaOaep and Aes256_Sha256_RsaPss, each in Sign
and SignAndEncrypt; no anonymous login. The policy ``None`` is only offered when listed
explicitly. The built-in default (no configuration file) is the one exception the project makes
for a first start: it listens on 127.0.0.1 only and adds ``None`` + anonymous (read-only), and
the service logs a warning about it at startup.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from iotserver.confparse import Reader
from iotserver.tags.model import TagDef

# Security policy names as written in the configuration (OPC UA Part 7 profile names) mapped to
# asyncua's SecurityPolicy class suffixes.
POLICIES: dict[str, str] = {
    "None": "None",
    "Basic256Sha256": "Basic256Sha256",
    "Aes128_Sha256_RsaOaep": "Aes128Sha256RsaOaep",
    "Aes256_Sha256_RsaPss": "Aes256Sha256RsaPss",
}
DEFAULT_POLICIES = ("Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss")
MODES = ("Sign", "SignAndEncrypt")
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")

DEFAULT_TOML = """\
# OPC UA server on loopback. This built-in default also offers security policy None and
# anonymous (read-only) sessions so a local client works on first start; a warning is logged.
# A configuration file gets the secure defaults unless it lists "None" / allow_anonymous itself.
[opcua]
endpoint = "opc.tcp://127.0.0.1:4840/iotserver"
security_policies = ["Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss", "None"]
allow_anonymous = true
"""


def _hostname() -> str:
    return socket.gethostname() or "localhost"


@dataclass(frozen=True)
class NodeMapping:
    """One remote node mapped onto one of our tags (``[[opcua.clients.nodes]]``)."""

    node_id: str
    tag: TagDef


@dataclass(frozen=True)
class BrowseMapping:
    """A remote folder whose variables become tags under ``prefix`` (``[[opcua.clients.browse]]``).

    The tags are defined at runtime after the first browse, as read-only unless ``writable``.
    """

    node_id: str
    prefix: str
    writable: bool = False
    max_depth: int = 4


@dataclass(frozen=True)
class ClientConfig:
    """A southbound OPC UA server we subscribe to (``[[opcua.clients]]``)."""

    name: str
    endpoint: str
    security_policy: str = "None"
    security_mode: str = "SignAndEncrypt"
    username: str | None = None
    password: str | None = None
    user_certificate: Path | None = None
    user_private_key: Path | None = None
    publishing_interval_ms: float = 500.0
    sampling_interval_ms: float = 0.0
    timeout_s: float = 10.0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    nodes: tuple[NodeMapping, ...] = ()
    browse: tuple[BrowseMapping, ...] = ()

    @property
    def owner(self) -> str:
        return f"opcua:{self.name}"


@dataclass(frozen=True)
class OpcUaConfig:
    """Typed ``[opcua]`` section."""

    endpoint: str = "opc.tcp://127.0.0.1:4840/iotserver"
    application_uri: str = field(default_factory=lambda: f"urn:{_hostname()}:iotserver")
    namespace_uri: str = ""
    security_policies: tuple[str, ...] = DEFAULT_POLICIES
    security_modes: tuple[str, ...] = MODES
    allow_anonymous: bool = False
    pki_dir: Path | None = None
    max_sessions: int = 100
    max_subscriptions: int = 200
    max_monitored_items: int = 200_000
    max_browse_continuation_points: int = 10  # per session (Part 4 5.8.2.1)
    max_queue_size: int = 10_000  # per monitored item (Part 4 5.13.1.5)
    publish_yield_ms: float = 5.0
    min_publishing_interval_ms: float = 10.0
    max_history_values: int = 10_000
    # session layer limits (sessions.py, channel.py); every one is logged and counted when hit
    max_sessions_per_address: int = 20
    max_session_timeout_s: float = 600.0
    session_activation_timeout_s: float = 10.0
    hello_timeout_s: float = 10.0
    max_message_size: int = 16 * 1024 * 1024
    max_chunk_count: int = 512
    max_chunk_size: int = 65535
    max_retransmission_queue: int = 64
    max_publish_requests: int = 20
    max_pending_requests: int = 100
    max_connections: int = 500
    max_connections_per_address: int = 50
    clients: tuple[ClientConfig, ...] = ()
    #: run the OPC UA server; false for an [opcua] section of clients only (see ``parse``)
    server: bool = True

    @property
    def host(self) -> str:
        return urlsplit(self.endpoint).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.endpoint).port or 4840

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")

    @property
    def namespace(self) -> str:
        return self.namespace_uri or f"{self.application_uri}:tags"

    def pki_path(self, data_dir: Path) -> Path:
        return self.pki_dir if self.pki_dir is not None else data_dir / "opcua" / "pki"

    def warnings(self) -> list[str]:
        """Security trade-offs to log at startup (the None policy, anonymous access)."""
        out: list[str] = []
        if not self.server:
            return out
        where = "on loopback" if self.loopback else f"on {self.host}, reachable off-host"
        if "None" in self.security_policies:
            out.append(f"OPC UA security policy None is enabled {where}: traffic is neither "
                       "signed nor encrypted")
        if self.security_policies == ("None",):
            out.append(f"OPC UA offers only security policy None {where}: user names and "
                       "passwords travel in clear text")
        if self.allow_anonymous:
            out.append(f"OPC UA anonymous sessions are allowed {where} (read-only)")
        return out

    def summary(self) -> list[str]:
        lines = ["server: off (only [[opcua.clients]] configured)"] if not self.server else [
            f"endpoint {self.endpoint} (ApplicationUri {self.application_uri})",
            "security policies: " + ", ".join(
                p if p == "None" else f"{p} ({'/'.join(self.security_modes)})"
                for p in self.security_policies),
            "anonymous login: " + ("allowed (read-only)" if self.allow_anonymous else "refused"),
        ]
        lines += [f"client {c.name}: {c.endpoint} ({c.security_policy}"
                  f"{'' if c.security_policy == 'None' else ', ' + c.security_mode}), "
                  f"{len(c.nodes)} nodes, {len(c.browse)} browse mappings" for c in self.clients]
        return lines

    def tag_defs(self) -> list[TagDef]:
        """Tags of the configured client nodes (owner ``opcua:<client>``)."""
        return [m.tag for c in self.clients for m in c.nodes]


def _check_endpoint_url(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"expected an opc.tcp://host:port/path URL, got {url!r} ({exc})"
    if parts.scheme != "opc.tcp" or not parts.hostname:
        return f"expected an opc.tcp://host:port/path URL, got {url!r}"
    if port is not None and not 1 <= port <= 65535:
        return f"expected a port 1..65535, got {url!r}"
    return None


def check_node_id(text: str) -> str | None:
    """Why ``text`` is not a NodeId string (``ns=2;s=A``, ``nsu=urn:x;i=5``, ``i=85``), or None."""
    from asyncua import ua

    body = text
    if text.startswith("nsu="):
        uri, sep, body = text[4:].partition(";")
        if not uri or not sep:
            return f"expected 'nsu=<uri>;<id>', got {text!r}"
    try:
        ua.NodeId.from_string(body)
    except Exception:  # asyncua raises several types for malformed strings
        return f"expected a NodeId such as 'ns=2;s=Tag' or 'nsu=urn:plc;i=5', got {text!r}"
    return None


def _parse_policies(r: Reader, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = r.str_list(key, default)
    if not value:
        raise r.error(key, "expected at least one security policy")
    for name in value:
        if name not in POLICIES:
            raise r.error(key, f"expected policies from {', '.join(POLICIES)}, got {name!r}")
    if len(set(value)) != len(value):
        raise r.error(key, "expected each policy once")
    return tuple(value)


def _parse_client(r: Reader, index: int) -> ClientConfig:
    name = r.str("name")
    if not name or not all(c.isalnum() or c in "_-." for c in name):
        raise r.error("name", f"expected letters, digits, '_', '-' or '.', got {name!r}")
    endpoint = r.str("endpoint")
    problem = _check_endpoint_url(endpoint)
    if problem:
        raise r.error("endpoint", problem)
    policy = r.str("security_policy", "None", choices=tuple(POLICIES))
    mode = r.str("security_mode", "SignAndEncrypt", choices=MODES)
    username = r.str("username", None)
    password = r.str("password", None)
    if (username is None) != (password is None):
        raise r.error("username" if username is None else "password",
                      "expected username and password together")
    user_cert = r.path("user_certificate", None)
    user_key = r.path("user_private_key", None)
    if (user_cert is None) != (user_key is None):
        raise r.error("user_certificate" if user_cert is None else "user_private_key",
                      "expected user_certificate and user_private_key together")
    if user_cert is not None and username is not None:
        raise r.error("user_certificate", "expected either username/password or a user "
                      "certificate, not both")
    if user_cert is not None and policy == "None":
        raise r.error("user_certificate", "expected a security_policy other than None for an "
                      "X509 user token (it is signed with the channel's policy)")
    # iotserver.config imports this module while it is being imported (DEFAULT_TOML): import lazily
    from iotserver.config import check_tag_path, parse_tag

    owner = f"opcua:{name}"
    nodes = []
    for nr in r.tables("nodes"):
        if "owner" in nr.data:
            raise nr.error("owner", f"expected no owner: the client owns its tags ({owner})")
        node_id = nr.str("node_id")
        problem = check_node_id(node_id)
        if problem:
            raise nr.error("node_id", problem)
        tag = parse_tag(nr, owner=owner)
        nr.done()
        nodes.append(NodeMapping(node_id, tag))
    browse = []
    for br in r.tables("browse"):
        node_id = br.str("node_id")
        problem = check_node_id(node_id)
        if problem:
            raise br.error("node_id", problem)
        prefix = br.str("prefix")
        problem = check_tag_path(prefix)
        if problem:
            raise br.error("prefix", problem)
        browse.append(BrowseMapping(node_id, prefix, br.bool("writable", False),
                                    br.int("max_depth", 4, min=1, max=16)))
        br.done()
    if not nodes and not browse:
        raise r.error("nodes", "expected at least one [[...nodes]] or [[...browse]] entry")
    reconnect_min = r.float("reconnect_min_s", 1.0, positive=True, max=3600)
    reconnect_max = r.float("reconnect_max_s", 60.0, positive=True, max=86400)
    if reconnect_max < reconnect_min:
        raise r.error("reconnect_max_s", "expected reconnect_max_s >= reconnect_min_s")
    cfg = ClientConfig(
        name=name,
        endpoint=endpoint,
        security_policy=policy,
        security_mode=mode,
        username=username,
        password=password,
        user_certificate=user_cert,
        user_private_key=user_key,
        publishing_interval_ms=r.float("publishing_interval_ms", 500.0, min=10, max=3_600_000),
        sampling_interval_ms=r.float("sampling_interval_ms", 0.0, min=0, max=3_600_000),
        timeout_s=r.float("timeout_s", 10.0, positive=True, max=600),
        reconnect_min_s=reconnect_min,
        reconnect_max_s=reconnect_max,
        nodes=tuple(nodes),
        browse=tuple(browse),
    )
    r.done()
    return cfg


def parse(r: Reader) -> OpcUaConfig:
    """Parse the ``[opcua]`` table.

    A configuration starts only what it asks for: an ``[opcua]`` table holding nothing but
    ``[[opcua.clients]]`` runs those clients and no server. Any server key (or ``server = true``)
    asks for the server; ``server = false`` turns it off explicitly.
    """
    asks_server = any(r.has(k) for k in _SERVER_KEYS) or not r.has("clients")
    server = r.bool("server", asks_server)
    endpoint = r.str("endpoint", "opc.tcp://127.0.0.1:4840/iotserver")
    problem = _check_endpoint_url(endpoint)
    if problem:
        raise r.error("endpoint", problem)
    app_uri = r.str("application_uri", f"urn:{_hostname()}:iotserver")
    if ":" not in app_uri or any(c.isspace() for c in app_uri):
        raise r.error("application_uri", f"expected a URI such as 'urn:host:iotserver', "
                      f"got {app_uri!r}")
    ns_uri = r.str("namespace_uri", "")
    if ns_uri and (":" not in ns_uri or any(c.isspace() for c in ns_uri)):
        raise r.error("namespace_uri", f"expected a URI such as 'urn:plant:tags', got {ns_uri!r}")
    policies = _parse_policies(r, "security_policies", DEFAULT_POLICIES)
    modes = r.str_list("security_modes", MODES)
    if not modes or any(m not in MODES for m in modes):
        raise r.error("security_modes", f"expected a non-empty subset of {list(MODES)}")
    clients = []
    names: set[str] = set()
    for i, cr in enumerate(r.tables("clients")):
        client = _parse_client(cr, i)
        if client.name in names:
            raise cr.error("name", f"expected a unique client name, {client.name!r} is used twice")
        names.add(client.name)
        clients.append(client)
    cfg = OpcUaConfig(
        endpoint=endpoint,
        application_uri=app_uri,
        namespace_uri=ns_uri,
        security_policies=policies,
        security_modes=tuple(modes),
        allow_anonymous=r.bool("allow_anonymous", False),
        pki_dir=r.path("pki_dir", None),
        max_sessions=r.int("max_sessions", 100, min=1, max=10_000),
        max_subscriptions=r.int("max_subscriptions", 200, min=1, max=100_000),
        max_monitored_items=r.int("max_monitored_items", 200_000, min=1, max=10_000_000),
        max_browse_continuation_points=r.int("max_browse_continuation_points", 10, min=1,
                                             max=1000),
        max_queue_size=r.int("max_queue_size", 10_000, min=1, max=1_000_000),
        publish_yield_ms=r.float("publish_yield_ms", 5.0, min=0.1, max=1000),
        min_publishing_interval_ms=r.float("min_publishing_interval_ms", 10.0, min=1, max=10_000),
        max_history_values=r.int("max_history_values", 10_000, min=10, max=10_000_000),
        max_sessions_per_address=r.int("max_sessions_per_address", 20, min=1, max=10_000),
        max_session_timeout_s=r.float("max_session_timeout_s", 600.0, min=10, max=86_400),
        session_activation_timeout_s=r.float("session_activation_timeout_s", 10.0, min=0.5,
                                             max=600),
        hello_timeout_s=r.float("hello_timeout_s", 10.0, min=0.5, max=600),
        max_message_size=r.int("max_message_size", 16 * 1024 * 1024, min=65536,
                               max=1024 * 1024 * 1024),
        max_chunk_count=r.int("max_chunk_count", 512, min=1, max=100_000),
        max_chunk_size=r.int("max_chunk_size", 65535, min=8192, max=16 * 1024 * 1024),
        max_retransmission_queue=r.int("max_retransmission_queue", 64, min=1, max=10_000),
        max_publish_requests=r.int("max_publish_requests", 20, min=1, max=1000),
        max_pending_requests=r.int("max_pending_requests", 100, min=1, max=100_000),
        max_connections=r.int("max_connections", 500, min=1, max=100_000),
        max_connections_per_address=r.int("max_connections_per_address", 50, min=1,
                                          max=100_000),
        clients=tuple(clients),
        server=server,
    )
    r.done()
    return cfg


_SERVER_KEYS = (
    # application_uri and pki_dir serve the clients too
    "endpoint", "namespace_uri", "security_policies", "security_modes",
    "allow_anonymous", "max_sessions", "max_subscriptions", "max_monitored_items",
    "max_browse_continuation_points", "publish_yield_ms", "min_publishing_interval_ms",
    "max_history_values",
)
