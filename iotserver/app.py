"""Assemble the server from a Config: one MultiService, the core first, endpoints after.

The core (tag store, memory-tag persistence, ring buffers, signal channels, TLS material) is
built before any other service starts, so every adapter can reference the store; the data
directory and certificates are created on first start.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from twisted.application.service import MultiService, Service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from iotserver.config import Config
from iotserver.lifecycle import AsyncService, StartupError
from iotserver.security.users import UserDB, UserFileError
from iotserver.tags.model import DataType, Quality, TagDef, TagValue, coerce
from iotserver.tags.persist import MemoryTagPersistence
from iotserver.tags.ring import RingMemoryError, RingRegistry
from iotserver.tags.signals import SignalHub
from iotserver.tags.store import MemoryOwner, TagStore

log = Logger(namespace="iotserver")

# Factories for protocol services: (section name, "module:function(core, section_config)").
SERVICE_FACTORIES: list[tuple[str, str]] = [
    ("modbus", "iotserver.modbus.service:make_service"),
    ("opcua", "iotserver.opcua.service:make_service"),
    ("mqtt", "iotserver.mqtt.service:make_service"),
    ("console", "iotserver.console.service:make_service"),
]


@dataclass
class Core:
    """What every adapter shares. Built without I/O; ``CoreService`` opens files on start."""

    config: Config
    clock: IReactorTime
    store: TagStore
    rings: RingRegistry
    signals: SignalHub
    persistence: MemoryTagPersistence | None = None
    tls: Any = None  # iotserver.security.pki.TlsMaterial once started
    crl: Any = None  # iotserver.security.pki_crl.CrlKeeper when the local CA is ours
    users: UserDB = field(default_factory=UserDB)
    listeners: list[tuple[str, str]] = field(default_factory=list)  # (what, where) for the summary
    services: dict[str, Any] = field(default_factory=dict)
    reload_hooks: list[Callable[[], None]] = field(default_factory=list)
    logins: Any = None  # iotserver.security.login.Logins: every protocol's login path
    audit: Any = None  # iotserver.security.audit.AuditLog: writes and logins

    def listening(self, what: str, where: str) -> None:
        """Record a listener for the startup summary (each service warns about its own exposure)."""
        self.listeners.append((what, where))
        log.info("listening: {what} on {where}", what=what, where=where)

    def reload(self) -> list[str]:
        """Re-read users (and whatever registered a hook: ACLs...); returns problems found.

        Called on SIGHUP and from the console. A broken file keeps the previous state.
        """
        problems = []
        try:
            if self.config.server.users_file.exists():
                self.users.path = self.config.server.users_file
                self.users.reload()
                log.info(
                    "reloaded {n} users from {path}", n=len(self.users), path=str(self.users.path)
                )
        except UserFileError as exc:
            problems.append(str(exc))
        for hook in list(self.reload_hooks):
            try:
                hook()
            except Exception as exc:  # a hook's own error message is the useful part
                problems.append(str(exc))
        for problem in problems:
            log.error("reload: {problem} (previous settings kept)", problem=problem)
        return problems


class CoreService(Service):
    """Opens the data directory, restores memory tags, defines every configured tag."""

    name = "core"

    def __init__(self, core: Core, extra_tags: Callable[[], list[TagDef]]) -> None:
        self.core = core
        self._extra_tags = extra_tags
        self._defined = False

    def startService(self) -> None:
        super().startService()
        cfg = self.core.config
        data_dir = cfg.server.data_dir
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(data_dir, 0o700)
        except OSError as exc:
            raise StartupError(f"cannot create data directory {data_dir}: {exc}") from None
        self.core.persistence = MemoryTagPersistence(data_dir / "memory_tags.sqlite3")
        users_file = cfg.server.users_file
        if users_file.exists():
            try:
                self.core.users = UserDB(users_file)
            except UserFileError as exc:
                raise StartupError(str(exc)) from None
            log.info("{n} users loaded from {path}", n=len(self.core.users), path=str(users_file))
        elif cfg.server.users_file_configured:
            # named in the configuration but missing: a typo here quietly turns logins off
            log.warn(
                "{source}: server.users_file = {path} does not exist: password logins are off "
                "until 'iotserver users add' creates it",
                source=cfg.source,
                path=str(users_file),
            )
        else:
            log.info(
                "no user file at {path}: password logins are off until "
                "'iotserver users add' creates it",
                path=str(users_file),
            )
        self._start_audit(data_dir)
        self._ensure_tls()
        if not self._defined:
            self._define_tags()
            self._defined = True
        self.core.store.register_owner(
            "memory", MemoryOwner(self.core.store, self.core.persistence)
        )

    def _start_audit(self, data_dir: Any) -> None:
        audit = self.core.audit
        if audit is None or audit.path is None:
            return
        try:
            audit.start()
        except OSError as exc:
            raise StartupError(f"audit file {audit.path}: {exc}") from None
        log.info("audit trail: {path}", path=str(audit.path))

    def _ensure_tls(self) -> None:
        """Load the configured certificate, or create a local CA and server certificate."""
        from iotserver.security import pki

        cfg = self.core.config
        try:
            if cfg.tls.cert is not None and cfg.tls.key is not None:
                ca_path = cfg.tls.ca or cfg.tls.cert
                material = pki.TlsMaterial(
                    ca_path,
                    cfg.tls.cert,
                    cfg.tls.key,
                    pki.load_cert(ca_path),
                    pki.load_cert(cfg.tls.cert),
                    pki.load_key(cfg.tls.key),
                )
            else:
                material = pki.ensure_server_material(
                    cfg.server.data_dir / "tls",
                    hostnames=list(cfg.server.hostnames),
                    ip_addresses=list(cfg.server.ip_addresses),
                )
                self._keep_crl(cfg.server.data_dir / "tls")
        except (OSError, ValueError) as exc:
            raise StartupError(f"TLS material: {exc}") from None
        for path in material.created:
            log.info("created {path}", path=str(path))
        for path in {material.cert_path, material.ca_cert_path}:
            try:
                warning = pki.check_validity(path)
            except pki.CertificateExpiredError as exc:
                raise StartupError(str(exc)) from None
            if warning:
                log.warn("{warning}", warning=warning)
        self.core.tls = material

    def _keep_crl(self, tls_dir: Any) -> None:
        """The local CA's CRL (strict OPC UA clients need one): current now, checked daily."""
        from iotserver.security.pki_crl import CrlKeeper

        keeper = CrlKeeper(tls_dir, self.core.clock,
                           warn=lambda text: log.warn("{text}", text=text))
        keeper.start()
        self.core.crl = keeper

    def _define_tags(self) -> None:
        core = self.core
        store = core.store
        saved = core.persistence.load_all() if core.persistence else {}
        restored = 0
        for tag in list(core.config.tags) + self._extra_tags():
            initial = None
            if tag.persist and tag.path in saved:
                value, quality, ts = saved[tag.path]
                try:
                    value = coerce(tag, value)
                    initial = TagValue(value, Quality(quality), ts, store.now_ns())
                    restored += 1
                except (ValueError, TypeError):
                    log.warn(
                        "memory tag {path}: saved value {v!r} no longer fits, using the "
                        "configured initial value",
                        path=tag.path,
                        v=value,
                    )
            store.define(tag, initial)
            self._attach_history(tag)
        for sig in core.config.signals:
            try:
                channel = core.signals.add(sig)
            except RingMemoryError as exc:
                raise StartupError(_history_budget_message(core.config, exc)) from None
            for tag in channel.derived_tags():
                self._attach_history(tag)
        log.info(
            "tag store: {n} tags, {r} memory values restored, "
            "history {mb:.1f} MiB of {cap:.0f} MiB",
            n=len(store),
            r=restored,
            mb=core.rings.total_bytes / 2**20,
            cap=core.config.history.max_bytes / 2**20,
        )

    def _attach_history(self, tag: TagDef) -> None:
        if tag.historize and _historizable(tag):
            try:
                ring = self.core.rings.create(
                    f"tag:{tag.path}", tag.history_capacity, _ring_dtype(tag)
                )
            except RingMemoryError as exc:
                raise StartupError(_history_budget_message(self.core.config, exc)) from None
            self.core.store.set_history(tag.path, ring)

    def stopService(self) -> Any:
        super().stopService()
        if self.core.crl is not None:
            self.core.crl.stop()
        self.core.store.unregister_owner("memory")
        d = self.core.audit.stop() if self.core.audit is not None else None
        if self.core.persistence is not None:
            self.core.persistence.close()
            self.core.persistence = None
        return d


