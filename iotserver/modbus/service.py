"""The ``modbus`` service: the Modbus TCP server's listeners and the PLC poller's devices.

``core.services["modbus"]`` is this object: ``devices`` (name -> :class:`Device`, each with
``reconnect()`` and ``stats``) for the console and OPC UA methods, ``server`` (the shared server
state with its ``stats``), ``ports`` (the listening ports).
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from iotserver.edge.endpoint import parse_endpoint
from iotserver.edge.guard import Probe
from iotserver.edge.listen import Listeners, exposure_warnings
from iotserver.lifecycle import AsyncService, StartupError, as_deferred
from iotserver.modbus.config import ModbusConfig
from iotserver.modbus.server import ModbusServer

log = Logger(namespace="iotserver.modbus")


def _partial(proto: Any) -> bool:
    return bool(proto.decoder.buffered)


#: The guard's view of a Modbus connection: a frame is under way while the MBAP decoder holds
#: bytes; the first complete request is the "login" (there is none in Modbus TCP).
PROBE = Probe(partial=_partial)


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
        self.listeners: Listeners | None = None  # ports, limits, TLS contexts (SIGHUP)

    def _reactor(self) -> Any:
        from twisted.internet import reactor

        return reactor

    def _context_factory(self) -> Any:
        """Modbus/TCP Security with the server's own certificate and CA, client certs required."""
        from iotserver.security.tls import reloadable_server_context

        material = self.core.tls
        if material is None:
            raise StartupError("Modbus/TCP Security listener: no TLS material loaded")
        return reloadable_server_context(material.cert_path, material.key_path,
                                         ca_path=material.ca_cert_path,
                                         require_client_cert=True)

    async def start(self) -> None:
        await self._start_devices()
        scfg = self.cfg.server
        if scfg is None or not scfg.enabled:
            return
        self.server = ModbusServer(scfg, self.core.store, self.core.clock)
        self.server.start()
        self.core.reload_hooks.append(self.reload)
        self.listeners = Listeners("Modbus", self.core.clock, namespace="iotserver.modbus")
        for description in scfg.endpoints:
            ep = parse_endpoint(description)
            secure = ep.is_tls
            what = "Modbus/TCP Security" if secure else "Modbus TCP"
            listener = await self.listeners.listen(
                what, ep, self.server.factory(secure), scfg.limits, probe=PROBE,
                default_tls=self._context_factory, require_client_cert=True)
            self.ports.append(listener.port)
            self.core.listening(what, listener.address)
            for warning in exposure_warnings(
                    "Modbus TCP", ep, consequence="anyone on the network can read and write "
                    "the mapped tags; prefer tls: (Modbus/TCP Security) off loopback"):
                log.warn("{warning}", warning=warning)

    def edge_stats(self) -> dict[str, dict[str, int]]:
        """Per listener: connections accepted, open, refused, closed by each timeout."""
        return self.listeners.stats() if self.listeners is not None else {}

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
        problems = self.listeners.reload() if self.listeners is not None else []
        if problems:
            raise ValueError("; ".join(problems))

    async def stop(self) -> None:
        if self.reload in self.core.reload_hooks:
            self.core.reload_hooks.remove(self.reload)
        self.ports = []
        if self.listeners is not None:
            await self.listeners.stop()
        if self.server is not None:
            self.server.disconnect_all()
            self.server.stop()
        if self.listeners is not None:
            await self.listeners.drain()
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
