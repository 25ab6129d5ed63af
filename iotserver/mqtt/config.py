"""``[mqtt]``: the broker's listeners, authentication, ACL rules, limits, persistence, bridge.

Parsed into frozen dataclasses; unknown keys are errors naming the key and line (``Reader.done``).
``DEFAULT_TOML`` is the loopback default appended to the built-in configuration: a plain TCP
listener on 127.0.0.1:1883 and a TLS listener on 127.0.0.1:8883 (server certificate from
``[tls]``, client certificates optional and verified against the local CA). The built-in default
is the one place where anonymous clients are allowed (loopback only, a warning is logged); a
configuration file gets ``allow_anonymous = false`` unless it says otherwise.

Example::

    [mqtt]
    sys_interval = 10                      # seconds between $SYS/broker/... updates (0 = off)

    [[mqtt.listeners]]
    endpoint = "tls:8883:interface=0.0.0.0"
    client_certs = "required"              # none | optional | required (tls: listeners)

    [mqtt.auth]
    allow_anonymous = false
    acl_file = "/etc/iotserver/mqtt-acl.toml"

    [[mqtt.acl]]
    user = "plc7"
    topic = "devices/%c/#"
    access = "readwrite"                   # read | write | readwrite | deny

    [mqtt.limits]
    max_connections = 1000

    [mqtt.bridge]
    prefix = "iotserver"
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from iotserver.confparse import Reader
from iotserver.edge import limits as edge_limits
from iotserver.edge.endpoint import Endpoint, parse_endpoint
from iotserver.edge.listen import exposure_warnings
from iotserver.mqtt.topics import TopicError, validate_topic_filter

__all__ = [
    "DEFAULT_TOML",
    "AuthConfig",
    "BridgeConfig",
    "LimitsConfig",
    "ListenerConfig",
    "MqttConfig",
    "PersistenceConfig",
    "parse",
]

NEVER = 0xFFFFFFFF  #: Session Expiry Interval meaning "the session does not expire" (3.1.2.11.2)
CLIENT_CERT_MODES = ("none", "optional", "required")

DEFAULT_TOML = """\
# MQTT broker on loopback: plain TCP 1883 and TLS 8883 (client certificates optional). This
# built-in default lets anonymous clients in (loopback only; a warning is logged): they may read
# $SYS/# and iotserver/# (tags) but not write there, and use every other topic freely.
# A configuration file gets allow_anonymous = false unless it says otherwise.
[mqtt]

[[mqtt.listeners]]
endpoint = "tcp:1883:interface=127.0.0.1"

[[mqtt.listeners]]
endpoint = "tls:8883:interface=127.0.0.1"
client_certs = "optional"

[mqtt.auth]
allow_anonymous = true

[[mqtt.acl]]
user = "anonymous"
topic = "$SYS/#"
access = "read"

[[mqtt.acl]]
user = "anonymous"
topic = "iotserver/#"
access = "read"

[[mqtt.acl]]
user = "anonymous"
topic = "iotserver/#"
access = "deny"

