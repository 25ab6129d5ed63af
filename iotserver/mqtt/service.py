"""The MQTT broker as a service: persistence, broker, listeners, $SYS, tag bridge, reloads.

``make_service(core, cfg)`` is the registration point (``app.SERVICE_FACTORIES``). The
authenticator, ACL and tag bridge come from ``auth.py``, ``acl.py`` and ``bridge.py``; a
minimal stand-in is used for the ACL or the bridge when it cannot be imported, so the broker
still runs (never for the authenticator: logins go through one module).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.logger import Logger

from iotserver.lifecycle import AsyncService, StartupError
from iotserver.mqtt.broker import Broker
from iotserver.mqtt.config import MqttConfig
from iotserver.security.tls import reload_tls
from iotserver.mqtt.protocol import MqttServerFactory
from iotserver.mqtt.sys_topics import SysPublisher

log = Logger(namespace="iotserver.mqtt")

STOP_GRACE = 1.0  # seconds connections get to close after the DISCONNECT at shutdown


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
        self.tls_contexts: list[Any] = []  # reloadable TLS contexts of the listeners (SIGHUP)
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
        self.authenticator = self._make_authenticator()
        core.reload_hooks.append(self.reload)
        reactor = self._reactor()
        from iotserver.security.tls import reloadable_server_context, server_endpoint

        for lst in cfg.listeners:
            context = None
            if lst.endpoint.startswith("tls:") and ":cert=" not in lst.endpoint:
                tls = core.tls
                if tls is None:
                    raise StartupError(f"MQTT listener {lst.endpoint}: no TLS material")
                try:
                    context = reloadable_server_context(
                        tls.cert_path, tls.key_path,
                        ca_path=tls.ca_cert_path if lst.client_certs != "none" else None,
                        require_client_cert=lst.client_certs == "required")
                except ValueError as exc:
                    raise StartupError(f"MQTT listener {lst.endpoint}: {exc}") from None
                self.tls_contexts.append(context)
            try:
                endpoint = server_endpoint(reactor, lst.endpoint, context, self.tls_contexts)
                factory = MqttServerFactory(broker, lst,
                                            _ListenerAuth(self.authenticator,
                                                          lst.allow_anonymous))
                # Twisted's zope interface declares listen() without self (misc: mypy's note)
                port = await endpoint.listen(factory)  # type: ignore[call-arg,misc]
            except Exception as exc:
                raise StartupError(f"MQTT: cannot listen on {lst.endpoint}: {exc}") from None
            self.ports.append(port)
            core.listening("MQTT", _describe(lst.endpoint, port))
        self.sys = SysPublisher(broker, cfg.sys_interval)
        self.sys.start()
        if cfg.bridge.enabled:
            self.bridge = self._make_bridge()
            if self.bridge is not None:
                self.bridge.start()

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
        problems = reload_tls("MQTT", self.tls_contexts)
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
        ports, self.ports = self.ports, []
        await DeferredList([Deferred.fromCoroutine(_stop_port(p)) for p in ports])
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
        if self.store is not None:
            store, self.store = self.store, None
            await Deferred.fromCoroutine(store.close())


async def _stop_port(port: Any) -> None:
    try:
        await port.stopListening()
    except Exception:
        log.failure("MQTT: stopping a listener failed")


def _describe(description: str, port: Any) -> str:
    """The endpoint as configured, with the real port when 0 was asked for."""
    try:
        actual = port.getHost().port
    except Exception:
        return description
    kind, _, rest = description.partition(":")
    parts = rest.split(":", 1)
    if parts and parts[0] in ("0", "port=0"):
        return f"{kind}:{actual}" + (f":{parts[1]}" if len(parts) > 1 else "")
    return description
