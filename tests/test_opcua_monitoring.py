"""Monitored item semantics without a network: filters, queues, address space building."""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import pytest
from asyncua import ua
from twisted.internet.task import Clock
from asyncua.server.address_space import AddressSpace, AttributeValue, NodeData

from iotserver.opcua.addrspace import OBJECTS, TagSpace
from iotserver.opcua.monitoring import IotMonitoredItemService, Limits
from iotserver.tags.model import DataType, Quality, TagDef, TagValue
import contextlib


def bare_space() -> TagSpace:
    aspace = AddressSpace()
    objects = NodeData(OBJECTS)
    objects.attributes[ua.AttributeIds.NodeClass] = AttributeValue(
        ua.DataValue(ua.Variant(ua.NodeClass.Object, ua.VariantType.Int32)))
    objects.attributes[ua.AttributeIds.BrowseName] = AttributeValue(
        ua.DataValue(ua.Variant(ua.QualifiedName("Objects", 0))))
    objects.attributes[ua.AttributeIds.DisplayName] = AttributeValue(
        ua.DataValue(ua.Variant(ua.LocalizedText("Objects"))))
    aspace[OBJECTS] = objects
    return TagSpace(aspace, 2)


def tv(value: Any, quality: Quality = Quality.GOOD) -> TagValue:
    return TagValue(value, quality, 1, 1)


def _build_counting_calls(space: TagSpace, n: int) -> int:
    """Build ``n`` variables in one folder; return how many Python calls that made."""
    tags = [(TagDef(f"Big/T{i:05d}", DataType.FLOAT32, unit="bar", low=0, high=10), tv(1.0))
            for i in range(n)]
    calls = 0

    def count(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(count)
    try:
        assert space.build(tags) == n
    finally:
        sys.setprofile(None)
    return calls


def test_ten_thousand_variables_in_one_folder_build_linearly() -> None:
    """The work per variable does not grow with the folder (asyncua's own AddNodes scans
    the parent's references on every insert): ten times the variables, at most ten times the
    calls (counted, not timed)."""
    small = _build_counting_calls(bare_space(), 1_000)
    space = bare_space()
    calls = _build_counting_calls(space, 10_000)
    assert calls <= 10 * small + 100, (small, calls)
    folder = space.aspace[space.node_id("Big")]
    children = [r for r in folder.references if r.IsForward and
                r.ReferenceTypeId == ua.NodeId(ua.ObjectIds.Organizes)]
    assert len(children) == 10_000
    assert ua.NodeId("Big/T09999#EURange", 2) in space.aspace
    for i in range(0, 10_000, 2):
        space.remove(f"Big/T{i:05d}")
    folder = space.aspace[space.node_id("Big")]
    assert len([r for r in folder.references if r.IsForward]) == 5_000 + 1  # + type definition


def test_tag_path_that_is_also_a_folder_and_nested_channels() -> None:
    space = bare_space()
    space.build([(TagDef("A/B", DataType.INT32), tv(1)),
                 (TagDef("A/B/C", DataType.INT32), tv(2)),
                 (TagDef("Sig/Ch/RMS", DataType.FLOAT64), tv(0.5))], channels=["Sig/Ch"])
    # A/B is a variable; A/B/C hangs below it with HasComponent
    refs = space.aspace[space.node_id("A/B")].references
    assert any(r.NodeId == ua.NodeId("A/B/C", 2) and
               r.ReferenceTypeId == ua.NodeId(ua.ObjectIds.HasComponent) for r in refs)
    assert space.channel_of(ua.NodeId("Sig/Ch", 2)) == "Sig/Ch"
    assert "Sig/Ch" not in space.folders


class FakeSub:
    def __init__(self) -> None:
        self.data = SimpleNamespace(SubscriptionId=1, RevisedPublishingInterval=100.0)
        self.datachanges: dict[int, list[Any]] = {}


def service_with_item(queue_size: int = 1, discard_oldest: bool = True,
                      flt: Any = None, low: float | None = 0, high: float | None = 200,
                      sampling_ms: float = 0.0, clock: Clock | None = None
                      ) -> tuple[IotMonitoredItemService, FakeSub, int]:
    space = bare_space()
    space.build([(TagDef("X", DataType.FLOAT64, low=low, high=high), tv(0.0))])
    sub = FakeSub()
    svc = IotMonitoredItemService(sub, space.aspace, Limits(100),  # type: ignore[arg-type]
                                  clock or Clock())
    req = ua.MonitoredItemCreateRequest()
    req.ItemToMonitor.NodeId = ua.NodeId("X", 2)
    req.ItemToMonitor.AttributeId = ua.AttributeIds.Value
    req.MonitoringMode = ua.MonitoringMode.Reporting
    req.RequestedParameters.QueueSize = queue_size
    req.RequestedParameters.DiscardOldest = discard_oldest
    req.RequestedParameters.SamplingInterval = sampling_ms
    if flt is not None:
        req.RequestedParameters.Filter = flt
    res = svc._create_item(req, ua.TimestampsToReturn.Both)
    res.StatusCode.check()
    assert queued(sub) == [(0.0, 0)]  # the first sample right after creation (5.13.1.2)
    sub.datachanges.clear()
    svc.created = res  # type: ignore[attr-defined]  # for the tests of revised values
    return svc, sub, next(iter(svc._by_handle))


def push(svc: IotMonitoredItemService, handle: int, value: float, code: int = 0) -> None:
    svc.on_change(handle, ua.DataValue(ua.Variant(value, ua.VariantType.Double),
                                       ua.StatusCode(code)))


def queued(sub: FakeSub) -> list[tuple[float, int]]:
    return [(n.Value.Value.Value, n.Value.StatusCode.value)
            for q in sub.datachanges.values() for n in q]


def test_absolute_deadband_against_last_reported_value() -> None:
    flt = ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.StatusValue,
                              DeadbandType=ua.DeadbandType.Absolute, DeadbandValue=1.0)
    svc, sub, h = service_with_item(queue_size=50, flt=flt)
    for k in range(1, 11):
        push(svc, h, 0.4 * k)  # 0.4, 0.8 ... 4.0: previous-sample deltas are all 0.4
    assert [v for v, _ in queued(sub)] == pytest.approx([1.2, 2.4, 3.6])


