"""The fast PublishResponse encoder decodes, with asyncua's decoder, to what asyncua encodes."""

from __future__ import annotations

import datetime as dt

import pytest
from asyncua import ua
from asyncua.common.utils import Buffer
from asyncua.ua.ua_binary import struct_from_binary, struct_to_binary

from iotserver.opcua import fastenc
from iotserver.opcua.convert import TimeCache, make_datavalue
from iotserver.opcua.fastenc import IotDataValue, encode_datavalue, encode_publish_response
from iotserver.tags.model import DataType, Quality, TagDef

NOW = dt.datetime(2026, 5, 4, 3, 2, 1, 123456, tzinfo=dt.UTC)
NS = int(NOW.timestamp()) * 1_000_000_000 + 123_456_000

VALUES = [
    (DataType.BOOLEAN, True), (DataType.INT16, -5), (DataType.UINT16, 65535),
    (DataType.INT32, -(2**31)), (DataType.UINT32, 2**32 - 1), (DataType.INT64, -(2**63)),
    (DataType.UINT64, 2**64 - 1), (DataType.FLOAT32, 1.5), (DataType.FLOAT64, -2.25e300),
    (DataType.STRING, "Grüße"), (DataType.STRING, ""),
]


def _response(items: list[ua.MonitoredItemNotification]) -> ua.PublishResponse:
    r = ua.PublishResponse()
    r.ResponseHeader.RequestHandle = 7
    p = r.Parameters
    p.SubscriptionId = 78
    p.AvailableSequenceNumbers = [3, 4]
    p.MoreNotifications = True
    p.NotificationMessage.SequenceNumber = 4
    p.NotificationMessage.PublishTime = NOW
    notif = ua.DataChangeNotification()
    notif.MonitoredItems = items
    status = ua.StatusChangeNotification(Status=ua.StatusCode(ua.StatusCodes.BadTimeout))
    p.NotificationMessage.NotificationData = [notif, status]
    p.Results = [ua.StatusCode(0), ua.StatusCode(ua.StatusCodes.BadSequenceNumberUnknown)]
    return r


def _decode(data: bytes) -> ua.PublishResponse:
    return struct_from_binary(ua.PublishResponse, Buffer(data))


@pytest.mark.parametrize("quality", [Quality.GOOD, Quality.UNCERTAIN_LAST_USABLE_VALUE,
                                     Quality.BAD_NOT_CONNECTED])
def test_round_trip_matches_asyncua(quality: Quality) -> None:
    times = TimeCache()
    items = []
    for k, (dtype, value) in enumerate(VALUES):
        tag = TagDef(f"T{k}", dtype)
        from iotserver.opcua.convert import VARIANT_TYPES

        dv = make_datavalue(tag, VARIANT_TYPES[dtype], value, int(quality), NS, NS + 1000, times)
        assert isinstance(dv, IotDataValue)
        items.append(ua.MonitoredItemNotification(k, dv))
    items.append(ua.MonitoredItemNotification(99, ua.DataValue(
        ua.Variant([1.0, 2.0], ua.VariantType.Double), ua.StatusCode(0), NOW, None)))
    items.append(ua.MonitoredItemNotification(98, ua.DataValue(
        ua.Variant(ua.LocalizedText("x")), SourceTimestamp=NOW, SourcePicoseconds=5)))
    response = _response(items)
    ours = _decode(encode_publish_response(response))
    theirs = _decode(struct_to_binary(response))
    assert ours == theirs
    got = ours.Parameters.NotificationMessage.NotificationData[0].MonitoredItems
    assert [n.Value.SourceTimestamp for n in got[:3]] == [NOW.replace(microsecond=123456)] * 3


def test_encoding_is_cached_per_value_and_takes_the_fast_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each value is packed once by the fast path, never by asyncua's generic serializer, and a
    second client's response reuses every cached encoding (the mechanism, not a timing)."""
    times = TimeCache()
    tag = TagDef("T", DataType.FLOAT64)
    dvs = [make_datavalue(tag, ua.VariantType.Double, float(i), 0, NS + i * 1000, NS, times)
           for i in range(2000)]
    items = [ua.MonitoredItemNotification(i, dv) for i, dv in enumerate(dvs)]
    response = _response(items)
    packed: list[ua.Variant] = []
    generic: list[object] = []
    real_variant, real_struct = fastenc._variant, fastenc.struct_to_binary

    def count_variant(v: ua.Variant) -> bytes:
        packed.append(v)
        return real_variant(v)

    def count_struct(obj: object) -> bytes:
        generic.append(obj)
        return real_struct(obj)  # type: ignore[no-any-return]

    monkeypatch.setattr(fastenc, "_variant", count_variant)
    monkeypatch.setattr(fastenc, "struct_to_binary", count_struct)
    first = encode_publish_response(response)
    assert len(packed) == len(dvs)  # one encode per value
    assert not any(isinstance(o, ua.DataValue) for o in generic)  # no generic DataValue encode
    packed.clear()
    generic.clear()
    again = encode_publish_response(response)  # a second client: cached values
    assert packed == []  # every value came from its cache
    assert not any(isinstance(o, ua.DataValue) for o in generic)
    assert first == again
    assert encode_datavalue(dvs[0]) is encode_datavalue(dvs[0])
    monkeypatch.undo()
    assert _decode(first) == _decode(struct_to_binary(response))
