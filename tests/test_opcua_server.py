"""The OPC UA server against the real asyncua client: browse, read, write, subscribe, security.

One server per module (starting asyncua costs about a second); every test closes its sessions.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from asyncua import ua
from asyncua.ua.uaerrors import UaStatusCodeError
from helpers import free_port, wait_for_aio
from helpers.opcua import (
    Running,
    aio,
    client,
    make_client_cert,
    make_config,
    start,
)

from iotserver.tags.model import Quality, Update

pytestmark = pytest.mark.interop


@pytest_twisted.async_yield_fixture(scope="module")
async def srv(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    data = tmp_path_factory.mktemp("opcua") / "data"
    running = await start(make_config(data, free_port()))
    yield running
    await running.root.stopService()


def nid(running: Running, ns: int, path: str) -> ua.NodeId:
    return ua.NodeId(path, ns)


async def ns_of(c: Any, running: Running) -> int:
    return int(await c.get_namespace_index(running.namespace))


# -- browse and read ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_browse_folders_and_variable_attributes(srv: Running) -> None:
    async def body() -> None:
        async with client(srv, user="bob") as c:
            ns = await ns_of(c, srv)
            line1 = c.get_node(ua.NodeId("Line1", ns))
            names = sorted([(await n.read_browse_name()).Name for n in await line1.get_children()])
            assert names == ["Count", "Name", "Profile", "Running", "Setpoint", "Temp"]
            zone = await c.nodes.objects.get_child([f"{ns}:Line2", f"{ns}:Oven", f"{ns}:Zone1",
                                                    f"{ns}:Temp"])
            assert zone.nodeid == ua.NodeId("Line2/Oven/Zone1/Temp", ns)
            temp = c.get_node(ua.NodeId("Line1/Temp", ns))
            assert await temp.read_data_type() == ua.NodeId(ua.ObjectIds.Double)
            assert (await temp.read_description()).Text == "Oven temperature"
            assert await temp.read_attribute(ua.AttributeIds.Historizing) is not None
            hist = (await temp.read_attribute(ua.AttributeIds.Historizing)).Value.Value
            assert hist is True
            level = (await temp.read_attribute(ua.AttributeIds.AccessLevel)).Value.Value
            assert level == 0x01 | 0x04  # CurrentRead | HistoryRead
            eu = await (await temp.get_child("0:EURange")).read_value()
            assert (eu.Low, eu.High) == (0, 100)
            units = await (await temp.get_child("0:EngineeringUnits")).read_value()
            assert units.DisplayName.Text == "degC" and units.UnitId == 4408652  # "CEL"
            type_def = await temp.read_type_definition()
            assert type_def == ua.NodeId(ua.ObjectIds.AnalogItemType)
            sp = c.get_node(ua.NodeId("Line1/Setpoint", ns))
            assert await sp.read_data_type() == ua.NodeId(ua.ObjectIds.Float)
            assert (await sp.read_attribute(ua.AttributeIds.AccessLevel)).Value.Value == 0x03
            # bob is an operator: the user access level has no CurrentWrite
            assert (await sp.read_attribute(ua.AttributeIds.UserAccessLevel)).Value.Value == 0x01
            profile = c.get_node(ua.NodeId("Line1/Profile", ns))
            assert await profile.read_value_rank() == 1
            assert await profile.read_array_dimensions() == [4]
            assert await profile.read_value() == [1, 2, 3, 4]
    await aio(body())


@pytest_twisted.ensureDeferred
async def test_read_returns_store_value_quality_and_timestamps(srv: Running) -> None:
    ts = 1_700_000_000_123_456_000
    srv.store.apply([Update("Line1/Temp", 42.5, Quality.GOOD, ts)])

    async def body() -> None:
        async with client(srv, user="bob") as c:
            ns = await ns_of(c, srv)
            node = c.get_node(ua.NodeId("Line1/Temp", ns))
            dv = await node.read_data_value()
            assert dv.Value.Value == 42.5 and dv.Value.VariantType == ua.VariantType.Double
            assert dv.StatusCode.is_good()
            assert dv.SourceTimestamp.timestamp() == pytest.approx(ts / 1e9, abs=1e-6)
            srv.store.apply([Update("Line1/Temp", 43.0, Quality.BAD_NOT_CONNECTED)])
            dv = await node.read_data_value(raise_on_bad_status=False)
            assert dv.StatusCode.value == Quality.BAD_NOT_CONNECTED
            assert dv.Value is None or dv.Value.Value is None
            srv.store.apply([Update("Line1/Temp", 44.0, Quality.UNCERTAIN_LAST_USABLE_VALUE)])
            dv = await node.read_data_value(raise_on_bad_status=False)
            assert dv.StatusCode.value == Quality.UNCERTAIN_LAST_USABLE_VALUE
            assert dv.Value.Value == 44.0
    await aio(body())


# -- writes -------------------------------------------------------------------------------


async def reads(node: Any, value: Any) -> bool:
    """The node reads ``value`` now (a condition for ``wait_for_aio``)."""
    return bool(await node.read_value() == pytest.approx(value))


async def _write(node: Any, value: Any, vtype: ua.VariantType) -> int:
    try:
        await node.write_value(ua.DataValue(ua.Variant(value, vtype)))
    except UaStatusCodeError as exc:
        return int(exc.code)
    return 0


@pytest_twisted.ensureDeferred
async def test_write_goes_through_store_with_one_status_per_item(srv: Running) -> None:
    async def body() -> None:
        async with client(srv, user="alice") as c:
            ns = await ns_of(c, srv)
            sp = c.get_node(ua.NodeId("Line1/Setpoint", ns))
            assert await _write(sp, 55.5, ua.VariantType.Float) == 0
            assert srv.store.read("Line1/Setpoint").value == pytest.approx(55.5)
            # the change notification updates the address space
            await wait_for_aio(lambda: reads(sp, 55.5), what="55.5 read back")
            # one request, five items: one status code each, no request-level fault
            params = ua.WriteParameters()
            for path, value, vtype in [
                ("Line1/Setpoint", 300.0, ua.VariantType.Float),  # out of range
                ("Line1/Setpoint", 12, ua.VariantType.Int32),  # wrong type
                ("Line1/Temp", 1.0, ua.VariantType.Double),  # read-only
                ("Line1/Count", 7, ua.VariantType.Int32),  # fine
                ("Line1/Nope", 1.0, ua.VariantType.Double),  # unknown node
            ]:
                wv = ua.WriteValue()
                wv.NodeId = ua.NodeId(path, ns)
                wv.AttributeId = ua.AttributeIds.Value
                wv.Value = ua.DataValue(ua.Variant(value, vtype))
                params.NodesToWrite.append(wv)
            results = await c.uaclient.write(params)
            assert [r.value for r in results] == [
                ua.StatusCodes.BadOutOfRange, ua.StatusCodes.BadTypeMismatch,
                ua.StatusCodes.BadNotWritable, 0, ua.StatusCodes.BadNodeIdUnknown]
            assert srv.store.read("Line1/Count").value == 7
            profile = c.get_node(ua.NodeId("Line1/Profile", ns))
            assert await _write(profile, [5, 6, 7, 8], ua.VariantType.Int16) == 0
            assert list(srv.store.read("Line1/Profile").value) == [5, 6, 7, 8]
            assert await _write(profile, [5, 6], ua.VariantType.Int16) == \
                ua.StatusCodes.BadTypeMismatch
            name = c.get_node(ua.NodeId("Line1/Name", ns))
            assert await _write(name, "stamp", ua.VariantType.String) == 0
            desc = ua.WriteValue()
            desc.NodeId = ua.NodeId("Line1/Setpoint", ns)
            desc.AttributeId = ua.AttributeIds.Description
            desc.Value = ua.DataValue(ua.Variant(ua.LocalizedText("x")))
            wp = ua.WriteParameters()
            wp.NodesToWrite = [desc]
            assert (await c.uaclient.write(wp))[0].value == ua.StatusCodes.BadNotWritable
    await aio(body())


@pytest_twisted.ensureDeferred
async def test_operator_write_refused_and_owner_value_wins(srv: Running) -> None:
    class PlcOwner:
        """A source that clamps what it is given, as a PLC might."""

        def write_tag(self, tag: Any, value: Any) -> Quality:
            srv.store.apply([Update(tag.path, min(value, 50), Quality.GOOD)])
            return Quality.GOOD

    async def body() -> None:
        async with client(srv, user="bob") as c:
            ns = await ns_of(c, srv)
            sp = c.get_node(ua.NodeId("Line1/Setpoint", ns))
            before = srv.store.read("Line1/Setpoint").value
            assert await _write(sp, 20.0, ua.VariantType.Float) == \
                ua.StatusCodes.BadUserAccessDenied
            assert srv.store.read("Line1/Setpoint").value == before
        srv.store.register_owner("memory", PlcOwner())
        try:
            async with client(srv, user="carol") as c:  # admin may write
                ns = await ns_of(c, srv)
                sp = c.get_node(ua.NodeId("Line1/Setpoint", ns))
                assert await _write(sp, 120.0, ua.VariantType.Float) == 0
                # what the "PLC" took, not what was sent
                await wait_for_aio(lambda: reads(sp, 50.0), what="the PLC's value read back")
        finally:
            from iotserver.tags.store import MemoryOwner

            srv.store.register_owner("memory", MemoryOwner(srv.store, srv.core.persistence))
    await aio(body())


# -- subscriptions ------------------------------------------------------------------------


class Collector:
    def __init__(self) -> None:
        self.values: list[Any] = []
        self.data: list[Any] = []

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        self.values.append(val)
        self.data.append(data.monitored_item.Value)

    def status_change_notification(self, status: Any) -> None:
        pass


async def watch(sub: Any, node: Any, mfilter: Any = None, queuesize: int = 0) -> Any:
    """subscribe_data_change with a filter (asyncua's public call takes none)."""
    return await sub._subscribe(node, ua.AttributeIds.Value, mfilter, queuesize=queuesize)


async def _subscribe(c: Any, node: Any, mfilter: Any = None, queuesize: int = 0
                     ) -> tuple[Any, Collector]:
    handler = Collector()
    sub = await c.create_subscription(50, handler)
    await watch(sub, node, mfilter, queuesize)
    return sub, handler


@pytest_twisted.ensureDeferred
async def test_subscription_without_and_with_deadband(srv: Running) -> None:
    path = "Line2/Oven/Zone1/Temp"
    srv.store.apply([Update(path, 100.0)])

    async def body() -> None:
        async with client(srv, user="bob") as c:
            ns = await ns_of(c, srv)
            node = c.get_node(ua.NodeId(path, ns))
            plain, all_h = await _subscribe(c, node, queuesize=100)
            absolute = ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.StatusValue,
                                           DeadbandType=ua.DeadbandType.Absolute,
                                           DeadbandValue=1.0)
            sub_abs, abs_h = await _subscribe(c, node, absolute, 100)
            percent = ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.StatusValue,
                                          DeadbandType=ua.DeadbandType.Percent,
                                          DeadbandValue=1.0)  # 1 % of [0, 400] = 4.0
            sub_pct, pct_h = await _subscribe(c, node, percent, 100)
            await wait_for_aio(lambda: all_h.values and abs_h.values and pct_h.values,
                               what="the initial values")
            # a slow ramp: 0.3 per step; a deadband against the previous sample never fires.
            # flush(): each step reaches the monitored items now, as its own change
            for i in range(1, 21):
                srv.store.apply([Update(path, 100.0 + 0.3 * i)])
                srv.store.flush()
            all_values, abs_values, pct_values = all_h.values, abs_h.values, pct_h.values
            await wait_for_aio(lambda: len(all_values) == 21
                               and abs_values[-1] == pytest.approx(106.0)
                               and pct_values[-1] == pytest.approx(104.2), what="the ramp")
            assert len(all_values) == 21
            assert abs_values == pytest.approx([100.0, 101.2, 102.4, 103.6, 104.8, 106.0])
            assert pct_values == pytest.approx([100.0, 104.2])
            # a status change is reported regardless of the deadband
            srv.store.apply([Update(path, 106.0, Quality.UNCERTAIN_LAST_USABLE_VALUE)])
            await wait_for_aio(lambda: abs_h.data[-1].StatusCode.value
                               == Quality.UNCERTAIN_LAST_USABLE_VALUE.value,
                               what="the status change")
            assert abs_values[-1] == pytest.approx(106.0)
            assert srv.store.read(path).quality is Quality.UNCERTAIN_LAST_USABLE_VALUE
            for sub in (plain, sub_abs, sub_pct):
                await sub.delete()
    await aio(body())