def test_percent_deadband_uses_eurange_and_needs_one() -> None:
    flt = ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.StatusValue,
                              DeadbandType=ua.DeadbandType.Percent, DeadbandValue=2.0)
    svc, sub, h = service_with_item(queue_size=50, flt=flt)  # 2 % of 200 = 4
    for v in (3.0, 4.5, 8.0, 9.0):
        push(svc, h, v)
    assert [v for v, _ in queued(sub)] == [4.5, 9.0]
    with pytest.raises(ua.uaerrors.BadDeadbandFilterInvalid):
        service_with_item(flt=flt, low=None, high=None)
    too_much = ua.DataChangeFilter(DeadbandType=ua.DeadbandType.Percent, DeadbandValue=101.0)
    with pytest.raises(ua.uaerrors.BadDeadbandFilterInvalid):
        service_with_item(flt=too_much)


def test_queue_one_keeps_newest_without_overflow_bit() -> None:
    svc, sub, h = service_with_item(queue_size=0)
    for v in (1.0, 2.0, 3.0):
        push(svc, h, v)
    assert queued(sub) == [(3.0, 0)]


def test_discard_oldest_and_newest_set_overflow_bit() -> None:
    svc, sub, h = service_with_item(queue_size=3, discard_oldest=True)
    for v in (1.0, 2.0, 3.0, 4.0, 5.0):
        push(svc, h, v)
    assert queued(sub) == [(3.0, 0x0480), (4.0, 0), (5.0, 0)]
    svc, sub, h = service_with_item(queue_size=3, discard_oldest=False)
    for v in (1.0, 2.0, 3.0, 4.0, 5.0):
        push(svc, h, v)
    assert queued(sub) == [(1.0, 0), (2.0, 0), (5.0, 0x0480)]


def test_status_trigger_and_status_changes_beat_deadband() -> None:
    status_only = ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.Status)
    svc, sub, h = service_with_item(queue_size=10, flt=status_only)
    push(svc, h, 1.0)
    push(svc, h, 2.0, ua.StatusCodes.UncertainLastUsableValue)
    assert [c for _, c in queued(sub)] == [ua.StatusCodes.UncertainLastUsableValue]
    flt = ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.StatusValue,
                              DeadbandType=ua.DeadbandType.Absolute, DeadbandValue=100.0)
    svc, sub, h = service_with_item(queue_size=10, flt=flt)
    push(svc, h, 0.5, ua.StatusCodes.BadNotConnected)
    assert len(queued(sub)) == 1


