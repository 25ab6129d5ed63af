"""Virtual tag nodes: built on lookup from the tag store, cached, kept while monitored."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from asyncua import ua
from asyncua.server.address_space import AddressSpace, AttributeValue, NodeData, ViewService
from twisted.internet.task import Clock

from iotserver.opcua.addrspace import OBJECTS, TagSpace
from iotserver.opcua.monitoring import IotMonitoredItemService, Limits
from iotserver.opcua.values import ValuePump
from iotserver.tags.model import Access, Change, DataType, Quality, TagDef, Update
from iotserver.tags.store import TagStore

A = ua.AttributeIds
NS = 2
ORGANIZES = ua.NodeId(ua.ObjectIds.Organizes)
HAS_COMPONENT = ua.NodeId(ua.ObjectIds.HasComponent)
HAS_PROPERTY = ua.NodeId(ua.ObjectIds.HasProperty)
VARIABLE_ATTRS = {A.NodeId, A.NodeClass, A.BrowseName, A.DisplayName, A.Description,
                  A.WriteMask, A.UserWriteMask, A.DataType, A.ValueRank, A.ArrayDimensions,
                  A.AccessLevel, A.UserAccessLevel, A.MinimumSamplingInterval, A.Historizing,
                  A.Value}
FOLDER_ATTRS = {A.NodeId, A.NodeClass, A.BrowseName, A.DisplayName, A.Description,
                A.WriteMask, A.UserWriteMask, A.EventNotifier}

TEMP = TagDef("Line1/Temp", DataType.FLOAT64, unit="degC", low=0, high=100, historize=True,
              description="Oven temperature")
SETPOINT = TagDef("Line1/Setpoint", DataType.FLOAT32, access=Access.READ_WRITE)
PROFILE = TagDef("Line1/Profile", DataType.INT32, shape=(4,))
LEVEL = TagDef("Tank/Level", DataType.UINT16)


def nid(path: str) -> ua.NodeId:
    return ua.NodeId(path, NS)


def objects_space() -> AddressSpace:
    aspace = AddressSpace()
    objects = NodeData(OBJECTS)
    for attr, value in ((A.NodeClass, ua.Variant(ua.NodeClass.Object, ua.VariantType.Int32)),
                        (A.BrowseName, ua.Variant(ua.QualifiedName("Objects", 0))),
                        (A.DisplayName, ua.Variant(ua.LocalizedText("Objects")))):
        objects.attributes[attr] = AttributeValue(ua.DataValue(value))
    aspace[OBJECTS] = objects
    return aspace


def make(cache_size: int = 64, tags: tuple[TagDef, ...] = (TEMP, SETPOINT, PROFILE, LEVEL)
         ) -> tuple[TagSpace, TagStore]:
    store = TagStore(Clock())
    for tag in tags:
        store.define(tag)
    store.apply([Update(TEMP.path, 21.5, Quality.GOOD, 1_700_000_000_000_000_000),
                 Update(SETPOINT.path, 5.0), Update(PROFILE.path, [1, 2, 3, 4]),
                 Update(LEVEL.path, 7)])
    space = TagSpace(objects_space(), NS, read=store.read, cache_size=cache_size)
    space.build([(t, store.read(t.path)) for t in tags], channels=["Sig/Ch"])
    return space, store


def browse(space: TagSpace, node_id: ua.NodeId, **kw: Any) -> list[ua.ReferenceDescription]:
    desc = ua.BrowseDescription(NodeId=node_id, **kw)
    result = ViewService(space.aspace)._browse(desc)
    result.StatusCode.check()
    return list(result.References)


def read(space: TagSpace, path: str, attr: int) -> Any:
    dv = space.aspace.read_attribute_value(nid(path), attr)
    dv.StatusCode.check()
    return dv.Value.Value


def test_nothing_is_stored_and_nodes_are_built_on_lookup() -> None:
    space, _ = make()
    assert not [k for k in space.aspace._nodes if k.NamespaceIndex == NS]
    assert not space.table.cache
    for path in ("Line1", "Line1/Temp", "Line1/Temp#EURange", "Line1/Temp#EngineeringUnits",
                 "Sig/Ch", "Sig", "Tank/Level"):
        assert nid(path) in space.aspace
        assert space.aspace.get(nid(path)) is not None
    for path in ("Nope", "Line1#", "Line1/Temp#Reconnect", "Line1/Setpoint#EURange",
                 "Tank/Level#EngineeringUnits"):
        assert nid(path) not in space.aspace
        assert space.aspace.get(nid(path)) is None
    assert ua.NodeId("Line1/Temp", 3) not in space.aspace


def test_every_attribute_of_variables_properties_and_folders() -> None:
    space, _ = make()
    assert set(space.aspace[nid(TEMP.path)].attributes) == VARIABLE_ATTRS
    assert set(space.aspace[nid("Line1")].attributes) == FOLDER_ATTRS
    assert read(space, TEMP.path, A.NodeId) == nid(TEMP.path)
    assert read(space, TEMP.path, A.NodeClass) == ua.NodeClass.Variable
    assert read(space, TEMP.path, A.BrowseName) == ua.QualifiedName("Temp", NS)
    assert read(space, TEMP.path, A.DisplayName) == ua.LocalizedText("Temp")
    assert read(space, TEMP.path, A.Description) == ua.LocalizedText("Oven temperature")
    assert read(space, TEMP.path, A.WriteMask) == 0
    assert read(space, TEMP.path, A.DataType) == ua.NodeId(ua.ObjectIds.Double)
    assert read(space, TEMP.path, A.ValueRank) == ua.ValueRank.Scalar
    assert read(space, TEMP.path, A.ArrayDimensions) is None
    assert read(space, TEMP.path, A.AccessLevel) == 0x05
    assert read(space, TEMP.path, A.Historizing) is True
    assert read(space, TEMP.path, A.MinimumSamplingInterval) == 0.0
    assert read(space, SETPOINT.path, A.AccessLevel) == 0x03
    assert read(space, SETPOINT.path, A.DataType) == ua.NodeId(ua.ObjectIds.Float)
    assert read(space, PROFILE.path, A.ValueRank) == 1
    assert read(space, PROFILE.path, A.ArrayDimensions) == [4]
    dv = space.aspace.read_attribute_value(nid(TEMP.path), A.Value)
    assert dv.Value.Value == 21.5 and dv.Value.VariantType == ua.VariantType.Double
    assert dv.StatusCode.is_good()
    assert dv.SourceTimestamp.timestamp() == pytest.approx(1_700_000_000)
    assert read(space, PROFILE.path, A.Value) == [1, 2, 3, 4]
    rng = read(space, "Line1/Temp#EURange", A.Value)
    assert (rng.Low, rng.High) == (0, 100)
    assert read(space, "Line1/Temp#EURange", A.BrowseName) == ua.QualifiedName("EURange", 0)
    assert read(space, "Line1/Temp#EURange", A.DataType) == ua.NodeId(ua.ObjectIds.Range)
    assert read(space, "Line1/Temp#EngineeringUnits", A.Value).UnitId == 4408652  # "CEL"
    assert read(space, "Line1", A.NodeClass) == ua.NodeClass.Object
    assert read(space, "Line1", A.EventNotifier) == 0
    assert read(space, "Sig/Ch", A.Historizing) is True
    bad = space.aspace.read_attribute_value(nid("Line1"), A.Value)
    assert bad.StatusCode.value == ua.StatusCodes.BadAttributeIdInvalid


def test_value_is_read_from_the_store_at_read_time() -> None:
    space, store = make()
    store.apply([Update(LEVEL.path, 8), Update(TEMP.path, 1.0, Quality.BAD_NOT_CONNECTED)])
    assert read(space, LEVEL.path, A.Value) == 8
    dv = space.aspace.read_attribute_value(nid(TEMP.path), A.Value)
    assert dv.StatusCode.value == Quality.BAD_NOT_CONNECTED and dv.Value.Value is None


def test_browse_with_filters_and_translate_paths() -> None:
    space, _ = make()
    top = browse(space, OBJECTS, BrowseDirection=ua.BrowseDirection.Forward)
    assert [r.BrowseName.Name for r in top] == ["Sig", "Line1", "Tank"]
    kids = browse(space, nid("Line1"), BrowseDirection=ua.BrowseDirection.Forward,
                  ReferenceTypeId=ORGANIZES)
    assert [(r.BrowseName.Name, r.NodeClass) for r in kids] == [
        ("Temp", ua.NodeClass.Variable), ("Setpoint", ua.NodeClass.Variable),
        ("Profile", ua.NodeClass.Variable)]
    assert kids[0].TypeDefinition == ua.NodeId(ua.ObjectIds.AnalogItemType)
    assert kids[1].TypeDefinition == ua.NodeId(ua.ObjectIds.BaseDataVariableType)
    up = browse(space, nid(TEMP.path), BrowseDirection=ua.BrowseDirection.Inverse)
    assert [(r.NodeId, r.ReferenceTypeId) for r in up] == [(nid("Line1"), ORGANIZES)]
    props = browse(space, nid(TEMP.path), ReferenceTypeId=HAS_PROPERTY,
                   NodeClassMask=ua.NodeClass.Variable)
    assert [r.BrowseName.Name for r in props] == ["EURange", "EngineeringUnits"]
    assert browse(space, nid("Line1"), NodeClassMask=ua.NodeClass.Method) == []
    path = ua.BrowsePath(StartingNode=OBJECTS, RelativePath=ua.RelativePath(Elements=[
        ua.RelativePathElement(TargetName=ua.QualifiedName(n, ns), IsInverse=False)
        for n, ns in (("Line1", NS), ("Temp", NS), ("EURange", 0))]))
    res = ViewService(space.aspace).translate_browsepaths_to_nodeids([path])[0]
    assert [t.TargetId for t in res.Targets] == [nid("Line1/Temp#EURange")]


def test_lru_cache_is_bounded_and_rebuilt_nodes_are_equal() -> None:
    space, _ = make(cache_size=3)
    first = browse(space, nid("Line1"))
    for path in ("Sig", "Sig/Ch", TEMP.path, SETPOINT.path, "Tank", LEVEL.path):
        assert space.aspace.get(nid(path)) is not None
    assert len(space.table.cache) == 3
    assert nid("Line1") not in space.table.cache
    built = space.table.built
    again = browse(space, nid("Line1"))
    assert space.table.built == built + 1
    assert [(r.NodeId, r.BrowseName, r.ReferenceTypeId, r.TypeDefinition) for r in first] == \
        [(r.NodeId, r.BrowseName, r.ReferenceTypeId, r.TypeDefinition) for r in again]


class FakeSub:
    def __init__(self) -> None:
        self.data = SimpleNamespace(SubscriptionId=1, RevisedPublishingInterval=100.0)
        self.datachanges: dict[int, list[Any]] = {}

    def values(self) -> list[Any]:
        return [n.Value for q in self.datachanges.values() for n in q]


def monitor(space: TagSpace, path: str, attr: int = A.Value
            ) -> tuple[IotMonitoredItemService, FakeSub, int]:
    sub = FakeSub()
    svc = IotMonitoredItemService(sub, space.aspace, Limits(100))  # type: ignore[arg-type]
    req = ua.MonitoredItemCreateRequest()
    req.ItemToMonitor.NodeId = nid(path)
    req.ItemToMonitor.AttributeId = attr
    req.MonitoringMode = ua.MonitoringMode.Reporting
    req.RequestedParameters.QueueSize = 10
    res = svc._create_item(req, ua.TimestampsToReturn.Both)
    res.StatusCode.check()
    return svc, sub, res.MonitoredItemId


def pump_changes(space: TagSpace, store: TagStore, *updates: tuple[TagDef, Any]) -> None:
    pump = ValuePump(store, space, yield_ms=1000.0)
    changes = []
    for tag, value in updates:
        store.apply([Update(tag.path, value)])
        changes.append(Change(tag, store.read(tag.path)))
    pump._apply(changes, 0)


def test_monitored_value_survives_eviction_and_only_it_is_pumped() -> None:
    space, store = make(cache_size=2)
    svc, sub, mid = monitor(space, LEVEL.path)
    assert [dv.Value.Value for dv in sub.values()] == [7]  # first sample (Part 4 5.13.1.2)
    assert set(space.monitored) == {LEVEL.path}
    for path in ("Line1", TEMP.path, SETPOINT.path, PROFILE.path, "Sig"):
        space.aspace.get(nid(path))
    assert nid(LEVEL.path) not in space.table.cache  # evicted, its Value attribute kept
    pump_changes(space, store, (LEVEL, 9), (TEMP, 30.0))
    assert [dv.Value.Value for dv in sub.values()] == [7, 9]
    # a rebuilt node carries the same monitored attribute
    attval = space.aspace[nid(LEVEL.path)].attributes[A.Value]
    assert attval is space.monitored[LEVEL.path] and attval.datachange_callbacks
    svc.delete_monitored_items([mid])
    assert not space.monitored and not space.table.live


def test_non_value_attribute_items_and_writes_on_virtual_nodes() -> None:
    space, _ = make()
    svc, sub, mid = monitor(space, "Line1", A.DisplayName)
    assert sub.values()[0].Value.Value == ua.LocalizedText("Line1")
    assert not space.monitored and nid("Line1") in space.table.live
    svc.delete_monitored_items([mid])
    assert not space.table.live
    coro = space.aspace.write_attribute_value(
        nid("Line1"), A.DisplayName, ua.DataValue(ua.Variant(ua.LocalizedText("X"))))
    with pytest.raises(StopIteration) as done:  # answered without awaiting anything
        coro.send(None)
    code = done.value.value
    assert code.value == ua.StatusCodes.BadNotWritable
    assert read(space, "Line1", A.DisplayName) == ua.LocalizedText("Line1")


def test_runtime_define_and_remove_with_monitored_items() -> None:
    space, store = make()
    before = browse(space, nid("Tank"))  # built and cached before the change
    extra = TagDef("Tank/Temp", DataType.FLOAT64, low=0, high=10)
    store.define(extra)
    assert space.add(extra, store.read(extra.path))
    names = [r.BrowseName.Name for r in browse(space, nid("Tank")) if r.IsForward]
    assert len(before) + 1 == len(browse(space, nid("Tank")))
    assert names[-2:] == ["Level", "Temp"]
    svc, sub, _ = monitor(space, LEVEL.path)
    _psvc, psub, _ = monitor(space, "Tank/Temp#EURange")
    assert space.remove(LEVEL.path)
    assert sub.values()[-1].StatusCode.value == ua.StatusCodes.BadNodeIdUnknown
    assert nid(LEVEL.path) not in space.aspace and not space.monitored
    assert space.remove(extra.path)
    assert psub.values()[-1].StatusCode.value == ua.StatusCodes.BadNodeIdUnknown
    assert nid("Tank") not in space.aspace and "Tank" not in space.folders  # emptied folder
    assert "Tank" not in [r.BrowseName.Name for r in browse(space, OBJECTS)]
    assert not space.table.live
    svc.delete_all_monitored_items()  # handles already gone: no error
    assert not space.remove(LEVEL.path)


def test_kept_folder_keeps_asyncua_changes_and_follows_its_children() -> None:
    space, store = make(cache_size=1)
    folder = space.keep("Line1")
    method = ua.ReferenceDescription(ReferenceTypeId=HAS_COMPONENT, IsForward=True,
                                     NodeId=nid("Line1#Reconnect"), NodeClass=ua.NodeClass.Method,
                                     BrowseName=ua.QualifiedName("Reconnect", NS))
    folder.references.append(method)  # what asyncua's add_method does to the parent
    for path in ("Sig", "Tank", TEMP.path):
        space.aspace.get(nid(path))
    assert space.aspace[nid("Line1")] is folder
    extra = TagDef("Line1/Extra", DataType.BOOLEAN)
    store.define(extra)
    space.add(extra, store.read(extra.path))
    for path in (TEMP.path, SETPOINT.path, PROFILE.path):
        space.remove(path)
    names = [r.BrowseName.Name for r in browse(space, nid("Line1"))
             if r.IsForward and r.ReferenceTypeId != ua.NodeId(ua.ObjectIds.HasTypeDefinition)]
    assert names == ["Reconnect", "Extra"]
    space.remove(extra.path)
    assert nid("Line1") in space.aspace  # a folder with a method stays


def test_tag_below_a_tag_and_removal_of_the_parent_tag() -> None:
    parent = TagDef("A/B", DataType.INT32)
    child = TagDef("A/B/C", DataType.INT32, unit="bar")
    space, _ = make(tags=(child, parent))
    refs = browse(space, nid("A/B"), BrowseDirection=ua.BrowseDirection.Forward)
    assert [(r.NodeId, r.ReferenceTypeId) for r in refs][1:] == [(nid("A/B/C"), HAS_COMPONENT)]
    space.remove("A/B")
    assert read(space, "A/B", A.NodeClass) == ua.NodeClass.Object  # now a folder
    down = [r for r in browse(space, nid("A")) if r.NodeId == nid("A/B")]
    assert [(r.NodeClass, r.TypeDefinition) for r in down] == [
        (ua.NodeClass.Object, ua.NodeId(ua.ObjectIds.FolderType))]
    assert nid("A/B/C") in space.aspace
    up = browse(space, nid("A/B/C"), BrowseDirection=ua.BrowseDirection.Inverse)
    assert [(r.NodeId, r.ReferenceTypeId) for r in up] == [(nid("A/B"), ORGANIZES)]
