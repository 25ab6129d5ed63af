"""The MQTT broker as a service: persistence, broker, listeners, $SYS, tag bridge, reloads.

``make_service(core, cfg)`` is the registration point (``app.SERVICE_FACTORIES``). The
authenticator, ACL and tag bridge come from ``auth.py``, ``acl.py`` and ``bridge.py``; a
minimal stand-in is used for the ACL or the bridge when it cannot be imported, so the broker
still runs (never for the authenticator: logins go through one module).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from iotserver.edge.guard import Probe
from iotserver.edge.listen import Listeners
from iotserver.lifecycle import AsyncService, StartupError
from iotserver.mqtt.broker import Broker
from iotserver.mqtt.config import ListenerConfig, MqttConfig
from iotserver.mqtt.protocol import OPEN, MqttServerFactory
from iotserver.mqtt.sys_topics import SysPublisher

log = Logger(namespace="iotserver.mqtt")

STOP_GRACE = 1.0  # seconds connections get to close after the DISCONNECT at shutdown


def _partial(proto: Any) -> bool:
    return bool(proto._decoder.buffered)


def _greeted(proto: Any) -> bool:
    return bool(proto.state == OPEN)


#: The guard's view of an MQTT connection: a packet is under way while the decoder holds
#: bytes; the login is done once the session is open (CONNECT accepted, authenticated).
PROBE = Probe(partial=_partial, greeted=_greeted)


class _ListenerAuth:
    """The shared authenticator with one listener's anonymous setting and the peer address."""

    def __init__(self, authenticator: Any, allow_anonymous: bool) -> None:
        self.authenticator = authenticator
        self.allow_anonymous = allow_anonymous

    def authenticate(self, client_id: str, username: str | None, password: bytes | None,
                     cert_identity: Any, peer: str | None = None) -> Any:
        return self.authenticator.authenticate(client_id, username, password, cert_identity,
                                               peer=peer, allow_anonymous=self.allow_anonymous)


def make_service(core: Any, cfg: MqttConfig) -> MqttService:
    return MqttService(core, cfg)


