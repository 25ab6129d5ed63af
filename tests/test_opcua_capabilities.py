"""ServerCapabilities and ServerProfileArray read the configured, enforced limits
(``iotserver.opcua.capabilities``), through an asyncua client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from asyncua import ua
from helpers import free_port
from helpers.opcua import aio, client, make_config, start

from iotserver.opcua import capabilities as caps
from iotserver.opcua.config import OpcUaConfig

LIMITS = """max_sessions = 7
max_subscriptions = 9
max_monitored_items = 1234
max_queue_size = 50
max_browse_continuation_points = 3
"""
OID = ua.ObjectIds


def test_capabilities_come_from_the_configuration() -> None:
    cfg = OpcUaConfig(max_sessions=3, max_subscriptions=4, max_monitored_items=5,
                      max_queue_size=6, max_browse_continuation_points=8,
                      security_policies=("Basic256Sha256",))
    out = caps.capabilities(cfg, 1 << 20)
    assert out[OID.Server_ServerCapabilities_MaxSessions] == (3, ua.VariantType.UInt32)
    assert out[OID.Server_ServerCapabilities_MaxSubscriptionsPerSession][0] == 4
    assert out[OID.Server_ServerCapabilities_MaxMonitoredItemsPerSubscription][0] == 5
    assert out[OID.Server_ServerCapabilities_MaxMonitoredItemsQueueSize][0] == 6
    assert out[OID.Server_ServerCapabilities_MaxBrowseContinuationPoints] == \
        (8, ua.VariantType.UInt16)
    assert out[OID.Server_ServerCapabilities_MaxStringLength][0] == 1 << 20
    profiles = out[OID.Server_ServerCapabilities_ServerProfileArray][0]
    assert caps.SECURITY_POLICY_URI + "Basic256Sha256" in profiles
    assert caps.SECURITY_POLICY_URI + "None" not in profiles
    assert caps.TRANSPORT_PROFILE in profiles


@pytest_twisted.ensureDeferred
async def test_capabilities_and_profiles_read_the_real_limits(tmp_path: Path) -> None:
    running = await start(make_config(tmp_path / "data", free_port(), extra=LIMITS))
    cfg = running.cfg.sections["opcua"]
    server = running.service.server
    expected = caps.capabilities(cfg, server.limits.max_message_size)

    async def body() -> None:
        async with client(running, user="bob") as c:
            params = ua.ReadParameters()
            for node_id in expected:
                rv = ua.ReadValueId()
                rv.NodeId = ua.NodeId(node_id)
                rv.AttributeId = ua.AttributeIds.Value
                params.NodesToRead.append(rv)
            values = await c.uaclient.read(params)
            for node_id, dv in zip(expected, values, strict=True):
                value, vtype = expected[node_id]
                assert dv.StatusCode.is_good(), (node_id, dv)
                assert dv.Value.VariantType == vtype and dv.Value.Value == value, (node_id, dv)

            async def read(name: str) -> Any:
                return await c.get_node(getattr(OID, "Server_ServerCapabilities_" + name)
                                        ).read_value()

            assert await read("MaxSessions") == 7
            assert await read("MaxSubscriptionsPerSession") == 9
            assert await read("MaxMonitoredItemsPerSubscription") == 1234
            assert await read("MaxMonitoredItemsQueueSize") == 50
            assert await read("MaxStringLength") == 100 * 1024 * 1024  # the message size
            assert await read("OperationLimits_MaxNodesPerRead") == 0  # no limit but the size
            profiles = await read("ServerProfileArray")
            assert profiles == [caps.TRANSPORT_PROFILE,
                                caps.SECURITY_POLICY_URI + "None",
                                caps.SECURITY_POLICY_URI + "Basic256Sha256", *caps.FACETS]

            # the advertised queue size is the one enforced
            ns = await c.get_namespace_index(running.namespace)
            sub = await c.create_subscription(100, None)
            req = ua.MonitoredItemCreateRequest()
            req.ItemToMonitor.NodeId = ua.NodeId("Line1/Temp", ns)
            req.ItemToMonitor.AttributeId = ua.AttributeIds.Value
            req.RequestedParameters.ClientHandle = 1
            req.RequestedParameters.QueueSize = 1000
            mparams = ua.CreateMonitoredItemsParameters()
            mparams.SubscriptionId = sub.subscription_id
            mparams.ItemsToCreate = [req]
            mparams.TimestampsToReturn = ua.TimestampsToReturn.Both
            result = (await c.uaclient.create_monitored_items(mparams))[0]
            assert result.StatusCode.is_good() and result.RevisedQueueSize == 50

    try:
        await aio(body())
    finally:
        await running.root.stopService()
