from __future__ import annotations

import numpy as np
import pytest

from iotserver.tags.model import (
    Access,
    CoerceError,
    DataType,
    DeadbandKind,
    Quality,
    Scaling,
    TagDef,
    coerce,
)


def tag(dt: DataType, **kw: object) -> TagDef:
    return TagDef(path="A/B", data_type=dt, access=Access.READ_WRITE, **kw)  # type: ignore[arg-type]


def test_quality_classes_follow_opcua_top_bits() -> None:
    assert Quality.GOOD.is_good and not Quality.GOOD.is_bad
    assert Quality.UNCERTAIN_LAST_USABLE_VALUE.is_uncertain
    assert Quality.BAD_NOT_CONNECTED.is_bad and Quality.BAD_NOT_CONNECTED.value == 0x808A0000
    assert Quality.BAD_COMMUNICATION_ERROR.text == "BadCommunicationError"
    assert Quality.BAD_WAITING_FOR_INITIAL_DATA.severity == "Bad"


@pytest.mark.parametrize(
    ("dt", "value", "expected"),
    [
        (DataType.INT16, 5.0, 5),
        (DataType.UINT16, 65535, 65535),
        (DataType.FLOAT32, 3, 3.0),
        (DataType.BOOLEAN, 1, True),
        (DataType.STRING, "x", "x"),
    ],
)
def test_coerce_accepts(dt: DataType, value: object, expected: object) -> None:
    out = coerce(tag(dt), value)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize(
    ("dt", "value", "quality"),
    [
        (DataType.INT16, 40000, Quality.BAD_OUT_OF_RANGE),
        (DataType.UINT16, -1, Quality.BAD_OUT_OF_RANGE),
        (DataType.INT32, 1.5, Quality.BAD_TYPE_MISMATCH),
        (DataType.FLOAT64, "1.0", Quality.BAD_TYPE_MISMATCH),
        (DataType.FLOAT32, 1e39, Quality.BAD_OUT_OF_RANGE),
        (DataType.BOOLEAN, 2, Quality.BAD_TYPE_MISMATCH),
        (DataType.STRING, 3, Quality.BAD_TYPE_MISMATCH),
        (DataType.INT16, True, Quality.BAD_TYPE_MISMATCH),
    ],
)
def test_coerce_refuses(dt: DataType, value: object, quality: Quality) -> None:
    with pytest.raises(CoerceError) as info:
        coerce(tag(dt), value)
    assert info.value.quality is quality


def test_coerce_enforces_configured_range() -> None:
    t = tag(DataType.FLOAT64, low=0.0, high=100.0)
    assert coerce(t, 100) == 100.0
    with pytest.raises(CoerceError) as info:
        coerce(t, 100.5)
    assert info.value.quality is Quality.BAD_OUT_OF_RANGE


def test_nan_and_inf_refused_for_ranged_tags() -> None:
    t = tag(DataType.FLOAT64, low=0.0, high=100.0)
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(CoerceError) as info:
            coerce(t, bad)
        assert info.value.quality is Quality.BAD_OUT_OF_RANGE
    assert coerce(tag(DataType.FLOAT64), float("inf")) == float("inf")  # no range: allowed


def test_coerce_array_checks_shape_and_dtype() -> None:
    t = tag(DataType.INT16, shape=(3,))
    out = coerce(t, [1, 2, 3])
    assert out.dtype == np.int16 and list(out) == [1, 2, 3] and not out.flags.writeable
    with pytest.raises(CoerceError):
        coerce(t, [1, 2])
    with pytest.raises(CoerceError):
        coerce(t, [1.5, 2, 3])
    with pytest.raises(CoerceError) as info:
        coerce(t, [1, 2, 99999])
    assert info.value.quality is Quality.BAD_OUT_OF_RANGE


def test_deadband_absolute_and_percent() -> None:
    a = tag(DataType.FLOAT64, deadband_kind=DeadbandKind.ABSOLUTE, deadband=0.5)
    assert not a.deadband_exceeded(10.0, 10.4)
    assert a.deadband_exceeded(10.0, 10.6)
    p = tag(DataType.FLOAT64, deadband_kind=DeadbandKind.PERCENT, deadband=1.0, low=0.0, high=200.0)
    assert not p.deadband_exceeded(50.0, 51.9)
    assert p.deadband_exceeded(50.0, 52.1)
    n = tag(DataType.FLOAT64)
    assert n.deadband_exceeded(1.0, 1.0000001) and not n.deadband_exceeded(1.0, 1.0)


def test_scaling_round_trip() -> None:
    s = Scaling(raw_low=0, raw_high=27648, eng_low=0.0, eng_high=100.0)
    assert s.to_eng(13824) == pytest.approx(50.0)
    assert s.to_raw(25.0) == pytest.approx(6912)