@pytest_twisted.ensureDeferred
async def test_deadband_filters_refused_where_invalid(srv: Running) -> None:
    async def body() -> None:
        async with client(srv, user="bob") as c:
            ns = await ns_of(c, srv)
            sub = await c.create_subscription(100, Collector())
            pct = ua.DataChangeFilter(DeadbandType=ua.DeadbandType.Percent, DeadbandValue=5.0)
            # Line1/Count has no EURange: Percent is refused (Part 8 7.2)
            with pytest.raises(UaStatusCodeError) as info:
                await watch(sub, c.get_node(ua.NodeId("Line1/Count", ns)), pct)
            assert info.value.code == ua.StatusCodes.BadDeadbandFilterInvalid
            absolute = ua.DataChangeFilter(DeadbandType=ua.DeadbandType.Absolute,
                                           DeadbandValue=1.0)
            with pytest.raises(UaStatusCodeError) as info:
                await watch(sub, c.get_node(ua.NodeId("Line1/Name", ns)), absolute)
            assert info.value.code == ua.StatusCodes.BadDeadbandFilterInvalid
            await sub.delete()
    await aio(body())


@pytest_twisted.ensureDeferred
async def test_queue_size_and_trigger(srv: Running) -> None:
    async def body() -> None:
        async with client(srv, user="bob") as c:
            ns = await ns_of(c, srv)
            node = c.get_node(ua.NodeId("Line1/Count", ns))
            handler = Collector()
            sub = await c.create_subscription(400, handler)
            await sub.subscribe_data_change(node, queuesize=0)  # revised to 1: newest wins
            handler3 = Collector()
            sub3 = await c.create_subscription(400, handler3)
            # sampling interval 0: every change is a sample (asyncua's default is 50 ms)
            await sub3.subscribe_data_change(node, queuesize=3, sampling_interval=0)
            status_only = Collector()
            sub_s = await c.create_subscription(100, status_only)
            await watch(sub_s, node, ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.Status))
            await wait_for_aio(lambda: handler.values and handler3.values
                               and status_only.values, what="the initial values")
            # six changes between two publishes: one store flush each (the store conflates
            # within a turn); no await in between, so no publish can come between them
            for v in range(1, 7):
                srv.store.apply([Update("Line1/Count", v)])
                srv.store.flush()
            await wait_for_aio(lambda: handler.values[-1] == 6 and handler3.values[-1] == 6,
                               what="the six changes published")
            assert handler.values[-1] == 6 and 6 in handler.values
            assert 1 not in handler.values[1:]  # older values were replaced
            # queue of 3, discardOldest: the newest three, the first of them flagged Overflow
            tail = handler3.data[-3:]
            assert [d.Value.Value for d in tail] == [4, 5, 6]
            assert tail[0].StatusCode.value & 0x0480 == 0x0480
            assert not tail[1].StatusCode.value & 0x80
            assert len(status_only.values) == 1  # value changes are not status changes
            srv.store.apply([Update("Line1/Count", 6, Quality.BAD_NOT_CONNECTED)])
            await wait_for_aio(lambda: len(status_only.values) == 2, what="the status change")
            srv.store.apply([Update("Line1/Count", 6, Quality.GOOD)])
            for s in (sub, sub3, sub_s):
                await s.delete()
    await aio(body())


