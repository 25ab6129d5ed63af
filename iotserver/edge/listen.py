"""Listening for a service: endpoints, TLS contexts, limits, one-line errors, warnings, stop.

A service (MQTT, Modbus, the console) owns one :class:`Listeners` and calls :meth:`listen` once
per configured endpoint. It gets:

- the endpoint built from the typed :class:`~iotserver.edge.endpoint.Endpoint` (the one
  parser), TLS served with our policy and a context that SIGHUP reloads (:meth:`reload`);
- the listener's :class:`~iotserver.edge.guard.GuardedFactory` (limits, timeouts, counters);
- a :class:`~iotserver.lifecycle.StartupError` of one line naming the listener when the port is
  taken or a certificate does not load (no traceback);
- :meth:`stop`, which stops every port even when one of them fails to stop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet.task import deferLater
from twisted.logger import Logger

from iotserver.clock import Clock
from iotserver.edge.endpoint import Endpoint, EndpointError, parse_endpoint
from iotserver.edge.guard import DEFAULT_PROBE, GuardedFactory, Probe, RateLimitedLog
from iotserver.edge.limits import EdgeStats, Limits
from iotserver.lifecycle import StartupError

__all__ = ["Listener", "Listeners", "exposure_warnings"]

log = Logger(namespace="iotserver.edge")


def exposure_warnings(what: str, ep: Endpoint, *, anonymous: bool = False,
                      encrypted: bool | None = None, consequence: str = "") -> list[str]:
    """Lines worth a warning at startup: a plain listener reachable off-host, anonymous access.

    ``encrypted`` defaults to "a TLS endpoint" (SSH encrypts by itself: the console passes True).
    """
    out = []
    secure = ep.is_tls if encrypted is None else encrypted
    if not secure and not ep.loopback:
        out.append(f"{what} listener {ep.text} is plain text and REACHABLE OFF-HOST"
                   + (f": {consequence}" if consequence else ""))
    if anonymous:
        out.append(f"{what} listener {ep.text} accepts anonymous clients ({ep.where()})")
    return out


@dataclass
class Listener:
    """One listening port of a service."""

    name: str  #: e.g. "Modbus/TCP Security tls:802"
    endpoint: Endpoint
    factory: GuardedFactory
    port: Any

    @property
    def stats(self) -> EdgeStats:
        return self.factory.stats

    @property
    def address(self) -> str:
        """The endpoint as configured, with the real port when 0 was asked for."""
        try:
            return self.endpoint.with_port(self.port.getHost().port)
        except Exception:
            return self.endpoint.text


class Listeners:
    """The listeners of one service (see module docstring)."""

    def __init__(self, service: str, clock: Clock, reactor: Any = None, *,
                 namespace: str = "iotserver.edge") -> None:
        self.service = service  #: the service's name in the log ("MQTT", "Modbus")
        self.clock = clock
        self._reactor = reactor
        self.listeners: list[Listener] = []
        self._stopped: list[Listener] = []  # stopped, their connections not yet drained
        self.tls_contexts: list[Any] = []  # ReloadableContextFactory, reloaded on SIGHUP
        self.ratelog = RateLimitedLog(clock, logger=Logger(namespace=namespace))

    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    async def listen(self, label: str, endpoint: Endpoint | str, factory: Any, limits: Limits,
                     *, probe: Probe = DEFAULT_PROBE,
                     default_tls: Callable[[], Any] | None = None,
                     require_client_cert: bool = False) -> Listener:
        """Listen on ``endpoint`` with ``factory`` behind the limits; one-line StartupError.

        ``label`` names the listener in errors and the log ("MQTT", "Modbus/TCP Security").
        ``default_tls`` builds the reloadable context of a ``tls:`` endpoint that names no
        certificate of its own (the server's ``[tls]`` material). ``require_client_cert``:
        a ``tls:`` endpoint with its own files requires client certificates whatever its
        ``clientAuth`` says (Modbus/TCP Security).
        """
        from twisted.internet.error import CannotListenError

        try:
            ep = endpoint if isinstance(endpoint, Endpoint) else parse_endpoint(endpoint)
        except EndpointError as exc:
            raise StartupError(f"{label} listener: {exc}") from None
        name = f"{label} {ep.text}"
        try:
            context = (self._tls_context(ep, default_tls, require_client_cert)
                       if ep.is_tls else None)
        except StartupError:
            raise
        except Exception as exc:  # ValueError/OSError from the PKI: the message names the file
            raise StartupError(f"{name}: TLS: {exc}") from None
        guarded = GuardedFactory(name, factory, limits, self.clock, probe=probe,
                                 tls_context=context, ratelog=self.ratelog)
        try:
            port = await _server_endpoint(self.reactor(), ep).listen(guarded)
        except CannotListenError as exc:
            raise StartupError(f"{label} cannot listen on {ep.text}: "
                               f"{exc.socketError or exc}") from None
        except Exception as exc:
            raise StartupError(f"{label} cannot listen on {ep.text}: {exc}") from None
        if context is not None:
            self.tls_contexts.append(context)
        listener = Listener(name, ep, guarded, port)
        self.listeners.append(listener)
        return listener

    def _tls_context(self, ep: Endpoint, default_tls: Callable[[], Any] | None,
                     require_client_cert: bool) -> Any:
        from iotserver.security.tls import reloadable_server_context

        if ep.own_certificate:
            assert ep.cert is not None and ep.key is not None
            mode = ep.client_auth or ("optional" if ep.ca else "none")
            if require_client_cert:
                mode = "required"
            return reloadable_server_context(ep.cert, ep.key, ca_path=ep.ca,
                                             require_client_cert=mode == "required",
                                             verify_client_cert=mode != "none")
        if default_tls is None:
            raise StartupError(f"{ep.text}: no certificate given and no server certificate "
                               "([tls]) to serve")
        return default_tls()

    def reload(self) -> list[str]:
        """SIGHUP: re-read every TLS listener's certificate; what failed (the old one stays)."""
        from iotserver.security.tls import reload_tls

        return reload_tls(self.service, self.tls_contexts)

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters per listener name, for the console and $SYS."""
        return {lst.name: lst.stats.as_dict() for lst in self.listeners}

    def totals(self) -> dict[str, int]:
        return EdgeStats.total([lst.stats for lst in self.listeners])

    async def stop(self) -> None:
        """Stop listening on every port; one that fails is logged and the rest still stop.
        Open connections stay: the service says goodbye in its protocol, then :meth:`drain`."""
        listeners, self.listeners = self.listeners, []
        self._stopped.extend(listeners)
        for lst in listeners:
            try:
                await lst.port.stopListening()
            except Exception:
                log.failure("{name}: stopping the listener failed", name=lst.name)

    async def drain(self) -> None:
        """Abort every connection still open (of stopped listeners) and wait until the
        reactor has processed their loss, so no socket outlives the service's stop."""
        live = [g for lst in self._stopped for g in lst.factory.live]
        self._stopped = []
        for guard in live:
            guard.close()
        for _ in range(20):  # an abort is processed on a later reactor turn
            if not any(g in g.gfactory.live for g in live):
                return
            await deferLater(cast(Any, self.clock), 0, lambda: None)


def _server_endpoint(reactor: Any, ep: Endpoint) -> Any:
    """A Twisted server endpoint for a parsed description. TLS is layered by the guard, so a
    TLS endpoint listens on plain TCP here."""
    from twisted.internet import endpoints

    if ep.kind in ("tcp", "tls", "ssl"):
        assert ep.port is not None
        return endpoints.TCP4ServerEndpoint(reactor, ep.port, backlog=ep.backlog,
                                            interface=ep.interface)
    if ep.kind == "tcp6":
        assert ep.port is not None
        return endpoints.TCP6ServerEndpoint(reactor, ep.port, backlog=ep.backlog,
                                            interface=ep.host)
    if ep.kind == "unix":
        assert ep.path is not None
        return endpoints.UNIXServerEndpoint(reactor, ep.path, backlog=ep.backlog, mode=ep.mode,
                                            wantPID=ep.lockfile)
    return endpoints.serverFromString(reactor, ep.text)  # systemd:, validated by the parser