[[mqtt.acl]]
user = "anonymous"
topic = "#"
access = "readwrite"
"""


@dataclass(frozen=True)
class ListenerConfig:
    """One ``[[mqtt.listeners]]`` entry.

    ``endpoint``: a Twisted endpoint string, or our ``tls:PORT[:interface=..]``, which serves
    the server certificate of ``[tls]``. ``client_certs`` (tls: only): ``none`` (not asked),
    ``optional`` (asked, verified against the CA of ``[tls]`` when sent) or ``required``.
    A verified certificate identity (CN, else SAN) is handed to the authenticator.
    ``allow_anonymous`` overrides ``[mqtt.auth] allow_anonymous`` for this listener.
    ``limits``: this listener's connection limits and timeouts (``iotserver.edge.limits``);
    its ``login_timeout`` defaults to ``[mqtt.limits] connect_timeout``.
    """

    endpoint: str
    client_certs: str = "none"
    allow_anonymous: bool = False
    limits: edge_limits.Limits = edge_limits.MQTT

    @property
    def ep(self) -> Endpoint:
        return parse_endpoint(self.endpoint)

    @property
    def is_tls(self) -> bool:
        return self.ep.is_tls

    @property
    def loopback(self) -> bool:
        return self.ep.loopback


@dataclass(frozen=True)
class AuthConfig:
    """``[mqtt.auth]``: who may connect. Passwords are checked against the user file
    (``server.users_file``, i.e. ``core.users``); nothing MQTT-specific is stored.

    - ``allow_anonymous``: clients without user name (and without a verified certificate) may
      connect; they are known to the ACL as ``anonymous_user``. Default false.
    - ``anonymous_user``: the ACL name of anonymous clients (rules with ``user = "anonymous"``).
    - ``certificate_login``: a verified TLS client certificate whose identity maps to a user
      (``certificates = [...]`` in the user file) logs in as that user without a password.
    - ``acl_file``: a TOML file of ``[[acl]]`` rules, read after the inline ``[[mqtt.acl]]``
      rules and re-read on SIGHUP / console reload.
    - ``role_defaults``: after the explicit rules, users get their role's built-in rights
      (operator: read ``<prefix>/#``; engineer: also write tag setpoints and signal blocks;
      admin: everything outside ``$``). See ``iotserver.mqtt.acl``.
    """

    allow_anonymous: bool = False
    anonymous_user: str = "anonymous"
    certificate_login: bool = True
    acl_file: Path | None = None
    role_defaults: bool = True


@dataclass(frozen=True)
class BridgeConfig:
    """``[mqtt.bridge]``: the tag store seen through MQTT (implemented by ``bridge.py``).

    - ``enabled``: publish tags and accept writes. Default true.
    - ``prefix``: topic root; tags are ``<prefix>/tags/<path>``. Default ``iotserver``.
    - ``publish``: tag path globs (``*`` one segment, ``**`` any) to publish. Default all.
    - ``qos`` / ``retain``: of the tag publications (default 0, retained).
    - ``payload``: ``json`` (``{"value", "quality", "ts"}``) or ``value`` (the bare value).
    - ``writes``: accept writes on ``<prefix>/tags/<path>/set`` (ACL permitting).
    - ``signals``: signal channel names that accept sample blocks on
      ``<prefix>/signals/<name>`` (raw little-endian float32); empty means every channel.
    """

    enabled: bool = True
    prefix: str = "iotserver"
    publish: tuple[str, ...] = ("**",)
    qos: int = 0
    retain: bool = True
    payload: str = "json"
    writes: bool = True
    signals: tuple[str, ...] = ()


@dataclass(frozen=True)
class LimitsConfig:
    """``[mqtt.limits]``: every resource a client can make us hold is bounded here.

    What exceeds a limit is refused (CONNACK/SUBACK/PUBACK reason code) or dropped, with a
    rate-limited log line and a ``$SYS/broker/.../dropped`` counter.
    """

    max_connections: int = 1000  #: over it CONNECT gets 0x89 Server busy (3.1.1: 3)
    max_sessions: int = 10_000  #: stored sessions; a new one over it gets 0x97 Quota exceeded
    max_connect_rate: float = 0.0  #: CONNECTs per second over all listeners (0 = no limit): 0x9F
    connect_timeout: float = 10.0  #: seconds a connection may take to send CONNECT
    max_packet_size: int = 1 << 20  #: inbound packets (announced in v5 CONNACK); larger: 0x95
    receive_maximum: int = 1024  #: inbound unacknowledged QoS 1/2 per client (v5 CONNACK)
    #: outbound unacknowledged QoS 1/2 per client (a v5 client's Receive Maximum may lower it).
    #: 64 held QoS 1 fan-out to 193k msg/s, 256 lets it reach 263k (benchmarks/mqtt, sat1)
    max_inflight: int = 256
    max_queued_messages: int = 1000  #: per session, offline or behind a slow reader
    max_queued_bytes: int = 8 << 20  #: payload bytes queued per session
    #: unsent bytes a connection's socket buffer may hold before the broker stops writing to
    #: it and queues instead (Twisted's default of 64 KiB pauses a fast reader at every burst)
    write_buffer_bytes: int = 1 << 20
    max_retained: int = 100_000  #: retained messages; a new topic over it is not retained
    max_retained_bytes: int = 64 << 20  #: payload bytes of all retained messages
    max_subscriptions: int = 1000  #: per session; more gets 0x97 Quota exceeded
    topic_alias_maximum: int = 64  #: inbound topic aliases per connection (v5)
    outbound_topic_aliases: bool = True  #: use the aliases the client offers for our PUBLISHes
    max_keepalive: int = 0  #: cap on the client's keepalive, announced as Server Keep Alive
    max_session_expiry: int = NEVER  #: cap on the Session Expiry Interval (seconds)
    v311_session_expiry: int = NEVER  #: expiry of 3.1.1 clean_session=0 sessions (seconds)
    maximum_qos: int = 2  #: 0..2; above it PUBLISH gets DISCONNECT 0x9B, SUBSCRIBE downgrades
    retain_available: bool = True  #: false: retained PUBLISH gets DISCONNECT 0x9A


@dataclass(frozen=True)
class PersistenceConfig:
    """``[mqtt.persistence]``: retained messages and persistent sessions in SQLite (WAL) under
    ``<data_dir>/mqtt/``.

    QoS 1/2 messages for persistent sessions are committed before the publisher gets its
    PUBACK/PUBREC (group commit: everything that arrives while a commit runs goes into the
    next; commits start at most every ``commit_interval`` seconds).
    ``synchronous = "full"`` survives power loss; ``"normal"`` only process crashes (kill -9).
    """

    enabled: bool = True
    commit_interval: float = 0.002
    synchronous: str = "full"


@dataclass(frozen=True)
class MqttConfig:
    """Parsed ``[mqtt]``. ``acl`` holds ``iotserver.mqtt.acl.AclRule`` objects in order."""

    listeners: tuple[ListenerConfig, ...] = ()
    auth: AuthConfig = field(default_factory=AuthConfig)
    acl: tuple[Any, ...] = ()
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    persistence: PersistenceConfig = field(default_factory=PersistenceConfig)
    sys_interval: float = 10.0  #: seconds between $SYS updates; 0 turns $SYS off
    builtin_default: bool = False  #: parsed from the built-in default (warn about anonymous)

    @property
    def topic_prefix(self) -> str:
        """The bridge's topic root (the ACL role defaults are relative to it)."""
        return self.bridge.prefix

    @property
    def acl_file(self) -> Path | None:
        return self.auth.acl_file

    def warnings(self) -> list[str]:
        """Security trade-offs worth a line in the log at startup."""
        out = []
        for lst in self.listeners:
            out += exposure_warnings("MQTT", lst.ep, anonymous=lst.allow_anonymous,
                                     consequence="passwords and data travel unencrypted")
        return out

    def summary(self) -> list[str]:
        lines = []
        for lst in self.listeners:
            extra = f", client certificates {lst.client_certs}" if lst.is_tls else ""
            anon = ", anonymous allowed" if lst.allow_anonymous else ""
            where = "loopback only" if lst.loopback else "REACHABLE OFF-HOST"
            lim = lst.limits
            lines.append(f"listener {lst.endpoint} ({where}{extra}{anon}, at most "
                         f"{lim.max_connections} connections, {lim.max_connections_per_peer} "
                         "per peer)")
        lines.append(f"ACL: {len(self.acl)} inline rules"
                     + (f", file {self.auth.acl_file}" if self.auth.acl_file else "")
                     + (", role defaults" if self.auth.role_defaults else ""))
        lines.append("persistence: " + ("<data_dir>/mqtt/broker.sqlite3"
                                        if self.persistence.enabled else "off (memory only)"))
        lines.append("tag bridge: " + (f"on, prefix {self.bridge.prefix!r}"
                                       if self.bridge.enabled else "off"))
        return lines


