"""``iotserver.opcua.methods`` without a server: argument type rules, components, roles."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from asyncua import ua
from asyncua.crypto.permission_rules import UserRole

from iotserver.opcua.methods import MethodCalls
from iotserver.opcua.security import IotUser

A = ua.AttributeIds
OID = ua.ObjectIds


def nid(name: str) -> ua.NodeId:
    return ua.NodeId(name, 1)


class Node:
    def __init__(self, node_class: ua.NodeClass, attrs: dict[int, Any] | None = None) -> None:
        self.attributes: dict[int, Any] = {A.NodeClass: node_class, **(attrs or {})}
        self.references: list[ua.ReferenceDescription] = []
        self.call: Any = None


class Space:
    """The part of asyncua's AddressSpace that MethodCalls uses."""

    def __init__(self) -> None:
        self.nodes: dict[ua.NodeId, Node] = {}

    def add(self, node_id: ua.NodeId, node: Node) -> Node:
        self.nodes[node_id] = node
        return node

    def ref(self, src: ua.NodeId, ref_type: int, dst: ua.NodeId, name: str = "",
            forward: bool = True) -> None:
        r = ua.ReferenceDescription()
        r.ReferenceTypeId = ua.NodeId(ref_type)
        r.NodeId = dst
        r.IsForward = forward
        r.BrowseName = ua.QualifiedName(name, 1)
        self.nodes[src].references.append(r)

    def get(self, node_id: ua.NodeId) -> Node | None:
        return self.nodes.get(node_id)

    def read_attribute_value(self, node_id: ua.NodeId, attr: int) -> ua.DataValue:
        node = self.nodes.get(node_id)
        if node is None or attr not in node.attributes:
            return ua.DataValue(StatusCode=ua.StatusCode(ua.StatusCodes.BadAttributeIdInvalid))
        return ua.DataValue(ua.Variant(node.attributes[attr]))


def argument(data_type: ua.NodeId, rank: int = -1) -> ua.Argument:
    arg = ua.Argument()
    arg.DataType = data_type
    arg.ValueRank = rank
    return arg


class Fixture:
    def __init__(self) -> None:
        s = self.space = Space()
        self.ran: list[list[Any]] = []
        self.ran_ids: list[ua.NodeId] = []
        s.add(ua.NodeId(OID.Double), Node(ua.NodeClass.DataType))
        s.add(ua.NodeId(OID.Duration), Node(ua.NodeClass.DataType))  # Duration <- Double
        s.ref(ua.NodeId(OID.Duration), OID.HasSubtype, ua.NodeId(OID.Double), forward=False)
        s.add(nid("Colour"), Node(ua.NodeClass.DataType))  # an enumeration
        s.ref(nid("Colour"), OID.HasSubtype, ua.NodeId(OID.Enumeration), forward=False)
        s.add(nid("obj"), Node(ua.NodeClass.Object))
        self.method(nid("obj"), nid("m"), [argument(ua.NodeId(OID.Duration)),
                                           argument(ua.NodeId(OID.Number), 1),
                                           argument(ua.NodeId(OID.BaseDataType)),
                                           argument(nid("Colour"))])
        s.add(nid("type"), Node(ua.NodeClass.ObjectType))
        s.add(nid("subtype"), Node(ua.NodeClass.ObjectType))
        s.ref(nid("subtype"), OID.HasSubtype, nid("type"), forward=False)
        self.method(nid("type"), nid("inherited"), [])
        s.add(nid("instance"), Node(ua.NodeClass.Object))
        s.ref(nid("instance"), OID.HasTypeDefinition, nid("subtype"))
        self.method(nid("obj"), nid("off"), []).attributes[A.Executable] = False
        # a declaration on the type, and the instance's own method of that name
        s.add(nid("instance2"), Node(ua.NodeClass.Object))
        s.ref(nid("instance2"), OID.HasTypeDefinition, nid("type"))
        self.method(nid("type"), nid("decl"), []).call = None
        self.method(nid("instance2"), nid("own"), [])
        for name in ("decl", "own"):
            self.space.nodes[nid(name)].attributes[A.BrowseName] = ua.QualifiedName("Do", 1)
        self.calls = MethodCalls(s, self.run, lambda: {nid("restricted")}, self)
        self.method(nid("obj"), nid("restricted"), [])
        self.method(nid("obj"), nid("unimplemented"), []).call = None

    def method(self, parent: ua.NodeId, node_id: ua.NodeId, args: list[ua.Argument]) -> Node:
        s = self.space
        node = s.add(node_id, Node(ua.NodeClass.Method, {A.Executable: True}))
        node.call = object()
        s.ref(parent, OID.HasComponent, node_id)
        if args:
            prop = ua.NodeId(f"{node_id.Identifier}.in", 1)
            s.add(prop, Node(ua.NodeClass.Variable, {A.Value: args}))
            s.ref(node_id, OID.HasProperty, prop, "InputArguments")
        return node

    async def run(self, reqs: list[ua.CallMethodRequest]) -> list[ua.CallMethodResult]:
        self.ran.append([v.Value for v in reqs[0].InputArguments])
        self.ran_ids.append(reqs[0].MethodId)
        return [ua.CallMethodResult()]

    def monitored_item_handles(self, sub_id: int, session_id: ua.NodeId) -> None:
        return None


