"""The Call service's checks (OPC UA Part 4 5.11.2), UserExecutable per role, GetMonitoredItems.

asyncua runs a method with whatever arguments arrive: a superfluous one raises inside the
callback (Bad_UnexpectedError and a traceback in the log), a method id runs on any object, and
UserExecutable is the same for everyone. :class:`MethodCalls` checks each CallMethodRequest
before anything runs, in this order:

1. ``objectId`` unknown -> Bad_NodeIdUnknown;
2. ``methodId`` not a Method, or not a component of the object (HasComponent from the object,
   or from its type definition or a supertype of it, Part 3 4.7) -> Bad_MethodInvalid; the
   declaration on the type runs the object's own method of the same BrowseName;
3. its Executable attribute is false -> Bad_NotExecutable; the session's role may not run
   it -> Bad_UserAccessDenied (source control methods need
   engineer or admin, see :mod:`.security`);
4. the arguments against the method's InputArguments property: too many ->
   Bad_TooManyArguments, too few -> Bad_ArgumentsMissing, a wrong type or array rank ->
   Bad_InvalidArgument with Bad_TypeMismatch for that argument in ``inputArgumentResults``
   (Good for the others).

Only then does the method run (asyncua's method service calls the callback). A standard method
without an implementation answers Bad_NotImplemented instead of asyncua's Bad_NothingToDo.

GetMonitoredItems (Part 5 9.1) on the Server object is answered here: the server and client
handles of one subscription of the *calling* session; another session's subscription is
Bad_SubscriptionIdInvalid like an unknown one (nothing tells a client which ids exist).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Container, Sequence
from typing import Any, Protocol

from asyncua import ua

from iotserver.opcua.convert import status
from iotserver.opcua.security import can_write

log = logging.getLogger("iotserver.opcua")
A = ua.AttributeIds
_OID = ua.ObjectIds

GET_MONITORED_ITEMS = ua.NodeId(_OID.Server_GetMonitoredItems)
_HAS_COMPONENT = ua.NodeId(_OID.HasComponent)
_HAS_ORDERED_COMPONENT = ua.NodeId(_OID.HasOrderedComponent)
_HAS_PROPERTY = ua.NodeId(_OID.HasProperty)
_HAS_SUBTYPE = ua.NodeId(_OID.HasSubtype)
_HAS_TYPE_DEFINITION = ua.NodeId(_OID.HasTypeDefinition)
_COMPONENTS = (_HAS_COMPONENT, _HAS_ORDERED_COMPONENT)

# Abstract DataTypes of ns=0 and the built-in types they admit (Part 3 8.2, Part 6 5.1.2).
_ANY = frozenset(ua.VariantType)
_SIGNED = frozenset({ua.VariantType.SByte, ua.VariantType.Int16, ua.VariantType.Int32,
                     ua.VariantType.Int64})
_UNSIGNED = frozenset({ua.VariantType.Byte, ua.VariantType.UInt16, ua.VariantType.UInt32,
                       ua.VariantType.UInt64})
_NUMBER = _SIGNED | _UNSIGNED | {ua.VariantType.Float, ua.VariantType.Double}
_ABSTRACT: dict[int, frozenset[ua.VariantType]] = {
    _OID.BaseDataType: _ANY,
    _OID.Number: _NUMBER,
    _OID.Integer: _SIGNED,
    _OID.UInteger: _UNSIGNED,
    _OID.Enumeration: frozenset({ua.VariantType.Int32}),
    _OID.Structure: frozenset({ua.VariantType.ExtensionObject}),
}
_MAX_SUPERTYPES = 16  # how far a DataType's HasSubtype chain is followed


class SubscriptionQuery(Protocol):
    def monitored_item_handles(self, subscription_id: int, session_id: ua.NodeId
                               ) -> tuple[list[int], list[int]] | None: ...


def may_execute(method_id: ua.NodeId, user: Any, restricted: Container[ua.NodeId]) -> bool:
    """Whether ``user`` may run the method: the restricted ones need engineer or admin."""
    return method_id not in restricted or can_write(user)


def _result(code: int, inputs: Sequence[int] = ()) -> ua.CallMethodResult:
    res = ua.CallMethodResult()
    res.StatusCode = status(code)
    res.InputArgumentResults = [status(c) for c in inputs]
    return res


class MethodCalls:
    """The Call service for a session: checks, then runs (see the module docstring).

    ``aspace`` is asyncua's address space (``get``, ``read_attribute_value``); ``run`` executes
    checked requests (asyncua's ``method_service.call``); ``restricted`` returns the method ids
    that need a writing role; ``subscriptions`` answers GetMonitoredItems.
    """

    def __init__(self, aspace: Any,
                 run: Callable[[list[ua.CallMethodRequest]], Awaitable[list[ua.CallMethodResult]]],
                 restricted: Callable[[], Container[ua.NodeId]],
                 subscriptions: SubscriptionQuery) -> None:
        self.aspace = aspace
        self._run = run
        self._restricted = restricted
        self._subscriptions = subscriptions
        self.refused = 0  # calls answered with a Bad code before anything ran

    async def call(self, requests: list[ua.CallMethodRequest], user: Any,
                   session_id: ua.NodeId) -> list[ua.CallMethodResult]:
        results = []
        for req in requests:
            res, req = self._check(req, user)
            if res is None and not self._implemented(req.MethodId):
                res = _result(ua.StatusCodes.BadNotImplemented)
            if res is None:
                res = await self._execute(req, session_id)
            else:
                self.refused += 1
                log.info("OPC UA call of %s on %s by %s refused: %s", req.MethodId.to_string(),
                         req.ObjectId.to_string(), getattr(user, "name", None) or "anonymous",
                         res.StatusCode.name)
            results.append(res)
        return results

    # -- checks --------------------------------------------------------------------------
    def _check(self, req: ua.CallMethodRequest, user: Any
               ) -> tuple[ua.CallMethodResult | None, ua.CallMethodRequest]:
        """(a refusal or None when it may run, the request to run)."""
        obj = self.aspace.get(req.ObjectId)
        if obj is None:
            return _result(ua.StatusCodes.BadNodeIdUnknown), req
        method = self.aspace.get(req.MethodId)
        target = None
        if method is not None and self._node_class(req.MethodId) == ua.NodeClass.Method:
            target = self._resolve(req.ObjectId, req.MethodId)
        if target is None:
            return _result(ua.StatusCodes.BadMethodInvalid), req
        if target != req.MethodId:
            req = ua.CallMethodRequest(ObjectId=req.ObjectId, MethodId=target,
                                       InputArguments=req.InputArguments)
        return self._check_method(req, user), req

    def _check_method(self, req: ua.CallMethodRequest, user: Any
                      ) -> ua.CallMethodResult | None:
        executable = self.aspace.read_attribute_value(req.MethodId, A.Executable)
        if executable.Value is not None and executable.Value.Value is False:
            return _result(ua.StatusCodes.BadNotExecutable)
        if not may_execute(req.MethodId, user, self._restricted()):
            return _result(ua.StatusCodes.BadUserAccessDenied)
        return self._check_arguments(req)

    def _node_class(self, node_id: ua.NodeId) -> Any:
        dv = self.aspace.read_attribute_value(node_id, A.NodeClass)
        return dv.Value.Value if dv.Value is not None else None

    def _targets(self, node_id: ua.NodeId, ref_types: Sequence[ua.NodeId], *,
                 forward: bool = True) -> list[ua.NodeId]:
        node = self.aspace.get(node_id)
        if node is None:
            return []
        return [r.NodeId for r in node.references
                if r.IsForward == forward and r.ReferenceTypeId in ref_types]

    def _resolve(self, object_id: ua.NodeId, method_id: ua.NodeId) -> ua.NodeId | None:
        """The method to run: ``method_id`` when it is a component of the object; when it is
        the declaration on the object's type or a supertype (which Part 4 5.11.2.1 allows a
        client to use), the object's own method of that BrowseName, if it has one; else None.
        """
        own = self._targets(object_id, _COMPONENTS)
        if method_id in own:
            return method_id
        types = self._targets(object_id, (_HAS_TYPE_DEFINITION,))
        for _ in range(_MAX_SUPERTYPES):
            if not types:
                return None
            type_id = types[0]
            if method_id in self._targets(type_id, _COMPONENTS):
                name = self._browse_name(method_id)
                if name is None:
                    return method_id
                return next((m for m in own if self._browse_name(m) == name), method_id)
            types = self._targets(type_id, (_HAS_SUBTYPE,), forward=False)
        return None

    def _browse_name(self, node_id: ua.NodeId) -> Any:
        dv = self.aspace.read_attribute_value(node_id, A.BrowseName)
        return dv.Value.Value if dv.Value is not None else None

    def input_arguments(self, method_id: ua.NodeId) -> list[ua.Argument]:
        """The method's InputArguments property (none when it has no such property)."""
        node = self.aspace.get(method_id)
        if node is None:
            return []
        for ref in node.references:
            if ref.IsForward and ref.ReferenceTypeId == _HAS_PROPERTY and \
                    ref.BrowseName.Name == "InputArguments":
                dv = self.aspace.read_attribute_value(ref.NodeId, A.Value)
                value = dv.Value.Value if dv.Value is not None else None
                return [a for a in value or [] if isinstance(a, ua.Argument)]
        return []

    def _check_arguments(self, req: ua.CallMethodRequest) -> ua.CallMethodResult | None:
        expected = self.input_arguments(req.MethodId)
        given = list(req.InputArguments or [])
        if len(given) > len(expected):
            return _result(ua.StatusCodes.BadTooManyArguments)
        if len(given) < len(expected):
            return _result(ua.StatusCodes.BadArgumentsMissing)
        codes = [0 if self._fits(v, a) else ua.StatusCodes.BadTypeMismatch
                 for v, a in zip(given, expected, strict=True)]
        if any(codes):
            return _result(ua.StatusCodes.BadInvalidArgument, codes)
        return None

    def _fits(self, value: ua.Variant, arg: ua.Argument) -> bool:
        """Whether a Variant matches an Argument's DataType and ValueRank (Part 3 5.6)."""
        if not isinstance(value, ua.Variant):
            return False
        is_array = bool(value.is_array) or isinstance(value.Value, list)
        rank = arg.ValueRank
        if rank == ua.ValueRank.Scalar and is_array:
            return False
        if rank >= 0 and not is_array:  # OneOrMoreDimensions (0) or n dimensions
            return False
        if rank == ua.ValueRank.ScalarOrOneDimension and is_array and value.Dimensions and \
                len(value.Dimensions) > 1:
            return False
        allowed = self._variant_types(arg.DataType)
        if value.VariantType == ua.VariantType.Null:
            return allowed is _ANY
        return value.VariantType in allowed

    def _variant_types(self, data_type: ua.NodeId) -> frozenset[ua.VariantType]:
        """The built-in types a DataType admits, following HasSubtype up to a built-in or an
        abstract type (Duration -> Double, an enumeration -> Int32, a structure ->
        ExtensionObject)."""
        current = data_type
        for _ in range(_MAX_SUPERTYPES):
            if current.NamespaceIndex == 0 and isinstance(current.Identifier, int):
                ident = current.Identifier
                if ident in _ABSTRACT:
                    return _ABSTRACT[ident]
                if 1 <= ident <= 25:
                    return frozenset({ua.VariantType(ident)})
            parents = self._targets(current, (_HAS_SUBTYPE,), forward=False)
            if not parents:
                break
            current = parents[0]
        return frozenset()

    # -- running -------------------------------------------------------------------------
    def _implemented(self, method_id: ua.NodeId) -> bool:
        """GetMonitoredItems is ours; others need a callback (asyncua's NodeData.call)."""
        node = self.aspace.get(method_id)
        return method_id == GET_MONITORED_ITEMS or getattr(node, "call", None) is not None

    async def _execute(self, req: ua.CallMethodRequest, session_id: ua.NodeId
                       ) -> ua.CallMethodResult:
        if req.MethodId == GET_MONITORED_ITEMS:
            return self._get_monitored_items(req, session_id)
        results = await self._run([req])
        return results[0]

    def _get_monitored_items(self, req: ua.CallMethodRequest, session_id: ua.NodeId
                             ) -> ua.CallMethodResult:
        """Part 5 9.1: serverHandles and clientHandles (UInt32 arrays, in the same order)."""
        sub_id = int(req.InputArguments[0].Value)
        handles = self._subscriptions.monitored_item_handles(sub_id, session_id)
        if handles is None:
            return _result(ua.StatusCodes.BadSubscriptionIdInvalid, [0])
        server, client = handles
        res = _result(0, [0])
        res.OutputArguments = [ua.Variant(list(server), ua.VariantType.UInt32, is_array=True),
                               ua.Variant(list(client), ua.VariantType.UInt32, is_array=True)]
        return res

    # -- UserExecutable ------------------------------------------------------------------
    def user_executable(self, method_id: ua.NodeId, user: Any) -> bool:
        """False for a role that Call would refuse, and for a method nothing implements."""
        return self._implemented(method_id) and may_execute(method_id, user, self._restricted())

    def fix_user_executable(self, reads: Sequence[ua.ReadValueId],
                            results: list[ua.DataValue | None], user: Any) -> None:
        """Read hook: UserExecutable of each Method node reflects the session's role."""
        for i, rv in enumerate(reads):
            dv = results[i]
            if rv.AttributeId != A.UserExecutable or dv is None or dv.Value is None or \
                    (dv.StatusCode is not None and dv.StatusCode.is_bad()):
                continue
            if dv.Value.Value is True and not self.user_executable(rv.NodeId, user):
                results[i] = ua.DataValue(ua.Variant(False, ua.VariantType.Boolean),
                                          dv.StatusCode, dv.SourceTimestamp, dv.ServerTimestamp)
