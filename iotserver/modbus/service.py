"""The ``modbus`` service: the Modbus TCP server's listeners and the PLC poller's devices.

``core.services["modbus"]`` is this object: ``devices`` (name -> :class:`Device`, each with
``reconnect()`` and ``stats``) for the console and OPC UA methods, ``server`` (the shared server
state with its ``stats``), ``ports`` (the listening ports).
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from iotserver.confparse import is_loopback_endpoint
from iotserver.lifecycle import AsyncService, StartupError, as_deferred
from iotserver.modbus.config import ModbusConfig
from iotserver.modbus.server import ModbusServer

log = Logger(namespace="iotserver.modbus")


class ModbusService(AsyncService):
    """Starts listeners and pollers; stops them all (idempotent, safe after a partial start)."""

    name = "modbus"

    def __init__(self, core: Any, cfg: ModbusConfig) -> None:
        super().__init__()
        self.core = core
        self.cfg = cfg
        self.server: ModbusServer | None = None
        self.ports: list[Any] = []
        self.devices: dict[str, Any] = {}
        self.tls_contexts: list[Any] = []  # reloadable TLS contexts of the listeners (SIGHUP)

    def _reactor(self) -> Any:
        from twisted.internet import reactor

        return reactor

    def _context_factory(self) -> Any:
        """Modbus/TCP Security with the server's own certificate and CA, client certs required."""
        from iotserver.security.tls import reloadable_server_context

        material = self.core.tls
        if material is None:
            raise StartupError("Modbus/TCP Security listener: no TLS material loaded")
        context = reloadable_server_context(material.cert_path, material.key_path,
                                            ca_path=material.ca_cert_path,
                                            require_client_cert=True)
        self.tls_contexts.append(context)
        return context

    async def start(self) -> None:
        from twisted.internet.error import CannotListenError

        from iotserver.security.tls import parse_tls_description, server_endpoint

        await self._start_devices()
        scfg = self.cfg.server
        if scfg is None or not scfg.enabled:
            return
        self.server = ModbusServer(scfg, self.core.store, self.core.clock)
        self.server.start()
        self.core.reload_hooks.append(self.reload)
        reactor = self._reactor()
        for description in scfg.endpoints:
            secure = description.startswith("tls:")
            endpoint: Any
            try:
                if secure and "cert" not in parse_tls_description(description):
                    endpoint = server_endpoint(reactor, description, self._context_factory())
                else:
                    endpoint = server_endpoint(reactor, description,
                                               reloadable=self.tls_contexts)
            except (ValueError, OSError) as exc:
                raise StartupError(f"modbus server endpoint {description!r}: {exc}") from None
            try:
                port = await endpoint.listen(self.server.factory(secure))
            except CannotListenError as exc:
                raise StartupError(f"Modbus server cannot listen on {description}: "
                                   f"{exc.socketError or exc}") from None
            self.ports.append(port)
            what = "Modbus/TCP Security" if secure else "Modbus TCP"
            self.core.listening(what, description)
            if not secure and not is_loopback_endpoint(description):
                log.warn("the Modbus TCP listener {ep} is plain text and reachable from other "
                         "hosts: anyone on the network can read and write the mapped tags; "
                         "prefer tls: (Modbus/TCP Security) off loopback", ep=description)

    async def _start_devices(self) -> None:
        if not self.cfg.devices:
            return
        from iotserver.modbus.poller import Device

        for dcfg in self.cfg.devices:
            device = Device(dcfg, self.core.store)
            self.devices[dcfg.name] = device
            device.start()

    def reload(self) -> None:
        """SIGHUP / console: re-read the TLS listeners' certificates (Modbus/TCP Security)."""
        from iotserver.security.tls import reload_tls

        problems = reload_tls("Modbus", self.tls_contexts)
        if problems:
            raise ValueError("; ".join(problems))

    async def stop(self) -> None:
        if self.reload in self.core.reload_hooks:
            self.core.reload_hooks.remove(self.reload)
        ports, self.ports = self.ports, []
        for port in ports:
            await port.stopListening()
        if self.server is not None:
            self.server.disconnect_all()
            self.server.stop()
        devices = list(self.devices.values())
        for device in devices:
            await as_deferred(device.stop())


    # -- source control (OPC UA "Reconnect" methods, console) ---------------------------------
    def source_names(self) -> list[str]:
        """Tag owners this service answers for: ``modbus:<device>``."""
        return [f"modbus:{name}" for name in self.devices]

    def reconnect_source(self, owner: str) -> bool:
        """Reconnect the device that owns ``owner``'s tags now; False if it is not ours."""
        device = self.devices.get(owner.removeprefix("modbus:"))
        if device is None or not owner.startswith("modbus:"):
            return False
        device.reconnect()
        return True


def make_service(core: Any, cfg: ModbusConfig) -> ModbusService:
    return ModbusService(core, cfg)