def _parse_listener(r: Reader, anonymous_default: bool, connect_timeout: float
                    ) -> ListenerConfig:
    endpoint = r.endpoint("endpoint")
    ep = parse_endpoint(endpoint)
    is_tls = ep.kind == "tls"
    certs = r.str("client_certs", "optional" if is_tls else "none", choices=CLIENT_CERT_MODES)
    if certs != "none" and not is_tls:
        raise r.error("client_certs", "client certificates need a tls: endpoint")
    if is_tls and (ep.ca is not None or ep.client_auth is not None):
        raise r.error("endpoint", "set client certificate checking with client_certs, "
                                  "not in the endpoint string")
    defaults = replace(edge_limits.MQTT, login_timeout=connect_timeout)
    lst = ListenerConfig(endpoint, certs, r.bool("allow_anonymous", anonymous_default),
                         edge_limits.read_limits(r, defaults))
    r.done()
    return lst


def _parse_acl(r: Reader) -> tuple[tuple[Any, ...], Path | None]:
    """Inline ``[[mqtt.acl]]`` rules (syntax owned by ``iotserver.mqtt.acl``)."""
    readers = r.tables("acl")
    if not readers:
        return (), None
    try:
        from iotserver.mqtt.acl import parse_rule
    except ImportError:  # pragma: no cover - acl.py ships with the broker
        raise r.error("acl", "ACL rules need iotserver.mqtt.acl") from None
    return tuple(parse_rule(x) for x in readers), None


def _parse_auth(r: Reader) -> AuthConfig:
    a = r.table("auth")
    auth = AuthConfig(
        allow_anonymous=a.bool("allow_anonymous", False),
        anonymous_user=a.str("anonymous_user", "anonymous"),
        certificate_login=a.bool("certificate_login", True),
        acl_file=a.path("acl_file", None),
        role_defaults=a.bool("role_defaults", True),
    )
    if not auth.anonymous_user:
        raise a.error("anonymous_user", "expected a non-empty name")
    a.done()
    return auth


