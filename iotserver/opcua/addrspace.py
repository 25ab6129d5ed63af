"""The tag address space: a folder per path segment, a Variable per tag, built in bulk.

NodeIds are ``ns=<idx>;s=<path>`` for folders and variables, ``s=<path>#EURange`` /
``#EngineeringUnits`` for properties and ``s=<path>#Reconnect`` for methods; ``#`` can never
appear in a tag path, so these never collide with tags.

Nodes are constructed directly as asyncua ``NodeData`` and inserted into the address space
dictionary. asyncua's AddNodes scans every reference of the parent for each insert (10,000
variables in one folder took 94 s, facts.md); building the structures ourselves is linear and
builds 10,000 tags in well under a second. The node layout (attributes, references) is the one
Part 3 5.5/5.6 prescribes for Objects and Variables, as asyncua's AddNodes would produce it.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable
from typing import Any

from asyncua import ua
from asyncua.server.address_space import AddressSpace, AttributeValue, NodeData

from iotserver.opcua.convert import DATA_TYPE_IDS, VARIANT_TYPES, TimeCache, make_datavalue
from iotserver.tags.model import Quality, TagDef, TagValue
import contextlib

log = logging.getLogger("iotserver.opcua")

A = ua.AttributeIds
ORGANIZES = ua.NodeId(ua.ObjectIds.Organizes)
HAS_COMPONENT = ua.NodeId(ua.ObjectIds.HasComponent)
HAS_PROPERTY = ua.NodeId(ua.ObjectIds.HasProperty)
HAS_TYPE_DEFINITION = ua.NodeId(ua.ObjectIds.HasTypeDefinition)
FOLDER_TYPE = ua.NodeId(ua.ObjectIds.FolderType)
BASE_DATA_VARIABLE_TYPE = ua.NodeId(ua.ObjectIds.BaseDataVariableType)
ANALOG_ITEM_TYPE = ua.NodeId(ua.ObjectIds.AnalogItemType)
PROPERTY_TYPE = ua.NodeId(ua.ObjectIds.PropertyType)
OBJECTS = ua.NodeId(ua.ObjectIds.ObjectsFolder)

# AccessLevel bits, Part 3 8.57
CURRENT_READ = 0x01
CURRENT_WRITE = 0x02
HISTORY_READ = 0x04

# UNECE Recommendation 20 codes for common units (Part 8 5.6.3 EUInformation).
UNECE_NAMESPACE = "http://www.opcfoundation.org/UA/units/un/cefact"
UNECE_CODES = {
    "degC": "CEL", "°C": "CEL", "degF": "FAH", "K": "KEL", "bar": "BAR", "mbar": "MBR",
    "Pa": "PAL", "kPa": "KPA", "MPa": "MPA", "%": "P1", "rpm": "RPM", "1/min": "RPM",
    "A": "AMP", "mA": "4K", "V": "VLT", "kV": "KVT", "W": "WTT", "kW": "KWT", "MW": "MAW",
    "kWh": "KWH", "Hz": "HTZ", "m": "MTR", "mm": "MMT", "cm": "CMT", "m/s": "MTS",
    "mm/s": "C16", "m/s2": "MSK", "m3/h": "MQH", "m3": "MTQ", "l": "LTR", "l/min": "L2",
    "kg": "KGM", "t": "TNE", "s": "SEC", "ms": "C26", "min": "MIN", "h": "HUR", "N": "NEU",
    "kN": "B47", "Nm": "NU",
}


def eu_information(unit: str) -> ua.EUInformation:
    """EUInformation for a unit text; unknown units get UnitId -1 (Part 8 5.6.3)."""
    code = UNECE_CODES.get(unit)
    unit_id = -1
    if code is not None:
        unit_id = 0
        for ch in code:
            unit_id = (unit_id << 8) | ord(ch)
    return ua.EUInformation(NamespaceUri=UNECE_NAMESPACE, UnitId=unit_id,
                            DisplayName=ua.LocalizedText(unit), Description=ua.LocalizedText(unit))


def _dv(value: Any, vtype: ua.VariantType, is_array: bool = False) -> AttributeValue:
    return AttributeValue(ua.DataValue(ua.Variant(value, vtype, None, is_array)))


def _ref(ref_type: ua.NodeId, forward: bool, target: NodeData, type_def: ua.NodeId | None = None
         ) -> ua.ReferenceDescription:
    attrs = target.attributes
    return ua.ReferenceDescription(
        ReferenceTypeId=ref_type,
        IsForward=forward,
        NodeId=target.nodeid,
        BrowseName=attrs[A.BrowseName].value.Value.Value,
        DisplayName=attrs[A.DisplayName].value.Value.Value,
        NodeClass=attrs[A.NodeClass].value.Value.Value,
        TypeDefinition=type_def if type_def is not None else ua.NodeId(),
    )


def _type_ref(type_id: ua.NodeId, node_class: ua.NodeClass) -> ua.ReferenceDescription:
    return ua.ReferenceDescription(ReferenceTypeId=HAS_TYPE_DEFINITION, IsForward=True,
                                   NodeId=type_id, NodeClass=node_class)


def _common(node_id: ua.NodeId, node_class: ua.NodeClass, name: str, idx: int,
            description: str) -> NodeData:
    nd = NodeData(node_id)
    at = nd.attributes
    at[A.NodeId] = _dv(node_id, ua.VariantType.NodeId)
    at[A.NodeClass] = _dv(node_class, ua.VariantType.Int32)
    at[A.BrowseName] = _dv(ua.QualifiedName(name, idx), ua.VariantType.QualifiedName)
    at[A.DisplayName] = _dv(ua.LocalizedText(name), ua.VariantType.LocalizedText)
    at[A.Description] = _dv(ua.LocalizedText(description), ua.VariantType.LocalizedText)
    at[A.WriteMask] = _dv(0, ua.VariantType.UInt32)
    at[A.UserWriteMask] = _dv(0, ua.VariantType.UInt32)
    return nd


def access_level(tag: TagDef) -> int:
    level = CURRENT_READ
    if tag.writable:
        level |= CURRENT_WRITE
    if tag.historize:
        level |= HISTORY_READ
    return level


class TagSpace:
    """Folders and variables for the tag store in one namespace, plus their lookup tables."""

    def __init__(self, aspace: AddressSpace, idx: int) -> None:
        self.aspace = aspace
        self.idx = idx
        self.times = TimeCache()
        self.nodes: dict[str, NodeData] = {}  # path -> folder/variable NodeData
        self.folders: set[str] = set()
        self.tags: dict[str, TagDef] = {}  # path -> TagDef of tag variables
        self.by_node: dict[ua.NodeId, TagDef] = {}
        self.value_attrs: dict[str, AttributeValue] = {}
        self.vtypes: dict[str, ua.VariantType] = {}
        self.channels: dict[ua.NodeId, str] = {}  # signal channel variable -> channel name
        self._pending: dict[str, tuple[TagDef, TagValue]] = {}
        # node -> (parent, the parent's forward reference to it): O(1) unlinking
        self._uplinks: dict[ua.NodeId, tuple[NodeData, ua.ReferenceDescription]] = {}

    def node_id(self, path: str) -> ua.NodeId:
        return ua.NodeId(path, self.idx, ua.NodeIdType.String)

    # -- building ------------------------------------------------------------------------
    def build(self, tags: Iterable[tuple[TagDef, TagValue]], channels: Iterable[str] = ()
              ) -> int:
        """Create variables for ``tags`` and signal ``channels`` (and their folders)."""
        self._pending = {t.path: (t, v) for t, v in tags}
        count = 0
        # Tens of thousands of long-lived objects: a cyclic GC pass every few hundred
        # allocations made building 10,000 tags take 12 s instead of 2.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            count = self._build(channels)
        finally:
            if gc_was_enabled:
                gc.enable()
        return count

    def _build(self, channels: Iterable[str]) -> int:
        count = 0
        for name in channels:
            if name in self._pending or name in self.nodes:
                log.warning("signal channel %s has the path of a tag: no waveform variable", name)
                continue
            self._add_channel(name)
        while self._pending:
            path = next(iter(self._pending))
            tag, value = self._pending.pop(path)
            if self._add_variable(tag, value):
                count += 1
        return count

    def add(self, tag: TagDef, value: TagValue) -> bool:
        """A tag defined at runtime (``store.on_define``)."""
        return self._add_variable(tag, value)

    def _parent(self, path: str) -> NodeData:
        parent_path = path.rpartition("/")[0]
        if not parent_path:
            return self.aspace[OBJECTS]
        nd = self.nodes.get(parent_path)
        if nd is not None:
            return nd
        pending = self._pending.pop(parent_path, None)
        if pending is not None and self._add_variable(*pending):
            return self.nodes[parent_path]
        return self._add_folder(parent_path)

    def _link(self, parent: NodeData, child: NodeData, type_def: ua.NodeId) -> None:
        parent_class = parent.attributes[A.NodeClass].value.Value.Value
        ref_type = ORGANIZES if parent_class == ua.NodeClass.Object else HAS_COMPONENT
        down = _ref(ref_type, True, child, type_def)
        parent.references.append(down)
        child.references.append(_ref(ref_type, False, parent))
        self._uplinks[child.nodeid] = (parent, down)

    def _add_folder(self, path: str) -> NodeData:
        parent = self._parent(path)
        name = path.rpartition("/")[2]
        nd = _common(self.node_id(path), ua.NodeClass.Object, name, self.idx, "")
        nd.attributes[A.EventNotifier] = _dv(0, ua.VariantType.Byte)
        nd.references.append(_type_ref(FOLDER_TYPE, ua.NodeClass.ObjectType))
        self.aspace[nd.nodeid] = nd
        self._link(parent, nd, FOLDER_TYPE)
        self.nodes[path] = nd
        self.folders.add(path)
        return nd

    def _add_variable(self, tag: TagDef, value: TagValue) -> bool:
        path = tag.path
        if path in self.nodes:
            log.warning("tag %s: a folder or variable with this path exists; not exposed", path)
            return False
        parent = self._parent(path)
        name = path.rpartition("/")[2]
        node_id = self.node_id(path)
        nd = _common(node_id, ua.NodeClass.Variable, name, self.idx, tag.description)
        at = nd.attributes
        vtype = VARIANT_TYPES[tag.data_type]
        at[A.DataType] = _dv(DATA_TYPE_IDS[tag.data_type], ua.VariantType.NodeId)
        if tag.shape:
            at[A.ValueRank] = _dv(len(tag.shape), ua.VariantType.Int32)
            at[A.ArrayDimensions] = _dv(list(tag.shape), ua.VariantType.UInt32, True)
        else:
            at[A.ValueRank] = _dv(ua.ValueRank.Scalar, ua.VariantType.Int32)
            at[A.ArrayDimensions] = _dv(None, ua.VariantType.UInt32, True)
        level = access_level(tag)
        at[A.AccessLevel] = _dv(level, ua.VariantType.Byte)
        at[A.UserAccessLevel] = _dv(level, ua.VariantType.Byte)
        at[A.MinimumSamplingInterval] = _dv(0.0, ua.VariantType.Double)
        at[A.Historizing] = _dv(bool(tag.historize), ua.VariantType.Boolean)
        at[A.Value] = AttributeValue(make_datavalue(
            tag, vtype, value.value, int(value.quality), value.source_ns, value.server_ns,
            self.times))
        analog = tag.data_type.is_numeric and tag.low is not None and tag.high is not None
        type_def = ANALOG_ITEM_TYPE if analog else BASE_DATA_VARIABLE_TYPE
        nd.references.append(_type_ref(type_def, ua.NodeClass.VariableType))
        self.aspace[node_id] = nd
        self._link(parent, nd, type_def)
        if analog:
            self._add_property(nd, path, "EURange", ua.Range(tag.low, tag.high),
                               ua.NodeId(ua.ObjectIds.Range))
        if tag.unit:
            self._add_property(nd, path, "EngineeringUnits", eu_information(tag.unit),
                               ua.NodeId(ua.ObjectIds.EUInformation))
        self.nodes[path] = nd
        self.tags[path] = tag
        self.by_node[node_id] = tag
        self.value_attrs[path] = at[A.Value]
        self.vtypes[path] = vtype
        return True

    def _add_property(self, owner: NodeData, path: str, name: str, value: Any,
                      data_type: ua.NodeId) -> None:
        nd = _common(ua.NodeId(f"{path}#{name}", self.idx, ua.NodeIdType.String),
                     ua.NodeClass.Variable, name, 0, "")
        at = nd.attributes
        at[A.Value] = _dv(value, ua.VariantType.ExtensionObject)
        at[A.DataType] = _dv(data_type, ua.VariantType.NodeId)
        at[A.ValueRank] = _dv(ua.ValueRank.Scalar, ua.VariantType.Int32)
        at[A.ArrayDimensions] = _dv(None, ua.VariantType.UInt32, True)
        at[A.AccessLevel] = _dv(CURRENT_READ, ua.VariantType.Byte)
        at[A.UserAccessLevel] = _dv(CURRENT_READ, ua.VariantType.Byte)
        at[A.MinimumSamplingInterval] = _dv(0.0, ua.VariantType.Double)
        at[A.Historizing] = _dv(False, ua.VariantType.Boolean)
        nd.references.append(_type_ref(PROPERTY_TYPE, ua.NodeClass.VariableType))
        self.aspace[nd.nodeid] = nd
        owner.references.append(_ref(HAS_PROPERTY, True, nd, PROPERTY_TYPE))
        nd.references.append(_ref(HAS_PROPERTY, False, owner))

    def _add_channel(self, name: str) -> None:
        """A variable per signal channel: history (the raw waveform) only, Float samples."""
        parent = self._parent(name)
        node_id = self.node_id(name)
        nd = _common(node_id, ua.NodeClass.Variable, name.rpartition("/")[2], self.idx,
                     "Raw waveform of the signal channel (HistoryRead); RMS and Peak below")
        at = nd.attributes
        at[A.DataType] = _dv(ua.NodeId(ua.ObjectIds.Float), ua.VariantType.NodeId)
        at[A.ValueRank] = _dv(ua.ValueRank.Scalar, ua.VariantType.Int32)
        at[A.ArrayDimensions] = _dv(None, ua.VariantType.UInt32, True)
        at[A.AccessLevel] = _dv(CURRENT_READ | HISTORY_READ, ua.VariantType.Byte)
        at[A.UserAccessLevel] = _dv(CURRENT_READ | HISTORY_READ, ua.VariantType.Byte)
        at[A.MinimumSamplingInterval] = _dv(0.0, ua.VariantType.Double)
        at[A.Historizing] = _dv(True, ua.VariantType.Boolean)
        at[A.Value] = AttributeValue(ua.DataValue(
            StatusCode=ua.StatusCode(int(Quality.BAD_WAITING_FOR_INITIAL_DATA))))
        nd.references.append(_type_ref(BASE_DATA_VARIABLE_TYPE, ua.NodeClass.VariableType))
        self.aspace[node_id] = nd
        self._link(parent, nd, BASE_DATA_VARIABLE_TYPE)
        self.nodes[name] = nd
        self.channels[node_id] = name

    # -- removal -------------------------------------------------------------------------
    def remove(self, path: str) -> bool:
        """Remove a tag's variable; monitored items get Bad_NodeIdUnknown (Part 4 5.13.1)."""
        tag = self.tags.pop(path, None)
        if tag is None:
            return False
        nd = self.nodes.pop(path)
        self.by_node.pop(nd.nodeid, None)
        self.vtypes.pop(path, None)
        attval = self.value_attrs.pop(path)
        gone = ua.DataValue(StatusCode=ua.StatusCode(ua.StatusCodes.BadNodeIdUnknown))
        for handle, hook in list(attval.datachange_callbacks.items()):
            sync = getattr(hook, "sync", None)
            if sync is not None:
                sync(handle, gone)
            self.aspace.delete_datachange_callback(handle)
        self._unlink_and_delete(nd)
        return True

    def _unlink(self, nd: NodeData) -> None:
        """Drop the parent's reference to ``nd`` (identity search: NodeId equality is slow)."""
        link = self._uplinks.pop(nd.nodeid, None)
        if link is not None:
            refs = link[0].references
            with contextlib.suppress(ValueError):
                del refs[list(map(id, refs)).index(id(link[1]))]

    def _unlink_and_delete(self, nd: NodeData) -> None:
        for ref in nd.references:
            if ref.ReferenceTypeId == HAS_PROPERTY and ref.IsForward and ref.NodeId in self.aspace:
                del self.aspace[ref.NodeId]
        self._unlink(nd)
        if nd.nodeid in self.aspace:
            del self.aspace[nd.nodeid]
        # drop folders this removal left empty
        parent_path = str(nd.nodeid.Identifier).rpartition("/")[0]
        while parent_path and parent_path in self.folders:
            folder = self.nodes[parent_path]
            if any(r.IsForward and r.ReferenceTypeId in (ORGANIZES, HAS_COMPONENT)
                   for r in folder.references):
                break
            self.folders.discard(parent_path)
            del self.nodes[parent_path]
            self._unlink(folder)
            if folder.nodeid in self.aspace:
                del self.aspace[folder.nodeid]
            parent_path = parent_path.rpartition("/")[0]

    def remove_all(self) -> None:
        for path in list(self.tags):
            self.remove(path)