class ServerRoot(MultiService):
    """The root service: a StartupError in a child stops the server with a one-line message."""

    def __init__(self) -> None:
        super().__init__()
        self.stop_reactor: Callable[[], None] | None = None
        self.failed: str | None = None
        self.shutdown_timeout: float | None = None
        self.clock: IReactorTime | None = None
        self.core: Core | None = None

    def startService(self) -> None:
        try:
            super().startService()
        except StartupError as exc:
            self.failed = str(exc)
            log.critical("cannot start: {msg}", msg=str(exc))
            if self.stop_reactor is not None:
                self.stop_reactor()
            return
        from twisted.internet.defer import DeferredList

        children = [c for c in self if isinstance(c, AsyncService) and c.started is not None]

        def _ready(_: object) -> None:
            if any(c.failure for c in children):
                return
            listeners = self.core.listeners if self.core is not None else []
            for what, where in listeners:
                log.info("  {what:<14} {where}", what=what, where=where)
            log.info("iotserver ready: {n} listeners", n=len(listeners))
            _tune_gc()

        def _when_running() -> None:
            # "ready" only once the reactor runs (signal handlers installed, listeners up)
            # the test keeps all: children are the started ones, and started is never reset
            started = [c.started for c in children if c.started is not None]
            DeferredList(started).addCallback(_ready)

        if self.clock is not None and hasattr(self.clock, "callWhenRunning"):
            self.clock.callWhenRunning(_when_running)
        else:
            _when_running()

    def stopService(self) -> Any:
        d = super().stopService()
        if self.shutdown_timeout and self.clock is not None:
            # Bounded shutdown: a service that hangs must not keep SIGTERM from working.
            def _late(failure: Failure) -> None:
                log.warn(
                    "services did not stop within {t} s; exiting anyway", t=self.shutdown_timeout
                )

            d.addTimeout(self.shutdown_timeout, self.clock)
            d.addErrback(_late)
        return d


