"""Fast binary encoding of PublishResponses (OPC UA Part 6 5.2), shared between clients.

asyncua encodes every message through a generic, reflective dataclass serializer: about 4 us per
data-change notification, as much as everything else the server does per change together, and
paid again for every subscribed client. Here:

* :class:`IotDataValue` is a DataValue that remembers its own encoding, so a value published to
  several monitored items or clients is encoded once;
* scalars of the built-in numeric types, booleans and strings are packed with one precompiled
  ``struct`` call; anything else (arrays, other types, picoseconds) falls back to asyncua;
* :func:`encode_publish_response` writes the PublishResponse around them and falls back to
  asyncua for any part it does not know.

Round trips through asyncua's decoder are tested (tests/test_opcua_fastenc.py).
"""

from __future__ import annotations

import struct
from typing import Any

from asyncua import ua
from asyncua.ua import uaprotocol_auto
from asyncua.ua.ua_binary import (
    Primitives,
    extensionobject_to_binary,
    nodeid_to_binary,
    struct_to_binary,
    variant_to_binary,
)

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_I64 = struct.Struct("<q")
EPOCH_TICKS = 116_444_736_000_000_000  # 100 ns ticks from 1601-01-01 to 1970-01-01 (Part 6 5.2.2.5)

# VariantType -> one struct packing "encoding byte + value" (Part 6 5.2.2.16)
_SCALAR = {
    ua.VariantType.Boolean: struct.Struct("<B?"),
    ua.VariantType.Int16: struct.Struct("<Bh"),
    ua.VariantType.UInt16: struct.Struct("<BH"),
    ua.VariantType.Int32: struct.Struct("<Bi"),
    ua.VariantType.UInt32: struct.Struct("<BI"),
    ua.VariantType.Int64: struct.Struct("<Bq"),
    ua.VariantType.UInt64: struct.Struct("<BQ"),
    ua.VariantType.Float: struct.Struct("<Bf"),
    ua.VariantType.Double: struct.Struct("<Bd"),
}
_SCALAR_CODES = {vt: vt.value for vt in _SCALAR}
_STRING = ua.VariantType.String
_NULL = ua.VariantType.Null
_OIDS = ua.ObjectIds
_DCN_TYPE = nodeid_to_binary(ua.FourByteNodeId(_OIDS.DataChangeNotification_Encoding_DefaultBinary))
_PUBLISH_TYPE = nodeid_to_binary(ua.FourByteNodeId(_OIDS.PublishResponse_Encoding_DefaultBinary))
_EMPTY_ARRAY = _I32.pack(0)


class IotDataValue(ua.DataValue):  # type: ignore[misc]  # asyncua is untyped
    """A DataValue that carries its timestamps as integer ns and caches its binary encoding."""

    __slots__ = ("_bin", "_src_ns", "_srv_ns")


def _ticks(ns: int) -> bytes:
    # microsecond resolution, as the datetime attributes of the same DataValue
    return _I64.pack((ns // 1000) * 10 + EPOCH_TICKS)


def _variant(v: ua.Variant) -> bytes:
    vt = v.VariantType
    if not v.is_array:
        packer = _SCALAR.get(vt)
        if packer is not None and v.Value is not None:
            return packer.pack(_SCALAR_CODES[vt], v.Value)
        if vt is _STRING:
            if v.Value is None:
                return b"\x0c\xff\xff\xff\xff"
            raw: bytes = v.Value.encode("utf-8")
            return b"\x0c" + _I32.pack(len(raw)) + raw
    return bytes(variant_to_binary(v))


def encode_datavalue(dv: ua.DataValue) -> bytes:
    """Part 6 5.2.2.17; Good status and null values are left out (decoders assume them)."""
    cached = getattr(dv, "_bin", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    if dv.SourcePicoseconds is not None or dv.ServerPicoseconds is not None:
        out = bytes(struct_to_binary(dv))  # keep asyncua's field order for picoseconds
    else:
        mask = 0
        parts = [b""]
        v = dv.Value
        if v is not None and v.VariantType is not _NULL:
            mask |= 0x01
            parts.append(_variant(v))
        sc = dv.StatusCode
        if sc is not None and sc.value:
            mask |= 0x02
            parts.append(_U32.pack(sc.value))
        own = type(dv) is IotDataValue
        if dv.SourceTimestamp is not None:
            mask |= 0x04
            parts.append(_ticks(dv._src_ns) if own else
                         Primitives.DateTime.pack(dv.SourceTimestamp))
        if dv.ServerTimestamp is not None:
            mask |= 0x08
            parts.append(_ticks(dv._srv_ns) if own else
                         Primitives.DateTime.pack(dv.ServerTimestamp))
        parts[0] = bytes((mask,))
        out = b"".join(parts)
    if type(dv) is IotDataValue:
        dv._bin = out
    return out


def encode_notifications(items: list[ua.MonitoredItemNotification]) -> bytes:
    """The body of a DataChangeNotification: MonitoredItems[] then empty DiagnosticInfos[]."""
    pack = _U32.pack
    parts = [_I32.pack(len(items))]
    parts += [pack(n.ClientHandle) + encode_datavalue(n.Value) for n in items]
    parts.append(_EMPTY_ARRAY)
    return b"".join(parts)


def _u32_array(values: list[Any] | None, code: bool = False) -> bytes:
    if values is None:
        return _I32.pack(-1)
    pack = _U32.pack
    return _I32.pack(len(values)) + b"".join(pack(v.value if code else v) for v in values)


def encode_publish_response(response: ua.PublishResponse) -> bytes:
    """The whole PublishResponse; identical to asyncua's after decoding (see module docstring)."""
    p = response.Parameters
    msg = p.NotificationMessage
    if p.DiagnosticInfos or any(isinstance(n, uaprotocol_auto.DataChangeNotification) and
                                n.DiagnosticInfos for n in msg.NotificationData or []):
        return bytes(struct_to_binary(response))
    parts = [
        _PUBLISH_TYPE,
        struct_to_binary(response.ResponseHeader),
        _U32.pack(p.SubscriptionId),
        _u32_array(p.AvailableSequenceNumbers),
        b"\x01" if p.MoreNotifications else b"\x00",
        _U32.pack(msg.SequenceNumber),
        Primitives.DateTime.pack(msg.PublishTime),
        _I32.pack(len(msg.NotificationData)),
    ]
    for notif in msg.NotificationData:
        if isinstance(notif, uaprotocol_auto.DataChangeNotification):
            body = encode_notifications(notif.MonitoredItems)
            parts += [_DCN_TYPE, b"\x01", _I32.pack(len(body)), body]
        else:
            parts.append(extensionobject_to_binary(notif))
    parts.append(_u32_array(p.Results, code=True))
    parts.append(_EMPTY_ARRAY if p.DiagnosticInfos is not None else _I32.pack(-1))
    return b"".join(parts)
