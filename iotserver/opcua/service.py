"""The OPC UA service: an asyncua server over the tag store, plus the southbound clients.

``make_service(core, cfg)`` is registered in ``app.SERVICE_FACTORIES``. Everything asyncua is
created inside a running asyncio coroutine (the loop is not running yet in
``startService``; asyncua and pymodbus call ``asyncio.get_running_loop()``). ``stop`` is
idempotent and also cleans up after a failed start: asyncua leaves
per-connection tasks, session watchdogs and subscription loops behind unless they are closed
one by one.

Source control hook (assumption, see docs/opcua.md): a service in ``core.services`` that can
reconnect a source offers ``source_names() -> list[str]`` (tag owners such as ``modbus:plc1``)
and ``reconnect_source(owner) -> bool`` (or a Deferred/awaitable of bool). The OPC UA server adds
a ``Reconnect`` method to the folder holding each such source's tags.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import inspect
import logging
from typing import Any

from asyncua import ua
from twisted.internet.defer import Deferred

from iotserver.lifecycle import AsyncService, StartupError, as_deferred
from iotserver.opcua import compat
from iotserver.opcua.addrspace import TagSpace
from iotserver.opcua.layer import SessionLayer
from iotserver.opcua.config import POLICIES, OpcUaConfig
from iotserver.opcua.convert import VARIANT_TYPES
from iotserver.opcua.history import HistoryReader, Series, stepped
from iotserver.opcua.methods import MethodCalls
from iotserver.security.login import logins_of
from iotserver.opcua.security import (
    ClientCertificateValidator,
    IotRuleset,
    IotUserManager,
    TrustList,
    ensure_app_cert,
)
from iotserver.opcua.session import IotInternalServer, Services
from iotserver.opcua.status import ServerInfo
from iotserver.opcua.sessions import LoopClock
from iotserver.opcua.uaserver import IotUaServer, prepare
from iotserver.opcua.values import ValuePump

log = logging.getLogger("iotserver.opcua")


def make_service(core: Any, cfg: OpcUaConfig) -> OpcUaService:
    return OpcUaService(core, cfg)


def security_policy_types(cfg: OpcUaConfig) -> list[ua.SecurityPolicyType]:
    out = []
    for name in cfg.security_policies:
        if name == "None":
            out.append(ua.SecurityPolicyType.NoSecurity)
            continue
        for mode in cfg.security_modes:
            out.append(getattr(ua.SecurityPolicyType, f"{POLICIES[name]}_{mode}"))
    return out


class OpcUaService(AsyncService):
    """Runs the OPC UA server (and the ``[[opcua.clients]]`` sources)."""

    name = "opcua"

    def __init__(self, core: Any, cfg: OpcUaConfig) -> None:
        super().__init__()
        self.core = core
        self.cfg = cfg
        self.server: IotUaServer | None = None
        self.iserver: IotInternalServer | None = None
        self.space: TagSpace | None = None
        self.pump: ValuePump | None = None
        self.trust: TrustList | None = None
        self.clients: dict[str, Any] = {}
        self._iserver_started = False
        self.layer: SessionLayer | None = None

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        await as_deferred(self._astart())

    async def stop(self) -> None:
        await as_deferred(self._astop())

    async def _astart(self) -> None:
        cfg, core = self.cfg, self.core
        try:
            compat.check()
        except compat.AsyncuaIncompatible as exc:
            raise StartupError(str(exc)) from None
        for warning in cfg.warnings():
            log.warning("%s", warning)
        data_dir = core.config.server.data_dir
        pki_dir = cfg.pki_path(data_dir)
        server_cfg = core.config.server
        tls = core.tls
        ca_cert = tls.ca_cert if tls is not None else None
        try:
            import socket

            hostnames = list(dict.fromkeys([*server_cfg.hostnames, socket.gethostname()]))
            app = ensure_app_cert(pki_dir, cfg.application_uri,
                                  hostnames=[h for h in hostnames if h],
                                  ip_addresses=list(server_cfg.ip_addresses),
                                  ca_cert=ca_cert, ca_key_path=data_dir / "tls" / "ca.key")
        except (OSError, ValueError) as exc:
            raise StartupError(f"OPC UA application certificate in {pki_dir}: {exc}") from None
        if app.created:
            log.info("OPC UA: created application certificate %s", app.cert_path)
        crl = getattr(core, "crl", None)
        if crl is not None:  # strict clients need the issuer's CRL beside the issuer
            try:
                crl.add_folder(pki_dir / "issuers" / "crl")
            except OSError as exc:
                raise StartupError(f"OPC UA PKI {pki_dir}: {exc}") from None
        self.trust = TrustList(pki_dir, [ca_cert] if ca_cert is not None else [])
        if not cfg.server:
            # [opcua] with clients only: no server on 4840 that nobody asked for
            await self._start_clients()
            return
        users = IotUserManager(lambda: self.core.users, self.trust,
                               allow_anonymous=cfg.allow_anonymous,
                               logins=logins_of(self.core))
        self.iserver = iserver = IotInternalServer(users, max_items=cfg.max_monitored_items,
                                                   max_queue_size=cfg.max_queue_size)
        iserver.max_browse_continuation_points = cfg.max_browse_continuation_points
        iserver.certificate_validator = ClientCertificateValidator(self.trust)
        self.server = server = IotUaServer(iserver=iserver)
        if ca_cert is not None and app.cert.issuer == ca_cert.subject:
            server.certificate_chain = [ca_cert]
        server.set_endpoint(cfg.endpoint)
        server.set_server_name(f"iotserver ({core.config.server.name})")
        server.product_uri = "urn:iotserver"
        server.manufacturer_name = "iotserver"
        server.application_type = ua.ApplicationType.Server
        compat.set_application_uri(server, cfg.application_uri)
        await server.init()
        await server.load_certificate(str(app.cert_path))
        await server.load_private_key(str(app.key_path))
        server.set_security_policy(security_policy_types(cfg), permission_ruleset=IotRuleset())
        tokens: list[type] = [ua.UserNameIdentityToken, ua.X509IdentityToken]
        if cfg.allow_anonymous:
            tokens.insert(0, ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)
        server.allow_remote_admin(False)

        idx = await server.register_namespace(cfg.namespace)
        store = core.store
        self.space = space = TagSpace(iserver.aspace, idx, read=store.read)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        count = space.build(((t, store.read(t.path)) for t in store.tags()),
                            channels=list(core.signals.channels))
        log.info("OPC UA: %d tag variables in namespace %d (%s) built in %.2f s", count, idx,
                 cfg.namespace, loop.time() - t0)
        history = HistoryReader(core.rings, cfg.max_history_values)
        iserver.services = Services(store, space, history, self._series)
        info = ServerInfo(server, iserver, cfg, self)
        await info.fill()
        await info.add_source_methods(self._source_names(), self.reconnect_source)

        self.pump = ValuePump(store, space, cfg.publish_yield_ms)
        self.pump.start()
        try:
            policies = await prepare(server)
        except compat.AsyncuaIncompatible as exc:
            raise StartupError(str(exc)) from None
        self._iserver_started = True
        self.layer = layer = SessionLayer(iserver, cfg, policies, LoopClock(loop))
        iserver.method_calls = MethodCalls(iserver.aspace, iserver.method_service.call,
                                           lambda: iserver.source_methods, layer.registry)
        try:
            await layer.listener.start(cfg.host, cfg.port)
        except OSError as exc:
            raise StartupError(f"OPC UA cannot listen on {cfg.endpoint}: {exc.strerror or exc}"
                               ) from None
        layer.table.start()
        # asyncua's standard address space is ~100k long-lived objects; every cyclic GC pass
        # walked them, which cost 3-4x in notification throughput (measured: 12 us -> 3 us per
        # change). Freezing moves what exists now out of the collector's reach. (app._tune_gc
        # freezes the whole server again at "ready"; this covers the service run on its own,
        # as in benchmarks/opcua, and the time between its start and "ready".)
        gc.collect()
        gc.freeze()
        core.listening("OPC UA", cfg.endpoint)
        await self._start_clients()

    @property
    def stats(self) -> dict[str, int] | None:
        """Session layer counters (the console's ``services`` shows them): sessions and
        subscriptions now, and every limit hit since start."""
        layer = self.layer
        if layer is None:
            return None
        out = {"sessions": len(layer.table), "subscriptions": len(layer.registry),
               "connections_open": len(layer.listener.channels)}
        out.update(dataclasses.asdict(layer.table.stats))
        out.update({f"channel_{k}": v for k, v in
                    dataclasses.asdict(layer.listener.stats).items()})
        return out

    def _series(self, node_id: ua.NodeId) -> Series | None:
        space = self.space
        if space is None:
            return None
        tag = space.tag_of(node_id)
        rings = self.core.rings
        if tag is not None:
            key = f"tag:{tag.path}"
            if key not in rings:
                return None
            return Series(key, rings.get(key), VARIANT_TYPES[tag.data_type],
                          stepped(tag.data_type))
        channel = space.channel_of(node_id)
        if channel is not None and f"signal:{channel}" in rings:
            key = f"signal:{channel}"
            return Series(key, rings.get(key), ua.VariantType.Float, False)
        return None

    async def _astop(self) -> None:
        """Idempotent, and safe after any partial start."""
        for client in list(self.clients.values()):
            await client.stop()
        self.clients.clear()
        if self.pump is not None:
            await self.pump.stop()
            self.pump = None
        server, self.server = self.server, None
        iserver = self.iserver
        if server is None or iserver is None:
            return
        iserver.services = None
        layer, self.layer = self.layer, None
        if layer is not None:
            await layer.stop()
        # the ServerStatus clock sleeps a second between updates; InternalServer.stop would
        # wait for that sleep to end
        clock = compat.take_time_task(iserver)
        if clock is not None and not clock.done():
            clock.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await clock
        await _stop_iserver(iserver)
        self._iserver_started = False
        if self.space is not None:
            self.space = None
        log.info("OPC UA server stopped")

    # -- source control ------------------------------------------------------------------
    def _source_names(self) -> list[str]:
        names: list[str] = [c.owner for c in self.cfg.clients]
        for svc in self.core.services.values():
            if svc is self:
                continue
            get = getattr(svc, "source_names", None)
            if callable(get):
                try:
                    names += list(get())
                except Exception:
                    log.exception("source_names() of %r failed", svc)
        return names

    def source_names(self) -> list[str]:
        return [c.owner for c in self.cfg.clients]

    def reconnect_source(self, owner: str) -> bool:
        for client in self.clients.values():
            if client.owner == owner:
                client.reconnect()
                return True
        return False

    async def reconnect(self, owner: str) -> bool:
        """Ask whichever service owns ``owner`` to reconnect it (the Reconnect method)."""
        for svc in self.core.services.values():
            hook = getattr(svc, "reconnect_source", None)
            if not callable(hook):
                continue
            result = hook(owner)
            if isinstance(result, Deferred):
                result = await result.asFuture(asyncio.get_running_loop())
            elif inspect.isawaitable(result):
                result = await result
            if result:
                log.info("OPC UA: reconnect of %s requested", owner)
                return True
        return False

    # -- clients -------------------------------------------------------------------------
    async def _start_clients(self) -> None:
        if not self.cfg.clients:
            return
        from iotserver.opcua.client import ClientSource

        for ccfg in self.cfg.clients:
            client = ClientSource(self.core, ccfg, self)
            self.clients[ccfg.name] = client
            client.start()


async def _stop_iserver(iserver: IotInternalServer) -> None:
    """Stop an InternalServer that never got as far as listening."""
    try:
        await iserver.stop()
    except Exception:
        log.exception("stopping the OPC UA internal server")
