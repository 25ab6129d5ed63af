"""The Modbus service: the TCP server and the PLC poller under one AsyncService (in progress)."""

from __future__ import annotations

from typing import Any

from iotserver.lifecycle import AsyncService
from iotserver.modbus.config import ModbusConfig


class ModbusService(AsyncService):
    name = "modbus"

    def __init__(self, core: Any, cfg: ModbusConfig) -> None:
        super().__init__()
        self.core = core
        self.cfg = cfg
        self.devices: dict[str, Any] = {}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def make_service(core: Any, cfg: ModbusConfig) -> ModbusService:
    return ModbusService(core, cfg)