def _history_budget_message(config: Config, exc: RingMemoryError) -> str:
    """One line naming the ring, what it needs and the key that caps it."""
    return (
        f"{config.source}: history.max_bytes = {exc.max_bytes} is too small: ring "
        f"{exc.name!r} needs {exc.requested} bytes and {exc.in_use} are already allocated "
        "(raise history.max_bytes, or lower the tag's history / the signal's capacity)"
    )


def _tune_gc() -> None:
    """Move start-up objects out of the collector's sight and collect young objects less often.

    Measured (benchmarks/mqtt): full collections over the start-up heap took 17-77 ms, which
    is what the QoS 1 p99 latency showed; frozen, they cost nothing. The per-message objects of
    the hot paths are short-lived and die by reference counting, not by the collector.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _historizable(tag: TagDef) -> bool:
    return not tag.is_array and (tag.data_type.is_numeric or tag.data_type is DataType.BOOLEAN)


def _ring_dtype(tag: TagDef) -> Any:
    if tag.data_type is DataType.BOOLEAN:
        return np.bool_
    if tag.data_type.is_integer:
        return np.float64 if tag.data_type is DataType.UINT64 else np.int64
    return np.float64


def build(
    config: Config, clock: IReactorTime, *, stop_reactor: Callable[[], None] | None = None
) -> tuple[ServerRoot, Core]:
    """The whole server as one MultiService (not started)."""
    import importlib

    store = TagStore(clock, write_timeout=config.server.write_timeout)
    rings = RingRegistry(max_bytes=config.history.max_bytes)
    core = Core(
        config=config, clock=clock, store=store, rings=rings, signals=SignalHub(store, rings)
    )
    _attach_login_and_audit(core)
    root = ServerRoot()
    root.stop_reactor = stop_reactor
    root.clock = clock
    root.core = core

    plant = None
    if config.simulator.enabled:
        from iotserver.sim.plant import SimulatedPlant

        plant = SimulatedPlant(config.simulator, store, clock, core.signals)

    def extra_tags() -> list[TagDef]:
        out: list[TagDef] = plant.tag_defs() if plant else []
        for section in config.sections.values():
            defs = getattr(section, "tag_defs", None)
            if defs is not None:
                out += defs()
        return out

    CoreService(core, extra_tags).setServiceParent(root)
    if plant is not None:
        plant.setServiceParent(root)
    for section_name, target in SERVICE_FACTORIES:
        section = config.sections.get(section_name)
        if section is None:
            continue
        module, _, func = target.partition(":")
        service: Service = getattr(importlib.import_module(module), func)(core, section)
        core.services[section_name] = service
        service.setServiceParent(root)

    first_failure: list[str] = []

    def on_failure(service: AsyncService, failure: Failure) -> None:
        import asyncio

        from twisted.internet.defer import CancelledError

        if first_failure or failure.check(CancelledError, asyncio.CancelledError):
            # The first failure stops the server; starts still under way are cancelled and
            # fail too. Their errors are consequences, not causes: the log keeps the one cause.
            log.info(
                "{name}: start abandoned ({why})",
                name=service.name,
                why=f"after {first_failure[0]} failed" if first_failure else "cancelled",
            )
            return
        first_failure.append(str(service.name))
        if failure.check(StartupError):
            log.critical("{name}: {msg}", name=service.name, msg=str(failure.value))
        else:
            log.failure("{name} failed to start", failure, name=service.name)
        if stop_reactor is not None:
            stop_reactor()

    for child in root:
        if isinstance(child, AsyncService):
            child.on_start_failure = on_failure
    return root, core


def _attach_login_and_audit(core: Core) -> None:
    """One login path and one audit trail for every protocol (``[login]``, ``[audit]``)."""
    from iotserver.security.audit import AuditConfig, AuditLog
    from iotserver.security.login import LoginConfig, Logins

    sections = core.config.sections
    audit_cfg = sections.get("audit") or AuditConfig()
    path = audit_cfg.path(core.config.server.data_dir) if audit_cfg.enabled else None
    core.audit = AuditLog(core.clock, audit_cfg, path)
    core.store.audit = core.audit
    core.logins = Logins(lambda: core.users, core.clock,
                         sections.get("login") or LoginConfig(), audit=core.audit)


def summary_lines(config: Config) -> list[str]:
    """What the configuration would start, for ``iotserver check-config`` and the startup log."""
    lines = [
        f"config: {config.source}",
        f"data directory: {config.server.data_dir}",
        f"tags configured: {len(config.tags)}",
        f"signal channels: {', '.join(s.name for s in config.signals) or 'none'}",
        "simulator: "
        + (f"on, prefix {config.simulator.prefix!r}" if config.simulator.enabled else "off"),
        "TLS certificate: "
        + (
            "generated in <data_dir>/tls on first start"
            if config.tls.generated
            else str(config.tls.cert)
        ),
    ]
    for name, section in config.sections.items():
        describe = getattr(section, "summary", None)
        lines += [f"{name}: {line}" for line in (describe() if describe else ["configured"])]
    return lines