# -- security -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_anonymous_refused_when_off_and_bad_password(srv: Running) -> None:
    async def body() -> None:
        with pytest.raises(UaStatusCodeError) as info:
            async with client(srv):
                pass
        assert info.value.code == ua.StatusCodes.BadIdentityTokenRejected
        with pytest.raises(UaStatusCodeError) as info:
            async with client(srv, user="alice", password="wrong"):
                pass
        assert info.value.code == ua.StatusCodes.BadUserAccessDenied
        with pytest.raises(UaStatusCodeError):
            async with client(srv, user="admin", password="anything"):
                pass
    await aio(body())


@pytest_twisted.ensureDeferred
async def test_sign_and_encrypt_with_username_and_cert_trust_flow(srv: Running,
                                                                  tmp_path: Path) -> None:
    cert, key = make_client_cert(tmp_path, "scada-client")
    policy = "Basic256Sha256,SignAndEncrypt"

    async def body() -> None:
        # unknown client certificate: refused, and a copy lands in rejected/certs
        with pytest.raises(UaStatusCodeError) as info:
            async with client(srv, user="alice", security=policy, cert=cert, key=key):
                pass
        assert info.value.code == ua.StatusCodes.BadCertificateUntrusted
        rejected = list((srv.pki / "rejected" / "certs").glob("scada-client*.der"))
        assert len(rejected) == 1
        # the operator trusts it by moving the file
        shutil.move(str(rejected[0]), srv.pki / "trusted" / "certs" / rejected[0].name)
        async with client(srv, user="alice", security=policy, cert=cert, key=key) as c:
            assert c.security_policy.Mode == ua.MessageSecurityMode.SignAndEncrypt
            ns = await ns_of(c, srv)
            sp = c.get_node(ua.NodeId("Line1/Setpoint", ns))
            assert await _write(sp, 33.0, ua.VariantType.Float) == 0
        # a certificate naming another ApplicationUri than the client's is refused
        with pytest.raises(UaStatusCodeError) as info:
            async with client(srv, user="alice", security=policy, cert=cert, key=key,
                              app_uri="urn:someone:else"):
                pass
        assert info.value.code == ua.StatusCodes.BadCertificateUriInvalid
    await aio(body())


