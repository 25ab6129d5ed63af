"""Data-change monitored items done per spec, and fast.

asyncua 2.1's server-side data-change handling deviates from OPC UA in ways clients notice
(asyncua 2.1.0): the deadband compares against the previous *sample* instead of the last *reported*
value (a slow ramp never notifies), Percent deadband is ignored, QueueSize 0 becomes 10,000,
discardOldest is ignored and the Overflow bit is never set. It also deep-copies every DataValue
per monitored item, which caps throughput at a few thousand changes/s.

This module replaces the data-change half of asyncua's ``MonitoredItemService`` (events still use
the inherited code) with :class:`IotMonitoredItemService`, one per subscription
(``subscriptions.py``, whose ``datachanges`` dict it fills):

* DataChangeFilter per Part 4 7.22.2 (trigger, Absolute deadband vs the last reported value,
  element-wise for arrays) and Part 8 7.2 (Percent deadband of the EURange);
* queue handling per Part 4 5.13.1.5 (QueueSize 0/1 -> 1 and "newest wins"; discardOldest;
  Overflow info bit);
* TimestampsToReturn per item (Part 4 5.13.2.2);
* the sampling interval (Part 4 5.12.1.2): 0 reports every change (the tag store is
  event-driven), a positive interval at most one sample per interval (the newest value at the
  end of it), -1 the subscription's publishing interval;
* DataValues are shared, never copied: every DataValue this package stores is treated as
  immutable (a new one is made for each change).

The update loop calls :meth:`_Hook.sync` directly (no coroutine, no copy) for every monitored item
of a changed node; writes through asyncua's own API still arrive via the async hook.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

from asyncua import ua
from asyncua.server.address_space import AddressSpace
from asyncua.server.monitored_item_service import MonitoredItemService
from asyncua.ua.uaprotocol_auto import DataChangeFilter  # ua.DataChangeFilter is a subclass:
# decoded filters are instances of this base class, not of ua.DataChangeFilter
from twisted.internet.interfaces import IReactorTime

from iotserver.clock import LoopClock
from iotserver.opcua.convert import status

OVERFLOW_BITS = 0x0480  # InfoType DataValue (bit 10) + Overflow (bit 7), Part 4 7.39.1
MAX_QUEUE_SIZE = 10_000
# Server-side cap on notifications per NotificationMessage: about 40 ms to encode, ~350 kB.
MAX_NOTIFICATIONS = 10_000
MAX_SAMPLING_MS = 3_600_000.0  # revised down to one hour
_NUMERIC = {ua.VariantType(i) for i in range(2, 12)}  # SByte .. Double (Part 6 5.1.2)
_VALUE = ua.AttributeIds.Value
_HAS_PROPERTY = ua.NodeId(ua.ObjectIds.HasProperty)


class _Hook:
    """The datachange callback registered with the address space for one service.

    asyncua awaits it (``await hook(handle, dv)``); our update loop calls ``sync`` directly.
    """

    __slots__ = ("sync",)

    def __init__(self, sync: Callable[[int, ua.DataValue], None]) -> None:
        self.sync = sync

    async def __call__(self, handle: int, value: ua.DataValue | None,
                       error: ua.StatusCode | None = None) -> None:
        if error is not None or value is None:
            # node deleted (asyncua's delete_nodes): report it on the item, Part 4 5.13.1
            value = ua.DataValue(StatusCode=error or status(ua.StatusCodes.BadNodeIdUnknown))
        self.sync(handle, value)


class Item:
    """State of one data-change MonitoredItem."""

    __slots__ = ("mid", "handle", "client_handle", "node_id", "attr", "mode", "queue_size",
                 "discard_oldest", "trigger", "deadband", "last", "timestamps", "sampled",
                 "filter", "sampling", "next_due", "pending", "timer")

    def __init__(self) -> None:
        self.mid = 0
        self.handle = 0
        self.client_handle = 0
        self.node_id: ua.NodeId = ua.NodeId()
        self.attr = _VALUE
        self.mode = ua.MonitoringMode.Reporting
        self.queue_size = 1
        self.discard_oldest = True
        self.trigger = ua.DataChangeTrigger.StatusValue
        self.deadband = 0.0  # absolute limit, already converted from percent
        self.last: ua.DataValue | None = None  # last value queued (= reported)
        self.timestamps = ua.TimestampsToReturn.Both
        self.sampled: list[ua.DataValue] = []  # queue while in Sampling mode
        self.filter: Any = None
        self.sampling = 0.0  # seconds between samples; 0: every change
        self.next_due = 0.0  # clock time from which the next change may be sampled at once
        self.pending: ua.DataValue | None = None  # newest change waiting for its sample
        self.timer: Any = None  # the clock's pending call for that sample


def _exceeds(old: Any, new: Any, limit: float) -> bool:
    """Absolute deadband test (Part 4 7.22.2), element-wise for arrays."""
    if isinstance(new, list) and isinstance(old, list):
        if len(new) != len(old):
            return True
        return any(_exceeds(o, n, limit) for o, n in zip(old, new, strict=True))
    try:
        return abs(float(new) - float(old)) > limit
    except (TypeError, ValueError):
        return True


_STATUS = ua.DataChangeTrigger.Status
_STATUS_VALUE_TIMESTAMP = ua.DataChangeTrigger.StatusValueTimestamp
_DISABLED = ua.MonitoringMode.Disabled
_SAMPLING = ua.MonitoringMode.Sampling
_BOTH = ua.TimestampsToReturn.Both
_Notification = ua.MonitoredItemNotification
_new = object.__new__


def _differ(ov: ua.Variant | None, nv: ua.Variant | None) -> bool:
    """Variant inequality without Variant.__ne__ (a Python-level call chain)."""
    if ov is None or nv is None:
        return ov is not nv
    return ov.VariantType is not nv.VariantType or bool(ov.Value != nv.Value)


def passes(item: Item, dv: ua.DataValue) -> bool:
    """Whether ``dv`` is reported, compared with the last reported value (Part 4 7.22.2)."""
    last = item.last
    if last is None:
        return True
    old_sc = last.StatusCode.value if last.StatusCode is not None else 0
    new_sc = dv.StatusCode.value if dv.StatusCode is not None else 0
    if old_sc != new_sc:
        return True  # "Deadband is ignored if the status of the data item changes"
    trigger = item.trigger
    if trigger is _STATUS:
        return False
    ov, nv = last.Value, dv.Value
    if item.deadband > 0.0 and ov is not None and nv is not None:
        if ov.Value is not None and nv.Value is not None:
            if _exceeds(ov.Value, nv.Value, item.deadband):
                return True
        elif _differ(ov, nv):
            return True
    elif _differ(ov, nv):
        return True
    if trigger is _STATUS_VALUE_TIMESTAMP:
        changed: bool = (last.SourceTimestamp != dv.SourceTimestamp
                         or last.SourcePicoseconds != dv.SourcePicoseconds)
        return changed
    return False


def _strip_timestamps(dv: ua.DataValue, which: ua.TimestampsToReturn) -> ua.DataValue:
    """A copy without the timestamps the client did not ask for (positional: dataclasses.replace
    costs several microseconds)."""
    if which == ua.TimestampsToReturn.Both:
        return dv
    if which == ua.TimestampsToReturn.Source:
        return ua.DataValue(dv.Value, dv.StatusCode, dv.SourceTimestamp, None,
                            dv.SourcePicoseconds, None)
    if which == ua.TimestampsToReturn.Server:
        return ua.DataValue(dv.Value, dv.StatusCode, None, dv.ServerTimestamp, None,
                            dv.ServerPicoseconds)
    return ua.DataValue(dv.Value, dv.StatusCode)


def _with_overflow(note: ua.MonitoredItemNotification) -> ua.MonitoredItemNotification:
    dv = note.Value
    code = dv.StatusCode.value if dv.StatusCode is not None else 0
    flagged = ua.DataValue(dv.Value, status(code | OVERFLOW_BITS), dv.SourceTimestamp,
                           dv.ServerTimestamp, dv.SourcePicoseconds, dv.ServerPicoseconds)
    return ua.MonitoredItemNotification(note.ClientHandle, flagged)


def eu_range(aspace: AddressSpace, node_id: ua.NodeId) -> tuple[float, float] | None:
    """The (low, high) of a node's EURange property, if it has one (Part 8 5.3.2.2)."""
    node = aspace.get(node_id)
    if node is None:
        return None
    for ref in node.references:
        if ref.IsForward and ref.ReferenceTypeId == _HAS_PROPERTY and \
                ref.BrowseName.Name == "EURange":
            dv = aspace.read_attribute_value(ref.NodeId, _VALUE)
            rng = dv.Value.Value if dv.Value is not None else None
            if isinstance(rng, ua.Range):
                return float(rng.Low), float(rng.High)
    return None