def req(obj: str, method: str, *args: ua.Variant) -> ua.CallMethodRequest:
    r = ua.CallMethodRequest()
    r.ObjectId = nid(obj)
    r.MethodId = nid(method)
    r.InputArguments = list(args)
    return r


ENGINEER = IotUser(role=UserRole.User, name="e", access="engineer")
OPERATOR = IotUser(role=UserRole.User, name="o", access="operator")
V = ua.Variant
T = ua.VariantType
GOOD_ARGS = (V(1.5, T.Double), V([1, 2], T.Int32), V(None, T.Null), V(2, T.Int32))


@pytest_twisted.ensureDeferred
async def test_argument_types_follow_subtypes_abstract_types_and_ranks() -> None:
    f = Fixture()

    async def codes(*args: ua.Variant) -> tuple[str, list[str]]:
        res = (await f.calls.call([req("obj", "m", *args)], ENGINEER, ua.NodeId()))[0]
        return res.StatusCode.name, [s.name for s in res.InputArgumentResults]

    assert await codes(*GOOD_ARGS) == ("Good", [])
    assert f.ran == [[1.5, [1, 2], None, 2]]
    # Duration is a Double; Number admits any numeric type but needs the array rank here
    bad = (V(1.5, T.Float), V(7, T.UInt16), V("x", T.String), V(2, T.Int64))
    assert await codes(*bad) == ("BadInvalidArgument", [
        "BadTypeMismatch", "BadTypeMismatch", "Good", "BadTypeMismatch"])
    assert await codes(*GOOD_ARGS[:3]) == ("BadArgumentsMissing", [])
    assert await codes(*GOOD_ARGS, V(1, T.Int32)) == ("BadTooManyArguments", [])
    assert len(f.ran) == 1  # nothing refused ever ran


@pytest_twisted.ensureDeferred
async def test_components_executable_and_roles() -> None:
    f = Fixture()

    async def code(obj: str, method: str, user: Any = ENGINEER) -> str:
        return str((await f.calls.call([req(obj, method)], user, ua.NodeId()))[0].StatusCode.name)

    assert await code("instance", "inherited") == "Good"  # declared on a supertype
    assert await code("instance2", "decl") == "Good"  # runs the instance's own "Do"
    assert f.ran_ids[-1] == nid("own")
    assert await code("instance2", "inherited") == "Good"  # no own method of that name
    assert f.ran_ids[-1] == nid("inherited")
    assert await code("obj", "inherited") == "BadMethodInvalid"
    assert await code("instance", "obj") == "BadMethodInvalid"  # not a method at all
    assert await code("nowhere", "inherited") == "BadNodeIdUnknown"
    assert await code("obj", "off") == "BadNotExecutable"
    assert await code("obj", "unimplemented") == "BadNotImplemented"
    assert await code("obj", "restricted", OPERATOR) == "BadUserAccessDenied"
    assert await code("obj", "restricted") == "Good"
    assert f.calls.refused == 6
    assert f.calls.user_executable(nid("restricted"), ENGINEER)
    assert not f.calls.user_executable(nid("restricted"), OPERATOR)
    assert not f.calls.user_executable(nid("unimplemented"), ENGINEER)


def test_fix_user_executable_only_lowers_method_results() -> None:
    f = Fixture()
    reads = []
    for node, attr in (("restricted", A.UserExecutable), ("restricted", A.Executable),
                       ("m", A.UserExecutable), ("obj", A.UserExecutable)):
        rv = ua.ReadValueId()
        rv.NodeId = nid(node)
        rv.AttributeId = attr
        reads.append(rv)
    true = ua.DataValue(ua.Variant(True, T.Boolean))
    bad = ua.DataValue(StatusCode=ua.StatusCode(ua.StatusCodes.BadAttributeIdInvalid))
    results: list[ua.DataValue | None] = [true, true, true, bad]
    f.calls.fix_user_executable(reads, results, OPERATOR)
    assert [r.Value.Value if r is not None and r.Value is not None else None
            for r in results] == [False, True, True, None]