@pytest_twisted.ensureDeferred
async def test_x509_user_token_maps_to_user(srv: Running, tmp_path: Path) -> None:
    cert, key = make_client_cert(tmp_path, "app-for-dave")
    user_cert, user_key = make_client_cert(tmp_path, "dave-cert")
    stranger, stranger_key = make_client_cert(tmp_path, "stranger")
    trusted = srv.pki / "trusted" / "certs"
    for path in (cert, user_cert, stranger):
        shutil.copy(path, trusted / path.name)
    policy = "Basic256Sha256,Sign"

    async def body() -> None:
        async with client(srv, security=policy, cert=cert, key=key, user_cert=user_cert,
                          user_key=user_key) as c:
            ns = await ns_of(c, srv)
            sp = c.get_node(ua.NodeId("Line1/Setpoint", ns))
            assert await _write(sp, 34.0, ua.VariantType.Float) == 0  # dave is an engineer
        with pytest.raises(UaStatusCodeError) as info:  # trusted but mapped to no user
            async with client(srv, security=policy, cert=cert, key=key, user_cert=stranger,
                              user_key=stranger_key):
                pass
        assert info.value.code == ua.StatusCodes.BadUserAccessDenied
    await aio(body())


@pytest_twisted.ensureDeferred
async def test_address_space_changes_with_store_definitions(srv: Running) -> None:
    from iotserver.tags.model import DataType, TagDef

    tag = TagDef("Dyn/Extra/Level", DataType.FLOAT64, unit="m")
    srv.store.define(tag)
    srv.store.apply([Update(tag.path, 1.5)])

    async def body() -> None:
        async with client(srv, user="bob") as c:
            ns = await ns_of(c, srv)
            node = c.get_node(ua.NodeId(tag.path, ns))
            await wait_for_aio(lambda: reads(node, 1.5), what="the new variable")
            handler = Collector()
            sub = await c.create_subscription(50, handler)
            await sub.subscribe_data_change(node)
            await wait_for_aio(lambda: handler.data, what="the initial value")
            srv.store.remove(tag.path)
            await wait_for_aio(lambda: handler.data[-1].StatusCode.value
                               == ua.StatusCodes.BadNodeIdUnknown, what="BadNodeIdUnknown")
            with pytest.raises(UaStatusCodeError):
                await node.read_value()
            dyn = c.get_node(ua.NodeId("Dyn", ns))
            with pytest.raises(UaStatusCodeError):  # the emptied folders are gone too
                await dyn.read_browse_name()
            await sub.delete()
    await aio(body())