def test_sampling_mode_reports_on_switch_to_reporting() -> None:
    svc, sub, h = service_with_item(queue_size=5)
    mid = next(iter(svc._items))
    svc._items[mid].mode = ua.MonitoringMode.Sampling
    push(svc, h, 1.0)
    push(svc, h, 2.0)
    assert queued(sub) == []
    coro = svc.set_monitoring_mode(ua.MonitoringMode.Reporting, [mid])
    with contextlib.suppress(StopIteration):
        coro.send(None)
    assert [v for v, _ in queued(sub)] == [1.0, 2.0]  # the coroutine never had to wait


# -- sampling interval (Part 4 5.12.1.2) ------------------------------------------------


def at(clock: Clock, when: float) -> None:
    """Move the clock to ``when`` (running what falls due on the way)."""
    clock.advance(when - clock.seconds())


def aio_run(coro: Any) -> None:
    """Run a coroutine that never waits (the monitored item service's)."""
    with contextlib.suppress(StopIteration):
        coro.send(None)


def sampled_item(interval_ms: float, queue_size: int = 10
                 ) -> tuple[IotMonitoredItemService, FakeSub, int, Clock, Any]:
    clock = Clock()
    svc, sub, h = service_with_item(queue_size, sampling_ms=interval_ms, clock=clock)
    return svc, sub, h, clock, svc.created  # type: ignore[attr-defined]


def test_sampling_interval_reports_the_newest_value_once_per_interval() -> None:
    svc, sub, h, clock, res = sampled_item(500)
    assert res.RevisedSamplingInterval == 500
    at(clock, 0.1)
    push(svc, h, 1.0)
    at(clock, 0.2)
    push(svc, h, 2.0)
    assert queued(sub) == []  # within the interval of the first sample
    at(clock, 0.5)
    assert queued(sub) == [(2.0, 0)]  # the newest value, at the end of the interval
    at(clock, 0.7)
    push(svc, h, 3.0)
    at(clock, 1.0)
    assert queued(sub) == [(2.0, 0), (3.0, 0)]
    at(clock, 5.0)
    push(svc, h, 4.0)  # after a quiet interval: sampled at once
    assert queued(sub) == [(2.0, 0), (3.0, 0), (4.0, 0)]
    assert clock.getDelayedCalls() == []


def test_sampling_zero_reports_every_change_and_minus_one_uses_publishing_interval() -> None:
    svc, sub, h, clock, res = sampled_item(0)
    assert res.RevisedSamplingInterval == 0
    for v in (1.0, 2.0, 3.0):
        push(svc, h, v)
    assert [v for v, _ in queued(sub)] == [1.0, 2.0, 3.0] and clock.getDelayedCalls() == []
    _svc, _sub, _h, _clock, res = sampled_item(-1)
    assert res.RevisedSamplingInterval == 100.0  # FakeSub's publishing interval
    _svc, _sub, _h, _clock, res = sampled_item(1e12)
    assert res.RevisedSamplingInterval == 3_600_000.0


def test_deleting_or_disabling_a_sampled_item_drops_its_waiting_sample() -> None:
    svc, sub, h, clock, _ = sampled_item(500)
    at(clock, 0.1)
    push(svc, h, 1.0)
    mid = next(iter(svc._items))
    aio_run(svc.set_monitoring_mode(ua.MonitoringMode.Disabled, [mid]))
    at(clock, 1.0)
    assert queued(sub) == []
    svc2, sub2, h2, clock2, _ = sampled_item(500)
    at(clock2, 0.1)
    push(svc2, h2, 1.0)
    svc2._delete_monitored_items(next(iter(svc2._items)))
    at(clock2, 1.0)
    assert queued(sub2) == []


def test_modifying_the_interval_sends_the_waiting_sample() -> None:
    svc, sub, h, clock, _ = sampled_item(500)
    at(clock, 0.1)
    push(svc, h, 1.0)
    req = ua.MonitoredItemModifyRequest()
    req.MonitoredItemId = next(iter(svc._items))
    req.RequestedParameters.QueueSize = 10
    req.RequestedParameters.SamplingInterval = 0
    res = svc._modify_monitored_item(req)
    assert res.RevisedSamplingInterval == 0 and queued(sub) == [(1.0, 0)]
    push(svc, h, 2.0)
    assert queued(sub) == [(1.0, 0), (2.0, 0)]
    assert clock.getDelayedCalls() == []  # the old timer was cancelled