def _parse_bridge(r: Reader) -> BridgeConfig:
    b = r.table("bridge")
    prefix = b.str("prefix", "iotserver")
    probe = f"{prefix}/x"
    try:
        validate_topic_filter(probe)
    except TopicError:
        prefix = ""
    if not prefix or prefix.startswith(("$", "/")) or prefix.endswith("/") \
            or "+" in prefix or "#" in prefix:
        raise b.error("prefix", "expected topic levels without wildcards, not starting with "
                                "'$' or '/' and not ending with '/', e.g. 'iotserver'")
    bridge = BridgeConfig(
        enabled=b.bool("enabled", True),
        prefix=prefix,
        publish=b.str_list("publish", ("**",)),
        qos=b.int("qos", 0, min=0, max=2),
        retain=b.bool("retain", True),
        payload=b.str("payload", "json", choices=("json", "value")),
        writes=b.bool("writes", True),
        signals=b.str_list("signals", ()),
    )
    b.done()
    return bridge


def _parse_limits(r: Reader) -> LimitsConfig:
    m = r.table("limits")
    d = LimitsConfig()
    limits = LimitsConfig(
        max_connections=m.int("max_connections", d.max_connections, min=1, max=1_000_000),
        max_sessions=m.int("max_sessions", d.max_sessions, min=1, max=10_000_000),
        max_connect_rate=m.float("max_connect_rate", d.max_connect_rate, min=0.0),
        connect_timeout=m.float("connect_timeout", d.connect_timeout, positive=True, max=3600),
        max_packet_size=m.int("max_packet_size", d.max_packet_size, min=64,
                              max=268_435_460),
        receive_maximum=m.int("receive_maximum", d.receive_maximum, min=1, max=65535),
        max_inflight=m.int("max_inflight", d.max_inflight, min=1, max=65535),
        max_queued_messages=m.int("max_queued_messages", d.max_queued_messages, min=0,
                                  max=10_000_000),
        max_queued_bytes=m.int("max_queued_bytes", d.max_queued_bytes, min=0),
        write_buffer_bytes=m.int("write_buffer_bytes", d.write_buffer_bytes, min=4096,
                                 max=1 << 30),
        max_retained=m.int("max_retained", d.max_retained, min=0),
        max_retained_bytes=m.int("max_retained_bytes", d.max_retained_bytes, min=0),
        max_subscriptions=m.int("max_subscriptions", d.max_subscriptions, min=1),
        topic_alias_maximum=m.int("topic_alias_maximum", d.topic_alias_maximum, min=0,
                                  max=65535),
        outbound_topic_aliases=m.bool("outbound_topic_aliases", d.outbound_topic_aliases),
        max_keepalive=m.int("max_keepalive", d.max_keepalive, min=0, max=65535),
        max_session_expiry=m.int("max_session_expiry", d.max_session_expiry, min=0, max=NEVER),
        v311_session_expiry=m.int("v311_session_expiry", d.v311_session_expiry, min=0,
                                  max=NEVER),
        maximum_qos=m.int("maximum_qos", d.maximum_qos, min=0, max=2),
        retain_available=m.bool("retain_available", d.retain_available),
    )
    m.done()
    return limits


def _parse_persistence(r: Reader) -> PersistenceConfig:
    p = r.table("persistence")
    cfg = PersistenceConfig(
        enabled=p.bool("enabled", True),
        commit_interval=p.float("commit_interval", 0.002, min=0.0, max=1.0),
        synchronous=p.str("synchronous", "full", choices=("full", "normal")),
    )
    p.done()
    return cfg


def parse(r: Reader) -> MqttConfig:
    """Read ``[mqtt]``; errors name the key and line, unknown keys are errors."""
    builtin = r.ctx.source == "<default>"
    auth = _parse_auth(r)
    limits = _parse_limits(r)
    if r.has("listeners"):
        listeners = tuple(_parse_listener(x, auth.allow_anonymous, limits.connect_timeout)
                          for x in r.tables("listeners"))
        if not listeners:
            raise r.error("listeners", "expected at least one [[mqtt.listeners]] entry")
    else:
        listeners = (ListenerConfig("tcp:1883:interface=127.0.0.1", "none", auth.allow_anonymous,
                                    replace(edge_limits.MQTT,
                                            login_timeout=limits.connect_timeout)),)
    seen: set[str] = set()
    for i, lst in enumerate(listeners):
        if lst.endpoint in seen:
            raise r.error(f"listeners[{i}].endpoint", f"duplicate endpoint {lst.endpoint!r}")
        seen.add(lst.endpoint)
    acl, _ = _parse_acl(r)
    cfg = MqttConfig(
        listeners=listeners,
        auth=auth,
        acl=acl,
        bridge=_parse_bridge(r),
        limits=limits,
        persistence=_parse_persistence(r),
        sys_interval=r.float("sys_interval", 10.0, min=0.0, max=86400),
        builtin_default=builtin,
    )
    r.done()
    return cfg