@pytest_twisted.ensureDeferred
async def test_server_capabilities(srv: Running) -> None:
    async def body() -> None:
        async with client(srv, user="bob") as c:
            caps = c.get_node(ua.ObjectIds.Server_ServerCapabilities_MaxMonitoredItems)
            assert await caps.read_value() == 200_000
            hist = c.get_node(ua.ObjectIds.HistoryServerCapabilities_AccessHistoryDataCapability)
            assert await hist.read_value() is True
            folder = c.get_node(ua.ObjectIds.HistoryServerCapabilities_AggregateFunctions)
            funcs = {(await n.read_browse_name()).Name for n in await folder.get_children()}
            assert {"Average", "Minimum", "Maximum", "Count", "Start", "End", "Interpolative",
                    "Total"} <= funcs
            build = await c.get_node(ua.ObjectIds.Server_ServerStatus_BuildInfo).read_value()
            assert build.ProductName == "iotserver"
            # no one may change the address space
            item = ua.AddNodesItem()
            item.ParentNodeId = ua.NodeId(ua.ObjectIds.ObjectsFolder)
            item.ReferenceTypeId = ua.NodeId(ua.ObjectIds.Organizes)
            item.BrowseName = ua.QualifiedName("x", 1)
            item.NodeClass = ua.NodeClass.Object
            with pytest.raises(UaStatusCodeError):
                results = await c.uaclient.add_nodes([item])
                results[0].StatusCode.check()
    await aio(body())


