"""The [modbus] configuration section: defaults, the register map, devices, errors naming keys."""

from __future__ import annotations

import itertools

import pytest

from iotserver import config
from iotserver.confparse import ConfigError
from iotserver.modbus.codec import Table
from iotserver.modbus.config import DEFAULT_TOML, parse_device_endpoint
from iotserver.modbus.encoding import Kind, Order
from iotserver.tags.model import DataType


def modbus(text: str) -> object:
    return config.parse(text, source="m.toml").sections["modbus"]


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config.parse(text, source="m.toml")
    return info.value


def test_default_is_a_loopback_server_mapping_the_plant() -> None:
    cfg = config.load(None).sections["modbus"]
    s = cfg.server
    assert s.endpoints == ("tcp:5020:interface=127.0.0.1",) and s.unit_ids is None
    paths = {e.path for e in s.map}
    assert {"Plant/Line1/Pump1/Speed", "Plant/Line1/Pump1/SpeedSetpoint", "Plant/Line1/Pump1/Run",
            "Plant/Utilities/Heartbeat"} <= paths
    run = next(e for e in s.map if e.path == "Plant/Line1/Pump1/Run")
    assert run.table is Table.COILS and run.writable
    assert "loopback only" in cfg.summary()[0]
    assert "[modbus.server]" in DEFAULT_TOML and cfg.devices == ()
    # holding 0..41 is one contiguous block (a client can read it in one request)
    hr = sorted((e.address, e.end) for e in s.map if e.table is Table.HOLDING_REGISTERS)
    assert hr[0][0] == 0 and all(a == b for (_, b), (a, _) in itertools.pairwise(hr) if a < 42)


def test_map_entries_and_options() -> None:
    cfg = modbus("""
[modbus.server]
endpoints = ["tcp:1502:interface=127.0.0.1", "tls:8802:interface=127.0.0.1"]
unit_ids = [1, 2]
unknown_unit = "ignore"
bad_quality = "exception"
roles = { Operator = "read", engineer = "readwrite" }
identification = { vendor_name = "ACME", product_code = "X1" }

[[modbus.server.map]]
path = "A/B"
table = "holding"
address = 10
type = "int32"
order = "cdab"
scale = 0.1
offset = -5

[[modbus.server.map]]
path = "A/Bit"
table = "holding"
address = 12
type = "bit:3"

[[modbus.server.map]]
path = "A/Bit2"
table = "holding"
address = 12
type = "bit:4"
writable = false
""")
    s = cfg.server  # type: ignore[attr-defined]
    assert s.unit_ids == frozenset({1, 2}) and s.unknown_unit == "ignore"
    assert s.roles == {"operator": "read", "engineer": "readwrite"}
    assert s.identity.objects()[0] == b"ACME"
    e = s.map[0]
    assert e.order is Order.CDAB and e.mtype.kind is Kind.INT32 and e.width == 2
    assert e.scaling.to_eng(100) == pytest.approx(5.0)
    assert s.map[2].mtype.bit == 4 and not s.map[2].writable


@pytest.mark.parametrize(("snippet", "key", "words"), [
    ('[[modbus.server.map]]\npath = "A"\ntable = "holding"\naddress = 0\ntype = "float32"\n'
     '[[modbus.server.map]]\npath = "B"\ntable = "holding"\naddress = 1\ntype = "int16"\n',
     "modbus.server.map[1].address", "overlaps modbus.server.map[0]"),
    ('[[modbus.server.map]]\npath = "A"\ntable = "holding"\naddress = 0\ntype = "bit:1"\n'
     '[[modbus.server.map]]\npath = "B"\ntable = "holding"\naddress = 0\ntype = "bit:1"\n',
     "modbus.server.map[1].type", "already mapped"),
    ('[[modbus.server.map]]\npath = "A"\ntable = "holding"\naddress = 0\n',
     "modbus.server.map[0].type", "is required"),
    ('[[modbus.server.map]]\npath = "A"\ntable = "coil"\naddress = 0\ntype = "int16"\n',
     "modbus.server.map[0].type", "hold bool"),
    ('[[modbus.server.map]]\npath = "A"\ntable = "holding"\naddress = 65535\ntype = "int32"\n',
     "modbus.server.map[0].address", "past address 65535"),
    ('[[modbus.server.map]]\npath = "A"\ntable = "input"\naddress = 0\ntype = "int16"\n'
     'writable = true\n', "modbus.server.map[0].writable", "read-only"),
    ('[[modbus.server.map]]\npath = "A"\ntable = "register"\naddress = 0\n',
     "modbus.server.map[0].table", "coil, discrete, holding, input"),
    ('[[modbus.server.map]]\npath = "A"\ntable = "holding"\naddress = 0\ntype = "int16"\n'
     'order = "XYZW"\n', "modbus.server.map[0].order", "ABCD"),
    ('[[modbus.server.map]]\npath = "A"\ntable = "holding"\naddress = 0\ntype = "int16"\n'
     'colour = 1\n', "modbus.server.map[0].colour", "unknown key"),
    ('endpoints = ["ssl:802"]\n', "modbus.server.endpoints[0]", "use tls:"),
    ('endpoints = ["tls:802:clientAuth=optional"]\n', "modbus.server.endpoints[0]",
     "requires client certificates"),
    ('unit_ids = [300]\n', "modbus.server.unit_ids", "0..255"),
])
def test_server_errors_name_the_key(snippet: str, key: str, words: str) -> None:
    err = error("[modbus.server]\n" + snippet)
    assert err.key == key and words in err.message, str(err)


