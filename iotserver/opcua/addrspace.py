"""The tag address space: a folder per path segment, a Variable per tag, all virtual.

NodeIds are ``ns=<idx>;s=<path>`` for folders and variables, ``s=<path>#EURange`` /
``#EngineeringUnits`` for properties and ``s=<path>#Reconnect`` for methods; ``#`` can never
appear in a tag path, so these never collide with tags.

No node of this namespace is stored: :class:`TagSpace` keeps the tag definitions, the folder
paths and, per parent, the ordered paths of its children (a few hundred bytes per tag), and
builds a node's asyncua ``NodeData`` when a service looks it up (:mod:`.nodecache`: LRU
cache, monitored attributes kept). The Value attribute reads the tag store at read time. The
node layout (attributes, references and their order) is the one Part 3 5.5/5.6 prescribes for
Objects and Variables, as asyncua's AddNodes would produce it; 100,000 stored tag variables
took 800 MB and 16 s to build, the virtual ones take about 25 MB and well under a second.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from asyncua import ua
from asyncua.server.address_space import AddressSpace, AttributeValue, NodeData

from iotserver.opcua.convert import DATA_TYPE_IDS, VARIANT_TYPES, TimeCache, make_datavalue
from iotserver.opcua.nodecache import DEFAULT_CAPACITY, TagAddressSpace
from iotserver.tags.model import Quality, TagDef, TagValue

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
_NULL_ID = ua.NodeId()
_OBJECT = ua.NodeClass.Object
_VARIABLE = ua.NodeClass.Variable
PROPERTIES = ("EURange", "EngineeringUnits")

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


_SHARED: dict[tuple[type, Any, ua.VariantType, bool], ua.DataValue] = {}
_SHAREABLE = (type(None), bool, int, float, ua.NodeId)


def _dv(value: Any, vtype: ua.VariantType, is_array: bool = False) -> AttributeValue:
    """An attribute. DataValues of scalar constants are shared between nodes: they are never
    mutated (virtual node attributes cannot be written, nodecache.TagAddressSpace)."""
    if not isinstance(value, _SHAREABLE):
        return AttributeValue(ua.DataValue(ua.Variant(value, vtype, None, is_array)))
    key = (type(value), value, vtype, is_array)
    dv = _SHARED.get(key)
    if dv is None:
        dv = _SHARED[key] = ua.DataValue(ua.Variant(value, vtype, None, is_array))
    return AttributeValue(dv)


def _type_ref(type_id: ua.NodeId, node_class: ua.NodeClass) -> ua.ReferenceDescription:
    return ua.ReferenceDescription(ReferenceTypeId=HAS_TYPE_DEFINITION, IsForward=True,
                                   NodeId=type_id, NodeClass=node_class)


def _common(node_id: ua.NodeId, node_class: ua.NodeClass, name: str, idx: int,
            description: str) -> NodeData:
    nd = NodeData(node_id)
    at = nd.attributes
    at[A.NodeId] = AttributeValue(ua.DataValue(ua.Variant(node_id, ua.VariantType.NodeId)))
    at[A.NodeClass] = _dv(node_class, ua.VariantType.Int32)
    at[A.BrowseName] = _dv(ua.QualifiedName(name, idx), ua.VariantType.QualifiedName)
    at[A.DisplayName] = _dv(ua.LocalizedText(name), ua.VariantType.LocalizedText)
    at[A.Description] = _dv(ua.LocalizedText(description), ua.VariantType.LocalizedText)
    at[A.WriteMask] = _dv(0, ua.VariantType.UInt32)
    at[A.UserWriteMask] = _dv(0, ua.VariantType.UInt32)
    return nd


def _variable_attrs(nd: NodeData, data_type: ua.NodeId, shape: tuple[int, ...], level: int,
                    historizing: bool) -> None:
    at = nd.attributes
    at[A.DataType] = _dv(data_type, ua.VariantType.NodeId)
    if shape:
        at[A.ValueRank] = _dv(len(shape), ua.VariantType.Int32)
        at[A.ArrayDimensions] = _dv(list(shape), ua.VariantType.UInt32, True)
    else:
        at[A.ValueRank] = _dv(ua.ValueRank.Scalar, ua.VariantType.Int32)
        at[A.ArrayDimensions] = _dv(None, ua.VariantType.UInt32, True)
    at[A.AccessLevel] = _dv(level, ua.VariantType.Byte)
    at[A.UserAccessLevel] = _dv(level, ua.VariantType.Byte)
    at[A.MinimumSamplingInterval] = _dv(0.0, ua.VariantType.Double)
    at[A.Historizing] = _dv(historizing, ua.VariantType.Boolean)


def access_level(tag: TagDef) -> int:
    level = CURRENT_READ
    if tag.writable:
        level |= CURRENT_WRITE
    if tag.historize:
        level |= HISTORY_READ
    return level


def is_analog(tag: TagDef) -> bool:
    """AnalogItemType with an EURange property (Part 8 5.3.2.2)."""
    return tag.data_type.is_numeric and tag.low is not None and tag.high is not None


def _gone() -> ua.DataValue:
    return ua.DataValue(StatusCode=ua.StatusCode(ua.StatusCodes.BadNodeIdUnknown))


class TagSpace:
    """The tag namespace: what exists, and the nodes built from it on demand."""

    def __init__(self, aspace: AddressSpace, idx: int,
                 read: Callable[[str], TagValue] | None = None,
                 cache_size: int = DEFAULT_CAPACITY) -> None:
        self.aspace = TagAddressSpace.install(aspace, self, cache_size)
        self.table = self.aspace.table
        self.idx = idx
        self.read = read  # the store's current value; without one, the values given to build
        self.times = TimeCache()
        self.tags: dict[str, TagDef] = {}  # path -> TagDef of exposed tag variables
        self.folders: set[str] = set()
        self.channels: set[str] = set()  # signal channel (waveform) variables
        self.kids: dict[str, dict[str, None]] = {}  # parent path -> child paths, in order
        # tag path -> its Value AttributeValue while monitored items watch it (the pump's list)
        self.monitored: dict[str, AttributeValue] = {}
        self._values: dict[str, TagValue] = {}
        self._top: dict[str, ua.ReferenceDescription] = {}  # Objects' references to our nodes
        self._pending: dict[str, tuple[TagDef, TagValue]] = {}
        self._building = False

    def node_id(self, path: str) -> ua.NodeId:
        return ua.NodeId(path, self.idx, ua.NodeIdType.String)

    def _split(self, node_id: ua.NodeId) -> tuple[str, str | None] | None:
        """(path, property name or None) of a NodeId in our namespace."""
        if not isinstance(node_id, ua.NodeId) or node_id.NamespaceIndex != self.idx:
            return None
        ident = node_id.Identifier
        if type(ident) is not str:
            return None
        path, sep, prop = ident.partition("#")
        return path, (prop if sep else None)

    def tag_of(self, node_id: ua.NodeId) -> TagDef | None:
        """The tag whose variable this is (not its properties)."""
        if node_id.NamespaceIndex != self.idx or type(node_id.Identifier) is not str:
            return None
        return self.tags.get(node_id.Identifier)

    def channel_of(self, node_id: ua.NodeId) -> str | None:
        if node_id.NamespaceIndex != self.idx or node_id.Identifier not in self.channels:
            return None
        return str(node_id.Identifier)

    def exists(self, path: str) -> bool:
        return path in self.tags or path in self.folders or path in self.channels

    def keep(self, path: str) -> NodeData:
        """Keep a folder's node for good: asyncua is about to change it (add a method)."""
        return self.table.keep(self.node_id(path))

    # -- building ------------------------------------------------------------------------
    def build(self, tags: Iterable[tuple[TagDef, TagValue]], channels: Iterable[str] = ()
              ) -> int:
        """Expose ``tags`` and signal ``channels`` (creating their folders)."""
        self._pending = {t.path: (t, v) for t, v in tags}
        count = 0
        self._building = True
        try:
            for name in channels:
                if name in self._pending or self.exists(name):
                    log.warning("signal channel %s has the path of a tag: no waveform variable",
                                name)
                    continue
                self._ensure_parent(name)
                self.channels.add(name)
                self._link(name)
            for path in list(self._pending):
                item = self._pending.pop(path, None)
                if item is not None and self._add_variable(*item):
                    count += 1
        finally:
            self._pending = {}
            self._building = False
        return count

    def add(self, tag: TagDef, value: TagValue) -> bool:
        """A tag defined at runtime (``store.on_define``)."""
        return self._add_variable(tag, value)

    def _add_variable(self, tag: TagDef, value: TagValue) -> bool:
        path = tag.path
        if self.exists(path):
            log.warning("tag %s: a folder or variable with this path exists; not exposed", path)
            return False
        self._ensure_parent(path)
        self.tags[path] = tag
        if self.read is None:
            self._values[path] = value
        self._link(path)
        return True

    def _ensure_parent(self, path: str) -> None:
        parent = path.rpartition("/")[0]
        if not parent or self.exists(parent):
            return
        pending = self._pending.pop(parent, None)
        if pending is not None and self._add_variable(*pending):
            return
        self._ensure_parent(parent)
        self.folders.add(parent)
        self._link(parent)

    def _link(self, path: str) -> None:
        """Add ``path`` to its parent's children (which exist already)."""
        parent = path.rpartition("/")[0]
        if not parent:
            objects = self.aspace[OBJECTS]
            ref = self._child_ref(ORGANIZES, path)
            objects.references.append(ref)
            self._top[path] = ref
            return
        self.kids.setdefault(parent, {})[path] = None
        if not self._building:
            self._parent_changed(parent, path, True)

    def _parent_changed(self, parent: str, child: str, added: bool) -> None:
        """Keep a built node of ``parent`` in step with its children."""
        pid = self.node_id(parent)
        node = self.table.kept.get(pid)
        if node is None:
            self.table.forget(pid)  # rebuilt from the children table when next looked up
            return
        if added:
            node.references.append(self._child_ref(self._down_type(parent), child))
            return
        cid = self.node_id(child)
        node.references[:] = [r for r in node.references if not (r.IsForward and r.NodeId == cid)]

    # -- removal -------------------------------------------------------------------------
    def remove(self, path: str) -> bool:
        """Remove a tag's variable; monitored items get Bad_NodeIdUnknown (Part 4 5.13.1)."""
        tag = self.tags.get(path)
        if tag is None:
            return False
        for prop in self._properties(tag):
            self._drop(self.node_id(f"{path}#{prop}"))
        self._drop(self.node_id(path))
        del self.tags[path]
        self._values.pop(path, None)
        self.monitored.pop(path, None)
        if self.kids.get(path):
            self.folders.add(path)  # tags below a removed tag stay reachable through a folder
            self.table.forget(self.node_id(path))
            self._relink(path)
            return True
        self._unlink(path)
        return True

    def _relink(self, path: str) -> None:
        """Renew the parent's reference to ``path`` (its node class changed)."""
        parent = path.rpartition("/")[0]
        if parent:
            self._parent_changed(parent, path, False)
            self._parent_changed(parent, path, True)
            return
        old, new = self._top.get(path), self._child_ref(ORGANIZES, path)
        refs = self.aspace[OBJECTS].references
        refs[:] = [new if r is old else r for r in refs]
        self._top[path] = new

    def _drop(self, node_id: ua.NodeId) -> None:
        gone = _gone()
        for handle, hook in self.aspace.live_handles(node_id):
            sync = getattr(hook, "sync", None)
            if sync is not None:
                sync(handle, gone)
            self.aspace.delete_datachange_callback(handle)
        self.table.forget(node_id)
        self.table.live.pop(node_id, None)

    def _unlink(self, path: str) -> None:
        """Drop ``path`` from its parent, and the folders this leaves empty."""
        parent = path.rpartition("/")[0]
        if not parent:
            ref = self._top.pop(path, None)
            if ref is not None:
                refs = self.aspace[OBJECTS].references
                for i, r in enumerate(refs):
                    if r is ref:  # identity: NodeId equality is slow
                        del refs[i]
                        break
            return
        siblings = self.kids.get(parent)
        if siblings is not None:
            siblings.pop(path, None)
            if not siblings:
                del self.kids[parent]
        self._parent_changed(parent, path, False)
        pid = self.node_id(parent)
        if parent in self.folders and parent not in self.kids and pid not in self.table.kept:
            self._drop(pid)
            self.folders.discard(parent)
            self._unlink(parent)

    def remove_all(self) -> None:
        for path in list(self.tags):
            self.remove(path)

    # -- nodes on demand (nodecache.NodeProvider) -------------------------------------------
    def has_node(self, node_id: ua.NodeId) -> bool:
        split = self._split(node_id)
        if split is None:
            return False
        path, prop = split
        if prop is None:
            return self.exists(path)
        tag = self.tags.get(path)
        return tag is not None and prop in self._properties(tag)

    def make_node(self, node_id: ua.NodeId) -> NodeData | None:
        split = self._split(node_id)
        if split is None:
            return None
        path, prop = split
        tag = self.tags.get(path)
        if prop is not None:
            if tag is None or prop not in self._properties(tag):
                return None
            return self._property_node(node_id, tag, prop)
        if tag is not None:
            return self._variable_node(node_id, tag)
        if path in self.folders:
            return self._folder_node(node_id, path)
        if path in self.channels:
            return self._channel_node(node_id, path)
        return None

    def attribute_live(self, node_id: ua.NodeId, attr: int, attval: AttributeValue | None
                       ) -> None:
        if attr != A.Value:
            return
        tag = self.tag_of(node_id)
        if tag is None:
            return
        if attval is None:
            self.monitored.pop(tag.path, None)
        else:
            self.monitored[tag.path] = attval

    def current(self, path: str) -> TagValue:
        """The tag's current sample (KeyError when it has none)."""
        return self.read(path) if self.read is not None else self._values[path]

    def _value(self, node_id: ua.NodeId, attr: int) -> ua.DataValue:
        """Value attribute callback of tag variables: the store's current sample."""
        tag = self.tag_of(node_id)
        if tag is None:
            return _gone()
        try:
            tv = self.current(tag.path)
        except KeyError:
            return _gone()
        return make_datavalue(tag, VARIANT_TYPES[tag.data_type], tv.value, int(tv.quality),
                              tv.source_ns, tv.server_ns, self.times)

    @staticmethod
    def _properties(tag: TagDef) -> tuple[str, ...]:
        if is_analog(tag):
            return PROPERTIES if tag.unit else PROPERTIES[:1]
        return PROPERTIES[1:] if tag.unit else ()

    def _down_type(self, path: str) -> ua.NodeId:
        """Reference type from ``path`` to its children: Organizes below folders."""
        return ORGANIZES if path in self.folders else HAS_COMPONENT

    def _child_ref(self, ref_type: ua.NodeId, path: str) -> ua.ReferenceDescription:
        name = path.rpartition("/")[2]
        tag = self.tags.get(path)
        if tag is not None:
            node_class = _VARIABLE
            type_def = ANALOG_ITEM_TYPE if is_analog(tag) else BASE_DATA_VARIABLE_TYPE
        elif path in self.channels:
            node_class, type_def = _VARIABLE, BASE_DATA_VARIABLE_TYPE
        else:
            node_class, type_def = _OBJECT, FOLDER_TYPE
        return ua.ReferenceDescription(
            ReferenceTypeId=ref_type, IsForward=True, NodeId=self.node_id(path),
            BrowseName=ua.QualifiedName(name, self.idx), DisplayName=ua.LocalizedText(name),
            NodeClass=node_class, TypeDefinition=type_def)

    def _up_ref(self, path: str) -> ua.ReferenceDescription:
        """The inverse reference from ``path`` to its parent."""
        parent = path.rpartition("/")[0]
        if not parent:
            at = self.aspace[OBJECTS].attributes
            return ua.ReferenceDescription(
                ReferenceTypeId=ORGANIZES, IsForward=False, NodeId=OBJECTS,
                BrowseName=at[A.BrowseName].value.Value.Value,
                DisplayName=at[A.DisplayName].value.Value.Value,
                NodeClass=at[A.NodeClass].value.Value.Value, TypeDefinition=_NULL_ID)
        name = parent.rpartition("/")[2]
        folder = parent in self.folders
        return ua.ReferenceDescription(
            ReferenceTypeId=ORGANIZES if folder else HAS_COMPONENT, IsForward=False,
            NodeId=self.node_id(parent), BrowseName=ua.QualifiedName(name, self.idx),
            DisplayName=ua.LocalizedText(name), NodeClass=_OBJECT if folder else _VARIABLE,
            TypeDefinition=_NULL_ID)

    def _children(self, nd: NodeData, path: str) -> None:
        kids = self.kids.get(path)
        if kids:
            ref_type = self._down_type(path)
            nd.references += [self._child_ref(ref_type, child) for child in kids]

    def _folder_node(self, node_id: ua.NodeId, path: str) -> NodeData:
        nd = _common(node_id, _OBJECT, path.rpartition("/")[2], self.idx, "")
        nd.attributes[A.EventNotifier] = _dv(0, ua.VariantType.Byte)
        nd.references += [_type_ref(FOLDER_TYPE, ua.NodeClass.ObjectType), self._up_ref(path)]
        self._children(nd, path)
        return nd

    def _variable_node(self, node_id: ua.NodeId, tag: TagDef) -> NodeData:
        path = tag.path
        nd = _common(node_id, _VARIABLE, path.rpartition("/")[2], self.idx, tag.description)
        _variable_attrs(nd, DATA_TYPE_IDS[tag.data_type], tag.shape, access_level(tag),
                        bool(tag.historize))
        value = AttributeValue(None)
        value.value_callback = self._value
        nd.attributes[A.Value] = value
        type_def = ANALOG_ITEM_TYPE if is_analog(tag) else BASE_DATA_VARIABLE_TYPE
        refs = nd.references
        refs += [_type_ref(type_def, ua.NodeClass.VariableType), self._up_ref(path)]
        for prop in self._properties(tag):
            refs.append(ua.ReferenceDescription(
                ReferenceTypeId=HAS_PROPERTY, IsForward=True,
                NodeId=self.node_id(f"{path}#{prop}"), BrowseName=ua.QualifiedName(prop, 0),
                DisplayName=ua.LocalizedText(prop), NodeClass=_VARIABLE,
                TypeDefinition=PROPERTY_TYPE))
        self._children(nd, path)
        return nd

    def _property_node(self, node_id: ua.NodeId, tag: TagDef, prop: str) -> NodeData:
        if prop == "EURange":
            value: Any = ua.Range(tag.low, tag.high)
            data_type = ua.NodeId(ua.ObjectIds.Range)
        else:
            value = eu_information(tag.unit)
            data_type = ua.NodeId(ua.ObjectIds.EUInformation)
        nd = _common(node_id, _VARIABLE, prop, 0, "")
        nd.attributes[A.Value] = AttributeValue(
            ua.DataValue(ua.Variant(value, ua.VariantType.ExtensionObject)))
        _variable_attrs(nd, data_type, (), CURRENT_READ, False)
        name = tag.path.rpartition("/")[2]
        nd.references += [
            _type_ref(PROPERTY_TYPE, ua.NodeClass.VariableType),
            ua.ReferenceDescription(
                ReferenceTypeId=HAS_PROPERTY, IsForward=False, NodeId=self.node_id(tag.path),
                BrowseName=ua.QualifiedName(name, self.idx), DisplayName=ua.LocalizedText(name),
                NodeClass=_VARIABLE, TypeDefinition=_NULL_ID)]
        return nd

    def _channel_node(self, node_id: ua.NodeId, path: str) -> NodeData:
        """A signal channel: history (the raw waveform) only, Float samples."""
        nd = _common(node_id, _VARIABLE, path.rpartition("/")[2], self.idx,
                     "Raw waveform of the signal channel (HistoryRead); RMS and Peak below")
        _variable_attrs(nd, ua.NodeId(ua.ObjectIds.Float), (), CURRENT_READ | HISTORY_READ,
                        True)
        nd.attributes[A.Value] = AttributeValue(ua.DataValue(
            StatusCode=ua.StatusCode(int(Quality.BAD_WAITING_FOR_INITIAL_DATA))))
        nd.references += [_type_ref(BASE_DATA_VARIABLE_TYPE, ua.NodeClass.VariableType),
                          self._up_ref(path)]
        self._children(nd, path)
        return nd