def _no_filter(flt: Any) -> bool:
    """A missing filter arrives as None or as a null ExtensionObject (Part 6 5.2.2.15)."""
    return flt is None or (isinstance(flt, ua.ExtensionObject) and flt.Body is None)


class Limits:
    """Server-wide monitored item count (``max_monitored_items``) and the largest queue one
    item may have (``max_queue_size``)."""

    def __init__(self, max_items: int, max_queue_size: int = MAX_QUEUE_SIZE) -> None:
        self.max_items = max_items
        self.max_queue_size = max_queue_size
        self.count = 0


class IotMonitoredItemService(MonitoredItemService):  # type: ignore[misc]  # asyncua is untyped
    """Data-change items per spec without copies; event items use asyncua's code."""

    def __init__(self, isub: Any, aspace: AddressSpace, limits: Limits,
                 clock: IReactorTime | None = None) -> None:
        super().__init__(isub, aspace)
        self._items: dict[int, Item] = {}
        self._by_handle: dict[int, Item] = {}
        self._limits = limits
        self.hook = _Hook(self.on_change)
        # IReactorTime of the sampling interval (task.Clock in tests); by default the asyncio
        # loop's monotonic clock (found on first use)
        self.clock: Any = clock

    # -- creation / modification ---------------------------------------------------------
    async def create_monitored_items(
        self, params: ua.CreateMonitoredItemsParameters
    ) -> list[ua.MonitoredItemCreateResult]:
        results = []
        for req in params.ItemsToCreate:
            if req.ItemToMonitor.AttributeId == ua.AttributeIds.EventNotifier:
                node = self.aspace.get(req.ItemToMonitor.NodeId)
                if node is None or ua.AttributeIds.EventNotifier not in node.attributes:
                    # unknown, or a node without EventNotifier (a Variable): Part 4 5.12.2.4
                    result = ua.MonitoredItemCreateResult()
                    result.StatusCode = status(ua.StatusCodes.BadNodeIdUnknown if node is None
                                               else ua.StatusCodes.BadAttributeIdInvalid)
                    results.append(result)
                elif not isinstance(req.RequestedParameters.Filter, ua.EventFilter):
                    # an event item needs an EventFilter (Part 4 7.22.3); asyncua faulted the
                    # whole request (Bad_InternalError) without one
                    result = ua.MonitoredItemCreateResult()
                    result.StatusCode = status(ua.StatusCodes.BadMonitoredItemFilterInvalid)
                    results.append(result)
                else:
                    results.append(self._create_events_monitored_item(req))
            else:
                results.append(self._create_item(req, params.TimestampsToReturn))
        return results

    def _revise_sampling(self, requested: float) -> float:
        """Revised sampling interval in ms (Part 4 5.12.1.2): negative means the publishing
        interval; 0 stays 0 (every change is a sample: values arrive as events)."""
        if requested < 0 or not math.isfinite(requested):
            return float(self.isub.data.RevisedPublishingInterval)
        return min(float(requested), MAX_SAMPLING_MS)

    def _revise_queue(self, requested: int) -> int:
        # Part 4 5.13.1.5: a queue of 0 or 1 is a one-value buffer that always holds the newest
        return 1 if requested <= 1 else min(int(requested), self._limits.max_queue_size)

    def _check_filter(self, node_id: ua.NodeId, attr: int, flt: Any) -> tuple[int, float]:
        """(status, absolute deadband) for a requested filter (Part 4 7.22.2, Part 8 7.2)."""
        if _no_filter(flt):
            return 0, 0.0
        if not isinstance(flt, DataChangeFilter):
            return ua.StatusCodes.BadMonitoredItemFilterUnsupported, 0.0
        if attr != _VALUE:
            return ua.StatusCodes.BadFilterNotAllowed, 0.0
        kind = flt.DeadbandType
        value = float(flt.DeadbandValue or 0.0)
        if kind == ua.DeadbandType.None_:
            return 0, 0.0
        if kind not in (ua.DeadbandType.Absolute, ua.DeadbandType.Percent) or \
                not math.isfinite(value) or value < 0:
            return ua.StatusCodes.BadDeadbandFilterInvalid, 0.0
        dtype = self.aspace.read_attribute_value(node_id, ua.AttributeIds.DataType)
        dt_id = dtype.Value.Value if dtype.Value is not None else None
        if not ((isinstance(dt_id, ua.NodeId) and dt_id.NamespaceIndex == 0 and
                isinstance(dt_id.Identifier, int) and 2 <= dt_id.Identifier <= 11) or
                dt_id in (ua.NodeId(26), ua.NodeId(27), ua.NodeId(28))):  # Number, Integer, UInt
            return ua.StatusCodes.BadDeadbandFilterInvalid, 0.0
        if kind == ua.DeadbandType.Absolute:
            return 0, value
        rng = eu_range(self.aspace, node_id)
        if rng is None or value > 100.0:
            return ua.StatusCodes.BadDeadbandFilterInvalid, 0.0
        return 0, value / 100.0 * (rng[1] - rng[0])

    def _create_item(self, req: ua.MonitoredItemCreateRequest,
                     timestamps: ua.TimestampsToReturn) -> ua.MonitoredItemCreateResult:
        result = ua.MonitoredItemCreateResult()
        node_id = req.ItemToMonitor.NodeId
        attr = req.ItemToMonitor.AttributeId
        rp = req.RequestedParameters
        if self._limits.count >= self._limits.max_items:
            result.StatusCode = status(ua.StatusCodes.BadTooManyMonitoredItems)
            return result
        if node_id not in self.aspace:
            result.StatusCode = status(ua.StatusCodes.BadNodeIdUnknown)
            return result
        if attr not in self.aspace[node_id].attributes:
            result.StatusCode = status(ua.StatusCodes.BadAttributeIdInvalid)
            return result
        if req.ItemToMonitor.IndexRange:
            result.StatusCode = status(ua.StatusCodes.BadIndexRangeInvalid)
            return result
        code, limit = self._check_filter(node_id, attr, rp.Filter)
        if code:
            result.StatusCode = status(code)
            return result
        sc, handle = self.aspace.add_datachange_callback(node_id, attr, self.hook)
        if not sc.is_good():
            result.StatusCode = sc
            return result
        self._monitored_item_counter += 1
        item = Item()
        item.mid = self._monitored_item_counter
        item.handle = handle
        item.client_handle = rp.ClientHandle
        item.node_id = node_id
        item.attr = attr
        item.mode = ua.MonitoringMode(req.MonitoringMode)  # enums compared by identity later
        item.queue_size = self._revise_queue(rp.QueueSize)
        item.discard_oldest = bool(rp.DiscardOldest)
        item.filter = rp.Filter
        if isinstance(rp.Filter, DataChangeFilter):
            item.trigger = ua.DataChangeTrigger(rp.Filter.Trigger)
        item.deadband = limit
        item.timestamps = ua.TimestampsToReturn(timestamps)
        revised = self._revise_sampling(rp.SamplingInterval)
        item.sampling = revised / 1000.0
        self._items[item.mid] = item
        self._by_handle[handle] = item
        self._limits.count += 1
        result.MonitoredItemId = item.mid
        result.RevisedQueueSize = item.queue_size
        result.RevisedSamplingInterval = revised
        result.FilterResult = None
        if item.mode != ua.MonitoringMode.Disabled:
            # Part 4 5.13.1.2: the first sample is reported right after creation
            self.on_change(handle, self.aspace.read_attribute_value(node_id, attr))
        return result

    def _modify_monitored_item(self, params: ua.MonitoredItemModifyRequest
                               ) -> ua.MonitoredItemModifyResult:
        result = ua.MonitoredItemModifyResult()
        item = self._items.get(params.MonitoredItemId)
        if item is None:
            return super()._modify_monitored_item(params)
        rp = params.RequestedParameters
        code, limit = self._check_filter(item.node_id, item.attr, rp.Filter)
        if code:
            result.StatusCode = status(code)
            return result
        item.client_handle = rp.ClientHandle
        item.queue_size = self._revise_queue(rp.QueueSize)
        item.discard_oldest = bool(rp.DiscardOldest)
        item.filter = rp.Filter
        item.trigger = (ua.DataChangeTrigger(rp.Filter.Trigger)
                        if isinstance(rp.Filter, DataChangeFilter)
                        else ua.DataChangeTrigger.StatusValue)
        item.deadband = limit
        queue = self.isub.datachanges.get(item.mid)
        if queue and len(queue) > item.queue_size:
            del queue[: len(queue) - item.queue_size]
        result.RevisedQueueSize = item.queue_size
        revised = self._revise_sampling(rp.SamplingInterval)
        if revised / 1000.0 != item.sampling:
            item.sampling = revised / 1000.0
            self._flush_sample(item)  # a waiting sample goes out now, under the new interval
        result.RevisedSamplingInterval = revised
        return result

    async def set_monitoring_mode(self, mode: ua.MonitoringMode, ids: list[int]
                                  ) -> list[ua.StatusCode]:
        results = []
        for mid in ids:
            item = self._items.get(mid)
            if item is None:
                results.extend(await super().set_monitoring_mode(mode, [mid]))
                continue
            previous, item.mode = item.mode, ua.MonitoringMode(mode)
            if item.mode is _DISABLED:
                self._cancel_sample(item)
            if mode == ua.MonitoringMode.Reporting and previous == ua.MonitoringMode.Sampling:
                for dv in item.sampled:  # Part 4 5.13.1.3: queued samples are now reported
                    self._queue(item, dv)
            item.sampled = []
            if previous == ua.MonitoringMode.Disabled and mode != ua.MonitoringMode.Disabled:
                item.last = None
                self.on_change(item.handle, self.aspace.read_attribute_value(item.node_id,
                                                                             item.attr))
            results.append(status(0))
        return results

    def _delete_monitored_items(self, mid: int) -> ua.StatusCode:
        item = self._items.pop(mid, None)
        if item is None:
            return super()._delete_monitored_items(mid)
        self._by_handle.pop(item.handle, None)
        self._cancel_sample(item)
        self.aspace.delete_datachange_callback(item.handle)
        self.isub.datachanges.pop(mid, None)
        self._limits.count -= 1
        return status(0)

    def data_items(self) -> list[Item]:
        return list(self._items.values())

    def event_items(self) -> list[tuple[int, Any]]:
        """(id, asyncua's item) of the event items (asyncua's code runs those)."""
        return list(self._monitored_items.items())

    def delete_all_monitored_items(self) -> None:
        self.delete_monitored_items(list(self._items) + list(self._monitored_items))

    def resend_initial_values(self) -> None:
        """Queue the current value of every reporting item (TransferSubscriptions with
        SendInitialValues, Part 4 5.13.7.2)."""
        for item in list(self._items.values()):
            if item.mode is ua.MonitoringMode.Reporting:
                item.last = None
                self._report(item, self.aspace.read_attribute_value(item.node_id, item.attr))

    # -- data changes --------------------------------------------------------------------
    async def datachange_callback(self, handle: int, value: ua.DataValue,
                                  error: ua.StatusCode | None = None) -> None:
        await self.hook(handle, value, error)

    def on_change(self, handle: int, dv: ua.DataValue) -> None:
        """A new value of a monitored node: sample, filter and queue it (no copy, no await)."""
        item = self._by_handle.get(handle)
        if item is None or item.mode is _DISABLED:
            return
        if item.sampling:
            self._sample(item, dv)
            return
        self._report(item, dv)

    def _report(self, item: Item, dv: ua.DataValue) -> None:
        """A sample: through the filter into the queue (or the Sampling mode buffer)."""
        if not passes(item, dv):
            return
        item.last = dv
        if item.mode is _SAMPLING:
            item.sampled.append(dv)
            if len(item.sampled) > item.queue_size:
                del item.sampled[0]
            return
        self._queue(item, dv)

    # -- sampling interval (Part 4 5.12.1.2) ----------------------------------------------
    def _sample(self, item: Item, dv: ua.DataValue) -> None:
        """At most one sample per interval: a change after a quiet interval is sampled at
        once, later ones wait and only the newest is sampled when the interval ends."""
        if item.timer is not None:
            item.pending = dv  # newest wins
            return
        clock = self.clock or self._find_clock()
        now = clock.seconds()
        if now >= item.next_due:
            item.next_due = now + item.sampling
            self._report(item, dv)
        else:
            item.pending = dv
            item.timer = clock.callLater(item.next_due - now, self._sample_due, item)

    def _sample_due(self, item: Item) -> None:
        item.timer = None
        dv, item.pending = item.pending, None
        if dv is None or self._items.get(item.mid) is not item or item.mode is _DISABLED:
            return
        item.next_due = (self.clock or self._find_clock()).seconds() + item.sampling
        self._report(item, dv)

    def _flush_sample(self, item: Item) -> None:
        """The waiting sample goes out now; the next change is sampled at once."""
        pending = item.pending
        self._cancel_sample(item)
        item.next_due = 0.0
        if pending is not None:
            self._report(item, pending)

    @staticmethod
    def _cancel_sample(item: Item) -> None:
        if item.timer is not None:
            item.timer.cancel()
            item.timer = None
        item.pending = None

    def _find_clock(self) -> Any:
        self.clock = LoopClock(asyncio.get_event_loop())
        return self.clock

    def _queue(self, item: Item, dv: ua.DataValue) -> None:
        """Queue per Part 4 5.13.1.5 (size, discard policy, Overflow bit)."""
        if item.timestamps is not _BOTH:
            dv = _strip_timestamps(dv, item.timestamps)
        note = _new(_Notification)  # the dataclass __init__ costs 3x as much
        note.ClientHandle = item.client_handle
        note.Value = dv
        pending = self.isub.datachanges
        queue = pending.get(item.mid)
        if queue is None:
            pending[item.mid] = [note]
        elif item.queue_size == 1:
            queue[0] = note  # newest wins, never an Overflow bit
        elif len(queue) < item.queue_size:
            queue.append(note)
        elif item.discard_oldest:
            del queue[0]
            queue[0] = _with_overflow(queue[0])
            queue.append(note)
        else:
            queue[-1] = _with_overflow(note)