@pytest_twisted.ensureDeferred
async def test_max_notifications_per_publish(srv: Running) -> None:
    async def body() -> None:
        async with client(srv, user="bob") as c:
            ns = await ns_of(c, srv)
            params = ua.CreateSubscriptionParameters(
                RequestedPublishingInterval=200, RequestedLifetimeCount=300,
                RequestedMaxKeepAliveCount=10, MaxNotificationsPerPublish=3,
                PublishingEnabled=True, Priority=0)
            handler = Collector()
            sub = await c.create_subscription(params, handler)
            sizes: list[tuple[int, bool]] = []
            inner = c.uaclient._subscription_callbacks[sub.subscription_id]

            async def spy(result: ua.PublishResult) -> None:
                n = sum(len(getattr(x, "MonitoredItems", None) or [])
                        for x in result.NotificationMessage.NotificationData)
                if n:
                    sizes.append((n, result.MoreNotifications))
                await inner(result)

            c.uaclient._subscription_callbacks[sub.subscription_id] = spy
            paths = ["Line1/Temp", "Line1/Setpoint", "Line1/Count", "Line1/Running",
                     "Line1/Name", "Line1/Profile", "Line2/Oven/Zone1/Temp"]
            await sub.subscribe_data_change([c.get_node(ua.NodeId(p, ns)) for p in paths])
            await wait_for_aio(lambda: len(handler.values) >= 7, what="seven notifications")
            assert len(handler.values) == 7
            assert sizes[:3] == [(3, True), (3, True), (1, False)]
            await sub.delete()
    await aio(body())