DEVICE = """
[[modbus.devices]]
name = "plc1"
endpoint = "10.0.0.5:1502"
unit_id = 3
order = "CDAB"
max_gap = 10
backoff = { initial = 1, max = 60, jitter = 0.5 }

[[modbus.devices.groups]]
name = "fast"
interval = 0.1

[[modbus.devices.tags]]
path = "L/Temp"
table = "input"
address = 0
type = "int16"
scaling = { raw = [0, 1000], eng = [0, 100] }
unit = "degC"
group = "fast"

[[modbus.devices.tags]]
path = "L/Run"
table = "coil"
address = 4
access = "readwrite"

[[modbus.devices.tags]]
path = "L/Flag"
table = "holding"
address = 9
type = "bit:5"
unit_id = 4
"""


def test_devices_and_tag_defs() -> None:
    cfg = modbus(DEVICE)
    (d,) = cfg.devices  # type: ignore[attr-defined]
    assert (d.host, d.port, d.unit, d.order, d.max_gap) == ("10.0.0.5", 1502, 3, Order.CDAB, 10)
    assert d.backoff.max == 60 and [g.name for g in d.groups] == ["default", "fast"]
    temp, run, flag = d.tags
    assert temp.tag.data_type is DataType.FLOAT64 and temp.tag.unit == "degC"
    assert temp.tag.scaling.to_eng(500) == 50 and temp.order is Order.CDAB
    assert temp.tag.owner == "modbus:plc1" and temp.group == "fast"
    assert run.tag.data_type is DataType.BOOLEAN and run.tag.writable
    assert flag.unit == 4 and flag.mtype.bit == 5
    assert [t.path for t in cfg.tag_defs()] == ["L/Temp", "L/Run", "L/Flag"]  # type: ignore[attr-defined]
    assert "device plc1 at 10.0.0.5:1502 unit 3" in cfg.summary()[0]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("old", "new", "key", "words"), [
    ('endpoint = "10.0.0.5:1502"', 'endpoint = "10.0.0.5:99999"', "endpoint", "host:port"),
    ('group = "fast"', 'group = "slow"', "tags[0].group", "no poll group"),
    ('table = "coil"', 'table = "discrete"', "tags[1].access", "read-only"),
    ('type = "bit:5"', 'type = "bit:5"\ndata_type = "float32"', "tags[2].data_type", "cannot be"),
    ('type = "int16"', 'type = "int17"', "tags[0].type", "Modbus type"),
    ('max_gap = 10', 'max_gap = 500', "max_gap", "0 .. 124"),
    ('unit_id = 4', 'unit_id = 4\nowner = "memory"', "tags[2].owner", "owned by"),
])
def test_device_errors_name_the_key(old: str, new: str, key: str, words: str) -> None:
    err = error(DEVICE.replace(old, new, 1))
    assert err.key.endswith(key) and words in err.message, str(err)


def test_duplicate_paths_across_sources_are_refused() -> None:
    err = error(DEVICE + '\n[[tags]]\npath = "L/Run"\n')
    assert "duplicate tag path" in err.message


def test_device_endpoint_forms() -> None:
    assert parse_device_endpoint("plc") == ("plc", 502)
    assert parse_device_endpoint("[::1]:1502") == ("::1", 1502)
    assert parse_device_endpoint("tcp:host=10.1.1.1:port=5020") == ("10.1.1.1", 5020)
    with pytest.raises(ValueError):
        parse_device_endpoint("plc:")


def test_array_entries_and_fast_paths_switch() -> None:
    cfg = modbus("""
[modbus.server]
fast_paths = false

[[modbus.server.map]]
path = "A/Curve"
table = "holding"
address = 10
type = "float32"
count = 4

[[modbus.server.map]]
path = "A/Valves"
table = "coil"
address = 0
count = 8
""")
    s = cfg.server  # type: ignore[attr-defined]
    assert s.fast_paths is False
    curve, valves = s.map
    assert (curve.count, curve.width, curve.end) == (4, 8, 18)
    assert (valves.count, valves.width) == (8, 8)
    assert config.parse("[modbus.server]\n", source="m.toml").sections["modbus"].server.fast_paths
    e = error("""
[[modbus.server.map]]
path = "A/S"
table = "holding"
address = 0
type = "string:4"
count = 2
""")
    assert str(e).endswith("modbus.server.map[0].count: arrays are of numbers or bool, not string")
    e = error("""
[[modbus.server.map]]
path = "A/S"
table = "holding"
address = 65530
type = "float32"
count = 4
""")
    assert "runs past address 65535" in str(e)
    e = error('[modbus.server]\nfast_paths = "yes"\n')
    assert "modbus.server.fast_paths" in str(e)
