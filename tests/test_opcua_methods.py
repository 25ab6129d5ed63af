"""Call service checks, UserExecutable per role, GetMonitoredItems, EventNotifier of a Variable
(``iotserver.opcua.methods``), through an asyncua client."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from asyncua import ua
from helpers import free_port
from helpers.opcua import OPCUA_CLIENT_SOURCE as SOURCE
from helpers.opcua import aio, client, make_config, start

from iotserver.opcua.methods import GET_MONITORED_ITEMS

SERVER = ua.NodeId(ua.ObjectIds.Server)
U32 = ua.VariantType.UInt32

# an OPC UA client source whose server is not there: its folder gets a Reconnect method
def config(tmp_path: Path) -> Any:
    return make_config(tmp_path / "data", free_port(), extra=SOURCE)


def request(obj: ua.NodeId, method: ua.NodeId, *args: ua.Variant) -> ua.CallMethodRequest:
    req = ua.CallMethodRequest()
    req.ObjectId = obj
    req.MethodId = method
    req.InputArguments = list(args)
    return req


async def call(c: Any, *reqs: ua.CallMethodRequest) -> list[ua.CallMethodResult]:
    results: list[ua.CallMethodResult] = await c.uaclient.call(list(reqs))
    return results


def names(results: list[ua.CallMethodResult]) -> list[str]:
    return [r.StatusCode.name for r in results]


@pytest_twisted.ensureDeferred
async def test_call_checks_arguments_object_and_method_before_running(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    running = await start(config(tmp_path))
    calls: list[str] = []

    async def reconnect(owner: str) -> bool:
        calls.append(owner)
        return True

    running.service.reconnect = reconnect

    async def body() -> None:
        async with client(running, user="alice") as c:
            ns = await c.get_namespace_index(running.namespace)
            folder, other = ua.NodeId("PLC1", ns), ua.NodeId("Line1", ns)
            method = ua.NodeId("PLC1#Reconnect", ns)
            extra = ua.Variant(1, ua.VariantType.Int32)
            results = await call(
                c,
                request(folder, method),                               # right
                request(folder, method, extra),                        # one too many
                request(other, method),                                # wrong object
                request(ua.NodeId("Nope", ns), method),                # unknown object
                request(folder, ua.NodeId("PLC1#Nope", ns)),           # unknown method
                request(folder, ua.NodeId("PLC1/Temp", ns)),           # not a method
                request(SERVER, GET_MONITORED_ITEMS),                  # argument missing
                request(SERVER, GET_MONITORED_ITEMS, ua.Variant(1, U32), ua.Variant(2, U32)),
                request(SERVER, GET_MONITORED_ITEMS, ua.Variant("1", ua.VariantType.String)),
                request(SERVER, GET_MONITORED_ITEMS, ua.Variant([1], U32)),  # array for scalar
                request(folder, GET_MONITORED_ITEMS, ua.Variant(1, U32)),    # not its method
            )
            assert names(results) == [
                "Good", "BadTooManyArguments", "BadMethodInvalid", "BadNodeIdUnknown",
                "BadMethodInvalid", "BadMethodInvalid", "BadArgumentsMissing",
                "BadTooManyArguments", "BadInvalidArgument", "BadInvalidArgument",
                "BadMethodInvalid"]
            assert [s.name for s in results[8].InputArgumentResults] == ["BadTypeMismatch"]
            assert [s.name for s in results[9].InputArgumentResults] == ["BadTypeMismatch"]
            assert calls == ["opcua:plc1"]  # only the first request ran
            # the asyncua convenience API raises the operation's status code
            with pytest.raises(ua.uaerrors.BadTooManyArguments):
                await c.get_node(folder).call_method(method, extra)

    with caplog.at_level(logging.ERROR):
        try:
            await aio(body())
        finally:
            await running.root.stopService()
    assert not [r for r in caplog.records if r.exc_info], "a refused call logged a traceback"


@pytest_twisted.ensureDeferred
async def test_roles_and_user_executable(tmp_path: Path) -> None:
    running = await start(config(tmp_path))

    async def user_executable(c: Any, node_id: ua.NodeId) -> tuple[bool, bool]:
        rv = [ua.ReadValueId(), ua.ReadValueId()]
        for r, attr in zip(rv, (ua.AttributeIds.Executable, ua.AttributeIds.UserExecutable),
                           strict=True):
            r.NodeId = node_id
            r.AttributeId = attr
        params = ua.ReadParameters()
        params.NodesToRead = rv
        dvs = await c.uaclient.read(params)
        return dvs[0].Value.Value, dvs[1].Value.Value

    async def body() -> None:
        async with client(running, user="bob") as c:  # operator
            ns = await c.get_namespace_index(running.namespace)
            method = ua.NodeId("PLC1#Reconnect", ns)
            assert await user_executable(c, method) == (True, False)
            assert await user_executable(c, GET_MONITORED_ITEMS) == (True, True)
            res = await call(c, request(ua.NodeId("PLC1", ns), method))
            assert names(res) == ["BadUserAccessDenied"]
            # a standard method nobody implements is not executable for anyone
            resend = ua.NodeId(ua.ObjectIds.Server_ResendData)
            assert (await user_executable(c, resend))[1] is False
            res = await call(c, request(SERVER, resend, ua.Variant(1, U32)))
            assert names(res) == ["BadNotImplemented"]
        for user in ("alice", "carol"):  # engineer, admin
            async with client(running, user=user) as c:
                ns = await c.get_namespace_index(running.namespace)
                assert await user_executable(c, ua.NodeId("PLC1#Reconnect", ns)) == (True, True)

    try:
        await aio(body())
    finally:
        await running.root.stopService()


def _events(node_id: ua.NodeId, handle: int) -> ua.MonitoredItemCreateRequest:
    req = _item(node_id, handle, ua.AttributeIds.EventNotifier)
    flt = ua.EventFilter()
    op = ua.SimpleAttributeOperand()
    op.TypeDefinitionId = ua.NodeId(ua.ObjectIds.BaseEventType)
    op.BrowsePath = [ua.QualifiedName("Message", 0)]
    op.AttributeId = ua.AttributeIds.Value
    flt.SelectClauses = [op]
    req.RequestedParameters.Filter = flt
    return req


def _item(node_id: ua.NodeId, handle: int,
          attr: int = ua.AttributeIds.Value) -> ua.MonitoredItemCreateRequest:
    req = ua.MonitoredItemCreateRequest()
    req.ItemToMonitor = ua.ReadValueId()
    req.ItemToMonitor.NodeId = node_id
    req.ItemToMonitor.AttributeId = attr
    req.MonitoringMode = ua.MonitoringMode.Reporting
    req.RequestedParameters = ua.MonitoringParameters()
    req.RequestedParameters.ClientHandle = handle
    req.RequestedParameters.QueueSize = 1
    return req


class _Handler:
    def datachange_notification(self, *args: Any) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_get_monitored_items_answers_the_callers_own_subscription(tmp_path: Path) -> None:
    running = await start(config(tmp_path))

    async def body() -> None:
        async with client(running, user="alice") as a, client(running, user="bob") as b:
            ns = await a.get_namespace_index(running.namespace)
            sub = await a.create_subscription(100, _Handler())
            mids = await sub.create_monitored_items([
                _item(ua.NodeId("Line1/Temp", ns), 4711),
                _item(ua.NodeId("Line1/Setpoint", ns), 4712),
                _events(SERVER, 4713)])  # an event item too
            assert all(isinstance(m, int) for m in mids), mids
            sid = ua.Variant(sub.subscription_id, U32)
            out = await a.get_node(SERVER).call_method(GET_MONITORED_ITEMS, sid)
            assert out == [sorted(mids), [4711, 4712, 4713]]
            # the declaration on ServerType, called on the Server object, is the same method
            declaration = ua.NodeId(ua.ObjectIds.ServerType_GetMonitoredItems)
            assert await a.get_node(SERVER).call_method(declaration, sid) == out
            empty = await b.create_subscription(100, _Handler())
            out = await b.get_node(SERVER).call_method(
                GET_MONITORED_ITEMS, ua.Variant(empty.subscription_id, U32))
            assert out == [[], []]
            # another session's subscription, an unknown id: the same answer
            res = await call(b, request(SERVER, GET_MONITORED_ITEMS, sid),
                             request(SERVER, GET_MONITORED_ITEMS, ua.Variant(999_999, U32)))
            assert names(res) == ["BadSubscriptionIdInvalid"] * 2
            await sub.delete()
            res = await call(a, request(SERVER, GET_MONITORED_ITEMS, sid))
            assert names(res) == ["BadSubscriptionIdInvalid"]

    try:
        await aio(body())
    finally:
        await running.root.stopService()


@pytest_twisted.ensureDeferred
async def test_event_notifier_of_a_variable_is_an_invalid_attribute(tmp_path: Path) -> None:
    running = await start(config(tmp_path))

    async def body() -> None:
        async with client(running, user="alice") as c:
            ns = await c.get_namespace_index(running.namespace)
            sub = await c.create_subscription(100, _Handler())
            params = ua.CreateMonitoredItemsParameters()
            params.SubscriptionId = sub.subscription_id
            params.TimestampsToReturn = ua.TimestampsToReturn.Both
            events = ua.AttributeIds.EventNotifier
            params.ItemsToCreate = [_item(ua.NodeId("Line1/Temp", ns), 1, events),
                                    _item(ua.NodeId("Nope", ns), 2, events),
                                    _item(SERVER, 3, events),  # no EventFilter
                                    _events(SERVER, 4),
                                    _item(ua.NodeId("Line1/Temp", ns), 5)]
            results = await c.uaclient.create_monitored_items(params)
            assert [r.StatusCode.name for r in results] == [
                "BadAttributeIdInvalid", "BadNodeIdUnknown", "BadMonitoredItemFilterInvalid",
                "Good", "Good"]

    try:
        await aio(body())
    finally:
        await running.root.stopService()
