"""The subscription services (Part 4 5.12-5.13): create/modify/delete subscriptions and
monitored items, Publish, Republish and TransferSubscriptions, each within the requesting
session only (a subscription id of another session is Bad_SubscriptionIdInvalid).

* Publish (5.13.5): acknowledgements first (Good, Bad_SubscriptionIdInvalid,
  Bad_SequenceNumberUnknown per ack); a waiting StatusChangeNotification (a transferred or
  expired subscription) or a *late* subscription is answered at once; otherwise the request
  is queued, at most ``max_publish_requests`` per session (but always one more than the
  session has subscriptions); past that the oldest is answered Bad_TooManyPublishRequests.
  A session without subscriptions gets Bad_NoSubscription.
* Republish (5.13.6): from the retransmission queue; Bad_SubscriptionIdInvalid,
  Bad_MessageNotAvailable.
* TransferSubscriptions (5.13.7): only to a session of the same user identity
  (Bad_UserAccessDenied otherwise); the old session gets a StatusChangeNotification
  Good_SubscriptionTransferred; from then on Publish requests of the new session (and so its
  channel) carry the notifications; SendInitialValues queues every reporting item's value.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from asyncua import ua
from asyncua.common.utils import ServiceError

from iotserver.opcua.convert import status
from iotserver.opcua.subscriptions import (
    PendingPublish,
    Subscription,
    SubscriptionRegistry,
    send_fault,
    send_publish,
    status_message,
    take_request,
)

if TYPE_CHECKING:
    from asyncua.server.address_space import AddressSpace

    from iotserver.opcua.dispatch import Request
    from iotserver.opcua.monitoring import Limits
    from iotserver.opcua.sessions import Session, SessionTable

log = logging.getLogger("iotserver.opcua")


class SubscriptionServices:
    def __init__(self, table: SessionTable, registry: SubscriptionRegistry,
                 aspace: AddressSpace, item_limits: Limits, *, min_interval_ms: float) -> None:
        self.table = table
        self.registry = registry
        self.aspace = aspace
        self.item_limits = item_limits
        self.min_interval_ms = min_interval_ms
        self.publish_requests = 0
        self.republish_requests = 0

    # -- lifecycle -------------------------------------------------------------------------
    def session_ended(self, session: Session, delete_subscriptions: bool, reason: str) -> None:
        """Called by the session table for every session that ends."""
        for request in list(session.publish_queue):
            send_fault(request.channel, request.request_id, request.handle,
                       ua.StatusCodes.BadSessionClosed)
        session.publish_queue.clear()
        for sub in list(session.subscriptions.values()):
            if delete_subscriptions:
                self.registry.remove(sub)
            else:
                sub.session = None  # kept for TransferSubscriptions until its lifetime ends
        session.subscriptions.clear()
        if session.services is not None:
            session.services.browse_points.clear()

    def _delete(self, sub: Subscription) -> None:
        self.registry.remove(sub)

    def stop(self) -> None:
        for sub in list(self.registry.by_id.values()):
            self.registry.remove(sub)

    def fault(self, request: PendingPublish, code: int) -> None:
        send_fault(request.channel, request.request_id, request.handle, code)

    @staticmethod
    def _sub(request: Request, sub_id: int) -> Subscription:
        assert request.session is not None
        sub = request.session.subscriptions.get(sub_id)
        if sub is None:
            raise ServiceError(ua.StatusCodes.BadSubscriptionIdInvalid)
        return sub

    # -- subscriptions -----------------------------------------------------------------------
    async def create_subscription(self, request: Request) -> Any:
        params = request.params(ua.CreateSubscriptionParameters)
        session = request.session
        assert session is not None
        if len(self.registry) >= self.table.limits.max_subscriptions:
            log.warning("OPC UA: subscription of %s refused: max_subscriptions (%d) reached",
                        session, self.table.limits.max_subscriptions)
            raise ServiceError(ua.StatusCodes.BadTooManySubscriptions)
        sub = Subscription(self.registry.new_id(), session, params, aspace=self.aspace,
                           limits=self.item_limits, clock=self.table.clock,
                           stats=self.table.stats, min_interval_ms=self.min_interval_ms,
                           max_retransmission=self.table.limits.max_retransmission_queue,
                           on_delete=self._delete)
        self.registry.add(sub)
        session.subscriptions[sub.id] = sub
        sub.start()
        response = ua.CreateSubscriptionResponse()
        response.Parameters = sub.data
        return response

    async def modify_subscription(self, request: Request) -> Any:
        params = request.params(ua.ModifySubscriptionParameters)
        sub = self._sub(request, params.SubscriptionId)
        sub.revise(params.RequestedPublishingInterval, params.RequestedLifetimeCount,
                   params.RequestedMaxKeepAliveCount, params.MaxNotificationsPerPublish)
        sub.restart_timer()
        result = ua.ModifySubscriptionResult()
        result.RevisedPublishingInterval = sub.data.RevisedPublishingInterval
        result.RevisedLifetimeCount = sub.data.RevisedLifetimeCount
        result.RevisedMaxKeepAliveCount = sub.data.RevisedMaxKeepAliveCount
        response = ua.ModifySubscriptionResponse()
        response.Parameters = result
        return response

    async def set_publishing_mode(self, request: Request) -> Any:
        params = request.params(ua.SetPublishingModeParameters)
        session = request.session
        assert session is not None
        results = []
        for sub_id in params.SubscriptionIds:
            sub = session.subscriptions.get(sub_id)
            if sub is None:
                results.append(status(ua.StatusCodes.BadSubscriptionIdInvalid))
                continue
            sub.publishing_enabled = bool(params.PublishingEnabled)
            results.append(status(0))
        response = ua.SetPublishingModeResponse()
        response.Parameters.Results = results
        return response

    async def delete_subscriptions(self, request: Request) -> Any:
        params = request.params(ua.DeleteSubscriptionsParameters)
        session = request.session
        assert session is not None
        results = []
        for sub_id in params.SubscriptionIds:
            sub = session.subscriptions.get(sub_id)
            if sub is None:
                results.append(status(ua.StatusCodes.BadSubscriptionIdInvalid))
                continue
            self.registry.remove(sub)
            results.append(status(0))
        if not session.subscriptions:
            # Part 4 5.13.8: queued Publish requests of a session without subscriptions
            for pending in list(session.publish_queue):
                self.fault(pending, ua.StatusCodes.BadNoSubscription)
            session.publish_queue.clear()
        response = ua.DeleteSubscriptionsResponse()
        response.Results = results
        return response

    # -- monitored items -------------------------------------------------------------------------
    async def create_monitored_items(self, request: Request) -> Any:
        params = request.params(ua.CreateMonitoredItemsParameters)
        sub = self._sub(request, params.SubscriptionId)
        if not params.ItemsToCreate:
            raise ServiceError(ua.StatusCodes.BadNothingToDo)
        if params.TimestampsToReturn not in (0, 1, 2, 3):
            raise ServiceError(ua.StatusCodes.BadTimestampsToReturnInvalid)
        response = ua.CreateMonitoredItemsResponse()
        response.Results = await sub.monitored_item_srv.create_monitored_items(params)
        return response

    async def modify_monitored_items(self, request: Request) -> Any:
        params = request.params(ua.ModifyMonitoredItemsParameters)
        sub = self._sub(request, params.SubscriptionId)
        if not params.ItemsToModify:
            raise ServiceError(ua.StatusCodes.BadNothingToDo)
        response = ua.ModifyMonitoredItemsResponse()
        response.Results = sub.monitored_item_srv.modify_monitored_items(params)
        return response

    async def delete_monitored_items(self, request: Request) -> Any:
        params = request.params(ua.DeleteMonitoredItemsParameters)
        sub = self._sub(request, params.SubscriptionId)
        if not params.MonitoredItemIds:
            raise ServiceError(ua.StatusCodes.BadNothingToDo)
        response = ua.DeleteMonitoredItemsResponse()
        response.Results = sub.monitored_item_srv.delete_monitored_items(params.MonitoredItemIds)
        return response

    async def set_monitoring_mode(self, request: Request) -> Any:
        params = request.params(ua.SetMonitoringModeParameters)
        sub = self._sub(request, params.SubscriptionId)
        if not params.MonitoredItemIds:
            raise ServiceError(ua.StatusCodes.BadNothingToDo)
        response = ua.SetMonitoringModeResponse()
        response.Parameters.Results = await sub.monitored_item_srv.set_monitoring_mode(
            params.MonitoringMode, params.MonitoredItemIds)
        return response

    # -- Publish / Republish (Part 4 5.13.5, 5.13.6) ----------------------------------------------
    async def publish(self, request: Request) -> None:
        self.publish_requests += 1
        params = request.params(ua.PublishParameters)
        session = request.session
        assert session is not None
        results = []
        for ack in params.SubscriptionAcknowledgements or []:
            sub = session.subscriptions.get(ack.SubscriptionId)
            code = ua.StatusCodes.BadSubscriptionIdInvalid if sub is None else \
                sub.acknowledge(ack.SequenceNumber)
            results.append(status(code))
        pending = PendingPublish(request.channel, request.request_id,
                                 request.header.RequestHandle, self.table.clock.seconds(),
                                 request.header.TimeoutHint, results)
        if session.pending_status:
            sub_id, seq, code = session.pending_status.pop(0)
            send_publish(pending, sub_id, status_message(seq, code), [], False)
            return
        if not session.subscriptions:
            raise ServiceError(ua.StatusCodes.BadNoSubscription)
        late = [s for s in session.subscriptions.values() if s.late]
        if late:
            late[0].publish(pending)
            return
        queue = session.publish_queue
        limit = max(self.table.limits.max_publish_requests, len(session.subscriptions) + 1)
        while len(queue) >= limit:
            self.table.stats.publish_overflow += 1
            self.fault(queue.popleft(), ua.StatusCodes.BadTooManyPublishRequests)
        queue.append(pending)

    async def republish(self, request: Request) -> Any:
        self.republish_requests += 1
        self.table.stats.republish += 1
        params = request.params(ua.RepublishParameters)
        sub = self._sub(request, params.SubscriptionId)
        message = sub.republish(params.RetransmitSequenceNumber)
        if message is None:
            raise ServiceError(ua.StatusCodes.BadMessageNotAvailable)
        response = ua.RepublishResponse()
        response.NotificationMessage = message
        return response

    # -- TransferSubscriptions (Part 4 5.13.7) ---------------------------------------------------
    async def transfer_subscriptions(self, request: Request) -> Any:
        params = request.params(ua.TransferSubscriptionsParameters)
        session = request.session
        assert session is not None
        results = []
        for sub_id in params.SubscriptionIds:
            result = ua.TransferResult()
            sub = self.registry.by_id.get(sub_id)
            old = sub.session if sub is not None else None
            if sub is None:
                result.StatusCode = status(ua.StatusCodes.BadSubscriptionIdInvalid)
            elif sub.owner != session.identity:
                log.warning("OPC UA: transfer of subscription %d to %s refused: it belongs "
                            "to another user", sub_id, session)
                self.table.stats.takeover_refused += 1
                result.StatusCode = status(ua.StatusCodes.BadUserAccessDenied)
            else:
                self._move(sub, old, session, bool(params.SendInitialValues))
                result.StatusCode = status(0)
                result.AvailableSequenceNumbers = list(sub.retransmission)
            results.append(result)
        response = ua.TransferSubscriptionsResponse()
        response.Parameters.Results = results
        return response

    def _move(self, sub: Subscription, old: Session | None, new: Session,
              send_initial: bool) -> None:
        if old is not new:
            if old is not None:
                old.subscriptions.pop(sub.id, None)
                message = status_message(sub.next_seq, ua.StatusCodes.GoodSubscriptionTransferred)
                now = self.table.clock.seconds()
                waiting = take_request(old, now)
                if waiting is not None:
                    send_publish(waiting, sub.id, message, [], False)
                elif not old.closed:
                    old.pending_status.append((sub.id, sub.next_seq,
                                               ua.StatusCodes.GoodSubscriptionTransferred))
            sub.session = new
            new.subscriptions[sub.id] = sub
            sub.late = False
            sub.lifetime_counter = 0
        sub.owner = new.identity
        if send_initial:
            sub.monitored_item_srv.resend_initial_values()
        log.info("OPC UA subscription %d transferred to %s", sub.id, new)