@pytest_twisted.ensureDeferred
async def test_virtual_nodes_with_a_tiny_node_cache(srv: Running) -> None:
    """Every tag node is built on lookup; with a cache of one node, a full browse, reads and
    a subscription still see the same address space (nodecache)."""
    space = srv.service.space
    capacity, space.table.capacity = space.table.capacity, 1
    path = "Line1/Count"

    async def walk(node: Any, out: dict[str, Any]) -> None:
        for child in await node.get_children():
            if child.nodeid.NamespaceIndex == space.idx:
                out[str(child.nodeid.Identifier)] = (await child.read_browse_name()).Name
                await walk(child, out)

    async def body() -> None:
        async with client(srv, user="bob") as c:
            ns = await ns_of(c, srv)
            first: dict[str, Any] = {}
            await walk(c.nodes.objects, first)
            assert set(space.tags) <= set(first) and "Line1" in first
            node = c.get_node(ua.NodeId(path, ns))
            sub, handler = await _subscribe(c, node, queuesize=10)
            again: dict[str, Any] = {}
            await walk(c.nodes.objects, again)  # evicts the monitored node many times over
            assert again == first
            srv.store.apply([Update(path, 4242)])
            await wait_for_aio(lambda: handler.values and handler.values[-1] == 4242,
                               what="the notification of 4242")
            assert await node.read_value() == 4242
            await sub.delete()
            assert not space.monitored
    try:
        await aio(body())
    finally:
        space.table.capacity = capacity


# -- browse paging ------------------------------------------------------------------------


def _browse_params(node: ua.NodeId, max_refs: int) -> ua.BrowseParameters:
    desc = ua.BrowseDescription()
    desc.NodeId = node
    desc.BrowseDirection = ua.BrowseDirection.Forward
    desc.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HierarchicalReferences)
    desc.IncludeSubtypes = True
    desc.NodeClassMask = 0
    desc.ResultMask = ua.BrowseResultMask.All
    params = ua.BrowseParameters()
    params.NodesToBrowse = [desc]
    params.RequestedMaxReferencesPerNode = max_refs
    return params


def _next_params(cp: bytes, release: bool = False) -> ua.BrowseNextParameters:
    params = ua.BrowseNextParameters()
    params.ReleaseContinuationPoints = release
    params.ContinuationPoints = [cp]
    return params


@pytest_twisted.ensureDeferred
async def test_browse_is_paged_with_browse_next(srv: Running) -> None:
    """Part 4 5.8.2/5.8.3: no more references than the client asked for, the rest through
    BrowseNext; used-up and released points are invalid."""
    async def body() -> None:
        async with client(srv, user="bob") as c:
            line1 = ua.NodeId("Line1", await ns_of(c, srv))
            full = (await c.uaclient.browse(_browse_params(line1, 0)))[0]
            names = [r.BrowseName.Name for r in full.References]
            assert len(names) == 6 and not full.ContinuationPoint
            first = (await c.uaclient.browse(_browse_params(line1, 4)))[0]
            assert [r.BrowseName.Name for r in first.References] == names[:4]
            assert first.ContinuationPoint
            second = (await c.uaclient.browse_next(_next_params(first.ContinuationPoint)))[0]
            assert [r.BrowseName.Name for r in second.References] == names[4:]
            assert not second.ContinuationPoint and second.StatusCode.is_good()
            again = (await c.uaclient.browse_next(_next_params(first.ContinuationPoint)))[0]
            assert again.StatusCode.value == ua.StatusCodes.BadContinuationPointInvalid
            one = (await c.uaclient.browse(_browse_params(line1, 1)))[0]
            released = (await c.uaclient.browse_next(
                _next_params(one.ContinuationPoint, release=True)))[0]
            assert released.StatusCode.is_good() and released.References == []
            gone = (await c.uaclient.browse_next(_next_params(one.ContinuationPoint)))[0]
            assert gone.StatusCode.value == ua.StatusCodes.BadContinuationPointInvalid
            caps = c.get_node(ua.ObjectIds.Server_ServerCapabilities_MaxBrowseContinuationPoints)
            assert await caps.read_value() == 10
            # ResultMask: only the browse names asked for (Part 4 5.8.2.2)
            params = _browse_params(line1, 0)
            params.NodesToBrowse[0].ResultMask = ua.BrowseResultMask.BrowseName
            names_only = (await c.uaclient.browse(params))[0]
            assert [r.BrowseName.Name for r in names_only.References] == names
            assert all(r.DisplayName.Text is None and r.NodeClass == ua.NodeClass.Unspecified
                       for r in names_only.References)
            full_again = (await c.uaclient.browse(_browse_params(line1, 0)))[0]
            assert all(r.DisplayName.Text for r in full_again.References)  # not altered
    await aio(body())
