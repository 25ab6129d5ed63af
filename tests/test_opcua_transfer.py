"""TransferSubscriptions with asyncua clients (Part 4 5.13.7): the user check, the
StatusChangeNotification to the old session, Publish of the new session, SendInitialValues."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from asyncua import ua
from helpers import free_port, wait_for_aio
from helpers.opcua import aio, client, make_config, start

from iotserver.tags.model import Update


class Handler:
    def __init__(self) -> None:
        self.values: list[Any] = []
        self.statuses: list[int] = []

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        self.values.append(val)

    def status_change_notification(self, status: Any) -> None:
        self.statuses.append(int(status.Status.value))


@pytest_twisted.ensureDeferred
async def test_transfer_to_the_same_user_with_initial_values(tmp_path: Path) -> None:
    running = await start(make_config(tmp_path / "data", free_port()))
    running.store.apply([Update("Line1/Temp", 21.5)])

    async def body() -> None:
        idx = running.service.space.idx
        async with client(running, user="alice") as a, client(running, user="alice") as b, \
                client(running, user="bob") as other:
            handler = Handler()
            sub = await a.create_subscription(50, handler)
            await sub.subscribe_data_change(a.get_node(ua.NodeId("Line1/Temp", idx)))
            await wait_for_aio(lambda: handler.values == [21.5], what="the first value")
            params = ua.TransferSubscriptionsParameters()
            params.SubscriptionIds = [sub.subscription_id]
            params.SendInitialValues = True
            refused = await other.uaclient.transfer_subscriptions(params)
            assert refused[0].StatusCode.value == ua.StatusCodes.BadUserAccessDenied
            moved = await b.uaclient.transfer_subscriptions(params)
            assert moved[0].StatusCode.is_good()
            # the old session is told; the new one gets the current value at once
            await wait_for_aio(
                lambda: ua.StatusCodes.GoodSubscriptionTransferred in handler.statuses,
                what="Good_SubscriptionTransferred on the old session")
            response = await b.uaclient.publish([])
            result = response.Parameters
            assert result.SubscriptionId == sub.subscription_id
            data = result.NotificationMessage.NotificationData[0]
            assert [n.Value.Value.Value for n in data.MonitoredItems] == [21.5]
            running.store.apply([Update("Line1/Temp", 22.5)])
            ack = ua.SubscriptionAcknowledgement(SubscriptionId=sub.subscription_id,
                                                 SequenceNumber=result.NotificationMessage
                                                 .SequenceNumber)
            response = await b.uaclient.publish([ack])
            data = response.Parameters.NotificationMessage.NotificationData[0]
            assert [n.Value.Value.Value for n in data.MonitoredItems] == [22.5]
            assert handler.values == [21.5]  # nothing more went to the old session

    try:
        await aio(body())
    finally:
        await running.root.stopService()
