"""Subscriptions of our own: the publishing cycle, Publish, Republish and transfers (Part 4 5.13).

A :class:`Subscription` holds the notifications its monitored items queue (``monitoring.py``
puts data changes into ``datachanges``) and sends them, once per publishing interval, in a
NotificationMessage answering one of its session's queued Publish requests (Part 4 5.13.1.1,
5.13.5). The state machine, simplified from Part 4 5.13.1.2 table 90:

* a cycle with notifications (and publishing enabled) sends them; a cycle without counts the
  keep-alive counter and at ``MaxKeepAliveCount`` (and on the very first cycle) sends an empty
  keep-alive message carrying the *next* sequence number (Part 4 7.21);
* without a Publish request the subscription is *late*: the next Publish request is answered at
  once; each cycle spent late counts the lifetime counter, and at ``LifetimeCount`` the
  subscription expires (a StatusChangeNotification Bad_Timeout for the session, then deleted);
* every data message stays in a bounded retransmission queue until the client acknowledges it
  (Part 4 5.13.6); ``Republish`` answers from that queue, Bad_MessageNotAvailable otherwise;
* subscription ids are random 32-bit numbers, so an id from before a restart names nothing
  after it (a client's Republish or TransferSubscriptions then gets Bad_SubscriptionIdInvalid,
  and it creates a new subscription).

PublishResponses are encoded by :func:`iotserver.opcua.fastenc.encode_publish_response`.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import OrderedDict
from datetime import datetime, UTC
from typing import TYPE_CHECKING, Any

from asyncua import ua
from asyncua.ua.ua_binary import struct_to_binary

from iotserver.opcua.convert import status
from iotserver.opcua.fastenc import encode_publish_response
from iotserver.opcua.monitoring import MAX_NOTIFICATIONS, IotMonitoredItemService

if TYPE_CHECKING:
    from asyncua.server.address_space import AddressSpace

    from iotserver.opcua.monitoring import Limits
    from iotserver.opcua.sessions import Channel, Clock, Session, SessionStats

log = logging.getLogger("iotserver.opcua")

MAX_KEEPALIVE_COUNT = 10_000
MAX_LIFETIME_COUNT = 1_000_000
MAX_PUBLISHING_INTERVAL_MS = 3_600_000.0


class PendingPublish:
    """A Publish request waiting for a notification (Part 4 5.13.5)."""

    __slots__ = ("channel", "request_id", "handle", "received", "timeout_s", "results")

    def __init__(self, channel: Channel, request_id: int, handle: int, received: float,
                 timeout_hint_ms: int, results: list[ua.StatusCode]) -> None:
        self.channel = channel
        self.request_id = request_id
        self.handle = handle
        self.received = received
        self.timeout_s = timeout_hint_ms / 1000.0 if timeout_hint_ms else 0.0
        self.results = results

    def expired(self, now: float) -> bool:
        return bool(self.timeout_s) and now - self.received > self.timeout_s


def response_header(handle: int, code: int = 0) -> ua.ResponseHeader:
    header = ua.ResponseHeader()
    header.Timestamp = datetime.now(UTC)
    header.RequestHandle = handle
    header.ServiceResult = status(code)
    return header


def send_fault(channel: Channel, request_id: int, handle: int, code: int) -> None:
    fault = ua.ServiceFault()
    fault.ResponseHeader = response_header(handle, code)
    if channel.is_open:
        channel.send(request_id, struct_to_binary(fault))


def send_publish(request: PendingPublish, sub_id: int, message: ua.NotificationMessage,
                 available: list[int], more: bool) -> None:
    response = ua.PublishResponse()
    response.ResponseHeader = response_header(request.handle)
    p = response.Parameters
    p.SubscriptionId = sub_id
    p.AvailableSequenceNumbers = available
    p.MoreNotifications = more
    p.NotificationMessage = message
    p.Results = request.results
    if request.channel.is_open:
        request.channel.send(request.request_id, encode_publish_response(response))


def take_request(session: Session, now: float) -> PendingPublish | None:
    """The oldest live Publish request of ``session``; expired ones get Bad_Timeout."""
    queue = session.publish_queue
    while queue:
        request = queue.popleft()
        if not request.channel.is_open:
            continue
        if request.expired(now):
            send_fault(request.channel, request.request_id, request.handle,
                       ua.StatusCodes.BadTimeout)
            continue
        return request
    return None


def status_message(seq: int, code: int) -> ua.NotificationMessage:
    msg = ua.NotificationMessage()
    msg.SequenceNumber = seq
    msg.PublishTime = datetime.now(UTC)
    note = ua.StatusChangeNotification()
    note.Status = status(code)
    msg.NotificationData = [note]
    return msg


class Subscription:
    """One subscription (see the module docstring)."""

    def __init__(self, sub_id: int, session: Session, params: ua.CreateSubscriptionParameters,
                 *, aspace: AddressSpace, limits: Limits, clock: Clock, stats: SessionStats,
                 min_interval_ms: float, max_retransmission: int,
                 on_delete: Any) -> None:
        self.data = ua.CreateSubscriptionResult()
        self.data.SubscriptionId = sub_id
        self.id = sub_id
        self.session: Session | None = session
        self.owner = session.identity  # who may take it over (Part 4 5.13.7)
        self.clock = clock
        self.stats = stats
        self.min_interval_ms = min_interval_ms
        self.max_queue_size = limits.max_queue_size  # read by asyncua's event item code
        self.max_retransmission = max_retransmission
        self._on_delete = on_delete
        self.datachanges: dict[int, list[ua.MonitoredItemNotification]] = {}
        self.events: dict[int, list[ua.EventFieldList]] = {}
        self.statuses: list[int] = []
        self.retransmission: OrderedDict[int, ua.NotificationMessage] = OrderedDict()
        self.next_seq = 1
        self.keepalive_counter = 0
        self.lifetime_counter = 0
        self.message_sent = False
        self.late = False
        self.closed = False
        self.publishing_enabled = bool(params.PublishingEnabled)
        self.max_notifications = MAX_NOTIFICATIONS
        self.revise(params.RequestedPublishingInterval, params.RequestedLifetimeCount,
                    params.RequestedMaxKeepAliveCount, params.MaxNotificationsPerPublish)
        self.monitored_item_srv = IotMonitoredItemService(self, aspace, limits)
        self._timer: Any = None

    # -- parameters (Part 4 5.13.2.2) ------------------------------------------------------------
    def revise(self, interval: float, lifetime: int, keepalive: int,
               max_notifications: int) -> None:
        if not math.isfinite(interval) or interval < self.min_interval_ms:
            interval = self.min_interval_ms
        interval = min(interval, MAX_PUBLISHING_INTERVAL_MS)
        keepalive = min(max(int(keepalive), 1), MAX_KEEPALIVE_COUNT)
        # the lifetime count is at least three times the keep-alive count
        lifetime = min(max(int(lifetime), 3 * keepalive), MAX_LIFETIME_COUNT)
        self.data.RevisedPublishingInterval = interval
        self.data.RevisedMaxKeepAliveCount = keepalive
        self.data.RevisedLifetimeCount = lifetime
        self.max_notifications = min(max_notifications or MAX_NOTIFICATIONS, MAX_NOTIFICATIONS)

    @property
    def interval_s(self) -> float:
        return float(self.data.RevisedPublishingInterval) / 1000.0

    def start(self) -> None:
        self._timer = self.clock.callLater(self.interval_s, self._tick)

    def restart_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.start()

    def stop(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.monitored_item_srv.delete_all_monitored_items()
        self.datachanges = {}
        self.events = {}

    # -- notifications from the monitored items (asyncua's event item code awaits these) ------
    async def enqueue_event(self, mid: int, fields: ua.EventFieldList, maxsize: int) -> None:
        queue = self.events.setdefault(mid, [])
        queue.append(fields)
        if maxsize and len(queue) > maxsize:
            del queue[0]

    async def enqueue_datachange_event(self, mid: int, note: ua.MonitoredItemNotification,
                                       maxsize: int) -> None:
        queue = self.datachanges.setdefault(mid, [])
        queue.append(note)
        if maxsize and len(queue) > maxsize:
            del queue[0]

    async def enqueue_statuschange(self, code: ua.StatusCode) -> None:
        self.statuses.append(int(code.value))

    def has_notifications(self) -> bool:
        return bool(self.statuses) or (self.publishing_enabled and
                                       bool(self.datachanges or self.events))

    # -- the publishing cycle ----------------------------------------------------------------------
    def _tick(self) -> None:
        if self.closed:
            return
        self._timer = self.clock.callLater(self.interval_s, self._tick)
        if self.late:
            self._count_lifetime()
            return
        if self.has_notifications():
            self._try_send()
            return
        self.keepalive_counter += 1
        if not self.message_sent or \
                self.keepalive_counter >= self.data.RevisedMaxKeepAliveCount:
            self._try_send()

    def _try_send(self) -> None:
        session = self.session
        request = take_request(session, self.clock.seconds()) if session is not None else None
        if request is None:
            self.late = True
            self._count_lifetime()
            return
        self.publish(request)

    def _count_lifetime(self) -> None:
        self.lifetime_counter += 1
        if self.lifetime_counter >= self.data.RevisedLifetimeCount:
            log.info("OPC UA subscription %d expired: no Publish request for %d cycles",
                     self.id, self.lifetime_counter)
            session = self.session
            if session is not None and not session.closed:
                session.pending_status.append((self.id, self.next_seq,
                                               ua.StatusCodes.BadTimeout))
            self._on_delete(self)

    def publish(self, request: PendingPublish) -> None:
        """Answer ``request`` with what is queued (or a keep-alive), then go on while more
        notifications wait and Publish requests are queued (Part 4 5.13.1.1)."""
        while True:
            message, more = self._message()
            if message.NotificationData:
                self.retransmission[message.SequenceNumber] = message
                while len(self.retransmission) > self.max_retransmission:
                    self.retransmission.popitem(last=False)
                    self.stats.retransmission_dropped += 1
            send_publish(request, self.id, message, list(self.retransmission), more)
            self.message_sent = True
            self.late = False
            self.keepalive_counter = 0
            self.lifetime_counter = 0
            session = self.session
            if not more or session is None:
                return
            nxt = take_request(session, self.clock.seconds())
            if nxt is None:
                self.late = True  # the rest goes with the next Publish request
                return
            request = nxt

    def _message(self) -> tuple[ua.NotificationMessage, bool]:
        msg = ua.NotificationMessage()
        msg.PublishTime = datetime.now(UTC)
        data: list[Any] = []
        if self.publishing_enabled:
            self._take_datachanges(data)
            if self.events:
                note = ua.EventNotificationList()
                note.Events = [e for q in self.events.values() for e in q]
                self.events = {}
                data.append(note)
        if self.statuses:
            note_s = ua.StatusChangeNotification()
            note_s.Status = status(self.statuses.pop(0))
            data.append(note_s)
        msg.NotificationData = data
        msg.SequenceNumber = self.next_seq
        if data:
            self.next_seq = self.next_seq + 1 if self.next_seq < 0xFFFFFFFF else 1
        more = self.publishing_enabled and bool(self.datachanges)
        return msg, more

    def _take_datachanges(self, data: list[Any]) -> None:
        """At most ``max_notifications`` per message, each item's values in order
        (Part 4 5.13.1.1, 5.13.2.2 maxNotificationsPerPublish)."""
        pending = self.datachanges
        if not pending:
            return
        limit = self.max_notifications
        notif = ua.DataChangeNotification()
        if sum(len(q) for q in pending.values()) <= limit:
            notif.MonitoredItems = [n for q in pending.values() for n in q]
            self.datachanges = {}
        else:
            out: list[ua.MonitoredItemNotification] = []
            for mid in list(pending):
                queue = pending[mid]
                room = limit - len(out)
                if len(queue) <= room:
                    out += queue
                    del pending[mid]
                else:
                    out += queue[:room]
                    del queue[:room]
                    break
            notif.MonitoredItems = out
        data.append(notif)

    # -- acknowledgements and Republish (Part 4 5.13.5, 5.13.6) -----------------------------------
    def acknowledge(self, seq: int) -> int:
        if self.retransmission.pop(seq, None) is None:
            return int(ua.StatusCodes.BadSequenceNumberUnknown)
        return 0

    def republish(self, seq: int) -> ua.NotificationMessage | None:
        return self.retransmission.get(seq)


class SubscriptionRegistry:
    """All subscriptions by id (ids are random, see the module docstring)."""

    def __init__(self) -> None:
        self.by_id: dict[int, Subscription] = {}

    def __len__(self) -> int:
        return len(self.by_id)

    def new_id(self) -> int:
        while True:
            sub_id = secrets.randbits(32)
            if sub_id and sub_id not in self.by_id:
                return sub_id

    def add(self, sub: Subscription) -> None:
        self.by_id[sub.id] = sub

    def remove(self, sub: Subscription) -> None:
        self.by_id.pop(sub.id, None)
        if sub.session is not None:
            sub.session.subscriptions.pop(sub.id, None)
        sub.stop()

    def monitored_item_handles(self, subscription_id: int, session_id: ua.NodeId
                               ) -> tuple[list[int], list[int]] | None:
        """(server handles, client handles) of a subscription of the session ``session_id``,
        for GetMonitoredItems (Part 5 9.1); None when it does not exist or is another's."""
        sub = self.by_id.get(subscription_id)
        if sub is None or sub.session is None or sub.session.session_id != session_id:
            return None
        srv = sub.monitored_item_srv
        items = [(i.mid, i.client_handle) for i in srv.data_items()]
        items += [(mid, m.client_handle) for mid, m in srv.event_items()]
        items.sort()
        return [mid for mid, _ in items], [ch for _, ch in items]

    async def trigger_event(self, event: Any, subscription_id: int | None = None) -> None:
        """Event delivery for asyncua's event generator (its SubscriptionService API)."""
        subs = [self.by_id[subscription_id]] if subscription_id in self.by_id else \
            list(self.by_id.values()) if subscription_id is None else []
        for sub in subs:
            await sub.monitored_item_srv.trigger_event(event)
