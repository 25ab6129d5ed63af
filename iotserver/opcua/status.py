"""Server object contents: BuildInfo, ServerCapabilities, HistoryServerCapabilities, methods.

Part 5 6.3.2 (ServerCapabilitiesType, values from :mod:`.capabilities`) and Part 11 5.4.2
(HistoryServerCapabilitiesType): the limits a client can discover before it runs into them,
and the aggregate functions we serve.
Reconnect methods (one per source folder) let an operator with the engineer or admin role
force a dead PLC connection to be retried now.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from asyncua import Server, ua

from iotserver.opcua import aggregates
from iotserver.opcua.capabilities import capabilities

if TYPE_CHECKING:
    from iotserver.opcua.config import OpcUaConfig
    from iotserver.opcua.session import IotInternalServer

log = logging.getLogger("iotserver.opcua")
ORGANIZES = ua.NodeId(ua.ObjectIds.Organizes)
PRODUCT_VERSION = "0.1.0"


class ServerInfo:
    def __init__(self, server: Server, iserver: IotInternalServer, cfg: OpcUaConfig,
                 service: Any) -> None:
        self.server = server
        self.iserver = iserver
        self.cfg = cfg
        self.service = service
        self.methods: dict[ua.NodeId, str] = {}

    async def _write(self, node_id: int, value: Any, vtype: ua.VariantType) -> None:
        await self.iserver.write_attribute_value(
            ua.NodeId(node_id), ua.DataValue(ua.Variant(value, vtype)))

    async def fill(self) -> None:
        cfg = self.cfg
        oid = ua.ObjectIds
        await self.server.set_build_info(
            "urn:iotserver", "iotserver", "iotserver", PRODUCT_VERSION, PRODUCT_VERSION,
            _dt.datetime(2026, 1, 1, tzinfo=_dt.UTC))
        u32 = ua.VariantType.UInt32
        limits = getattr(self.server, "limits", None)
        max_message = getattr(limits, "max_message_size", 0) or 0
        for node_id, (value, vtype) in capabilities(cfg, max_message).items():
            await self._write(node_id, value, vtype)
        hist = {
            oid.HistoryServerCapabilities_AccessHistoryDataCapability: True,
            oid.HistoryServerCapabilities_AccessHistoryEventsCapability: False,
            oid.HistoryServerCapabilities_InsertDataCapability: False,
            oid.HistoryServerCapabilities_ReplaceDataCapability: False,
            oid.HistoryServerCapabilities_UpdateDataCapability: False,
            oid.HistoryServerCapabilities_DeleteRawCapability: False,
            oid.HistoryServerCapabilities_DeleteAtTimeCapability: False,
            oid.HistoryServerCapabilities_InsertEventCapability: False,
            oid.HistoryServerCapabilities_ReplaceEventCapability: False,
            oid.HistoryServerCapabilities_UpdateEventCapability: False,
            oid.HistoryServerCapabilities_DeleteEventCapability: False,
            oid.HistoryServerCapabilities_InsertAnnotationCapability: False,
            oid.HistoryServerCapabilities_ServerTimestampSupported: False,
        }
        for node_id, flag in hist.items():
            await self._write(node_id, flag, ua.VariantType.Boolean)
        await self._write(oid.HistoryServerCapabilities_MaxReturnDataValues,
                          cfg.max_history_values, u32)
        await self._write(oid.HistoryServerCapabilities_MaxReturnEventValues, 0, u32)
        # the aggregate functions we compute, in both AggregateFunctions folders (Part 13 4.4)
        items = []
        for folder in (oid.Server_ServerCapabilities_AggregateFunctions,
                       oid.HistoryServerCapabilities_AggregateFunctions):
            for fn in aggregates.AGGREGATES:
                ref = ua.AddReferencesItem()
                ref.SourceNodeId = ua.NodeId(folder)
                ref.ReferenceTypeId = ORGANIZES
                ref.IsForward = True
                ref.TargetNodeId = ua.NodeId(fn)
                ref.TargetNodeClass = ua.NodeClass.Object
                items.append(ref)
        for result in await self.iserver.isession.add_references(items):
            if not result.is_good():
                log.debug("aggregate function reference not added: %s", result)

    async def add_source_methods(self, owners: list[str],
                                 reconnect: Callable[[str], bool]) -> None:
        """A ``Reconnect`` method on the folder that holds each source's tags."""
        space = self.service.space
        for owner in dict.fromkeys(owners):
            paths = [t.path for t in space.tags.values() if t.owner == owner]
            folder = _common_folder(paths)
            if folder is None or folder not in space.folders:
                log.info("OPC UA: no common folder for the tags of %s: no Reconnect method",
                         owner)
                continue
            space.keep(folder)  # asyncua adds the method's reference to the folder node
            node = self.server.get_node(space.node_id(folder))
            method_id = ua.NodeId(f"{folder}#Reconnect", space.idx, ua.NodeIdType.String)

            async def call(parent: ua.NodeId, owner: str = owner) -> Any:
                ok = await self.service.reconnect(owner)
                return [] if ok else ua.StatusCode(ua.StatusCodes.BadNotFound)

            await node.add_method(method_id, ua.QualifiedName("Reconnect", space.idx),
                                  call, [], [])
            self.methods[method_id] = owner
        self.iserver.source_methods = self.methods


def _common_folder(paths: list[str]) -> str | None:
    if not paths:
        return None
    parts = [p.split("/")[:-1] for p in paths]
    common: list[str] = []
    for segs in zip(*parts, strict=False):
        if all(s == segs[0] for s in segs):
            common.append(segs[0])
        else:
            break
    return "/".join(common) or None