class MqttService(AsyncService):
    """Runs the broker. ``broker``, ``clients``, ``sessions`` and ``disconnect()`` are for the
    console."""

    name = "mqtt"

    def __init__(self, core: Any, cfg: MqttConfig) -> None:
        super().__init__()
        self.core = core
        self.cfg = cfg
        self.broker: Broker | None = None
        self.store: Any = None
        self.ports: list[Any] = []
        self.listeners: Listeners | None = None  # ports, limits, TLS contexts (SIGHUP)
        self.sys: SysPublisher | None = None
        self.bridge: Any = None
        self.acl: Any = None
        self.authenticator: Any = None

    # -- console API -------------------------------------------------------------------------
    @property
    def clients(self) -> dict[str, Any]:
        return self.broker.clients if self.broker is not None else {}

    @property
    def sessions(self) -> dict[str, Any]:
        return dict(self.broker.sessions) if self.broker is not None else {}

    def disconnect(self, client_id: str) -> bool:
        """Disconnect a client (v5: DISCONNECT 0x98 Administrative action)."""
        return self.broker is not None and self.broker.disconnect(client_id)

    # -- lifecycle -----------------------------------------------------------------------------
    def _reactor(self) -> Any:
        clock = self.core.clock
        if hasattr(clock, "listenTCP"):
            return clock
        from twisted.internet import reactor

        return reactor

    async def start(self) -> None:
        cfg, core = self.cfg, self.core
        for warning in cfg.warnings():
            log.warn("{warning}", warning=warning)
        if cfg.builtin_default and cfg.auth.allow_anonymous:
            log.warn("MQTT: the built-in default lets anonymous clients in on loopback; "
                     "use a configuration file with [mqtt.auth] for anything else")
        self.acl = self._make_acl()
        if cfg.persistence.enabled:
            from iotserver.mqtt.persistence import BrokerStore, restore

            path = core.config.server.data_dir / "mqtt" / "broker.sqlite3"
            self.store = BrokerStore(path, core.clock,
                                     commit_interval=cfg.persistence.commit_interval,
                                     synchronous=cfg.persistence.synchronous,
                                     reactor=self._reactor())
            try:
                snap = await Deferred.fromCoroutine(self.store.open())
            except Exception as exc:
                self.store = None
                raise StartupError(f"MQTT persistence {path}: {exc}") from None
        self.broker = broker = Broker(cfg, core.clock, acl=self.acl, store=self.store)
        if self.store is not None:
            n_sessions, n_queued, n_retained = restore(broker, snap)
            log.info("MQTT: restored {s} sessions, {q} queued messages, {r} retained messages",
                     s=n_sessions, q=n_queued, r=n_retained)
        # The bridge's interceptors are in place before anything can be published: a will
        # restored above is due at the earliest on the next reactor turn, and must meet the
        # same tag-topic interception as a client's PUBLISH.
        if cfg.bridge.enabled:
            self.bridge = self._make_bridge()
            if self.bridge is not None:
                self.bridge.start()
        self.authenticator = self._make_authenticator()
        core.reload_hooks.append(self.reload)
        self.listeners = Listeners("MQTT", core.clock, self._reactor(),
                                   namespace="iotserver.mqtt")
        for lst in cfg.listeners:
            factory = MqttServerFactory(broker, lst,
                                        _ListenerAuth(self.authenticator, lst.allow_anonymous))
            listener = await self.listeners.listen(
                "MQTT", lst.ep, factory, lst.limits, probe=PROBE,
                default_tls=partial(self._context_factory, lst))
            self.ports.append(listener.port)
            core.listening("MQTT", listener.address)
        self.sys = SysPublisher(broker, cfg.sys_interval, extra=self.edge_sys_values)
        self.sys.start()

    def _context_factory(self, lst: ListenerConfig) -> Any:
        """The server certificate of ``[tls]``, with the listener's client certificate mode."""
        from iotserver.security.tls import reloadable_server_context

        tls = self.core.tls
        if tls is None:
            raise StartupError(f"MQTT listener {lst.endpoint}: no TLS material")
        return reloadable_server_context(
            tls.cert_path, tls.key_path,
            ca_path=tls.ca_cert_path if lst.client_certs != "none" else None,
            require_client_cert=lst.client_certs == "required")

    def edge_stats(self) -> dict[str, dict[str, int]]:
        """Per listener: connections accepted, open, refused, closed by each timeout."""
        return self.listeners.stats() if self.listeners is not None else {}

    def edge_sys_values(self) -> dict[str, str]:
        """``$SYS/broker/listeners/...``: the edge counters, summed and per listener port."""
        if self.listeners is None:
            return {}
        out = {f"listeners/{name}": str(v) for name, v in self.listeners.totals().items()}
        for lst in self.listeners.listeners:
            where = lst.address.replace("/", "_")
            for name, v in lst.stats.as_dict().items():
                out[f"listeners/{where}/{name}"] = str(v)
        return out

    def _make_acl(self) -> Any:
        try:
            from iotserver.mqtt.acl import Acl
        except ImportError:  # pragma: no cover - acl.py ships with the broker
            log.warn("MQTT: iotserver.mqtt.acl missing, every client may do everything")
            return None
        try:
            return Acl.from_config(self.cfg, self.core.users)
        except ValueError as exc:
            raise StartupError(f"MQTT ACL: {exc}") from None

    def _make_authenticator(self) -> Any:
        from iotserver.mqtt.auth import Authenticator  # the server's one login path

        return Authenticator(self.core, self.cfg)

    def _make_bridge(self) -> Any:
        try:
            from iotserver.mqtt.bridge import TagBridge
        except ImportError:  # pragma: no cover - bridge.py ships with the broker
            log.warn("MQTT: iotserver.mqtt.bridge missing, tags are not published")
            return None
        return TagBridge(self.core, self.broker, self.cfg)

    def reload(self) -> None:
        """SIGHUP / console: re-read the ACL file and the TLS listeners' certificates; a broken
        file keeps the previous rules or certificate."""
        problems = self.listeners.reload() if self.listeners is not None else []
        if self.acl is not None and hasattr(self.acl, "reload"):
            self.acl.reload()
            if self.broker is not None:
                self.broker.acl_changed()
            log.info("MQTT: ACL reloaded")
        if problems:
            raise ValueError("; ".join(problems))

    async def stop(self) -> None:
        if self.reload in self.core.reload_hooks:
            self.core.reload_hooks.remove(self.reload)
        if self.bridge is not None:
            try:
                self.bridge.stop()
            except Exception:
                log.failure("MQTT: tag bridge did not stop cleanly")
            self.bridge = None
        if self.sys is not None:
            self.sys.stop()
            self.sys = None
        self.ports = []
        if self.listeners is not None:
            await self.listeners.stop()
        broker = self.broker
        if broker is not None:
            broker.shutdown()
            waited = 0.0
            while broker.connections and waited < STOP_GRACE:
                await deferLater(self.core.clock, 0.02, lambda: None)
                waited += 0.02
            for conn in list(broker.connections):
                conn.transport.abortConnection()
            if broker.connections:
                await deferLater(self.core.clock, 0, lambda: None)
            for session in broker.sessions.values():
                session.conn = None
        if self.listeners is not None:
            await self.listeners.drain()  # sockets the broker never saw (mid-handshake)
        if self.store is not None:
            store, self.store = self.store, None
            await Deferred.fromCoroutine(store.close())
