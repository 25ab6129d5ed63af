from __future__ import annotations

from pathlib import Path

import pytest

from iotserver import config
from iotserver.confparse import ConfigError, check_endpoint, is_loopback_endpoint
from iotserver.tags.model import Access, DataType, DeadbandKind


def parse(text: str) -> config.Config:
    return config.parse(text, source="test.toml", base_dir=Path("/etc/iotserver"))


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value


def test_builtin_default_is_valid_and_simulates() -> None:
    cfg = config.load(None)
    assert cfg.simulator.enabled and cfg.signals and cfg.signals[0].sample_rate >= 10_000
    assert cfg.server.hostnames == ("localhost",)


def test_default_data_dir_follows_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTSERVER_DATA_DIR", "/srv/iot")
    assert config.default_data_dir() == Path("/srv/iot")
    monkeypatch.delenv("IOTSERVER_DATA_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", "/var/state")
    assert config.default_data_dir() == Path("/var/state/iotserver")


def test_full_tag_entry() -> None:
    cfg = parse(
        """
[server]
data_dir = "state"

[[tags]]
path = "Line1/Press/Setpoint"
type = "int16"
unit = "bar"
description = "Pressure setpoint"
range = [0, 250]
access = "readwrite"
deadband = 2
deadband_type = "percent"
history = 500
initial = 100
scaling = { raw = [0, 27648], eng = [0, 250] }
"""
    )
    (tag,) = cfg.tags
    assert cfg.server.data_dir == Path("/etc/iotserver/state")
    assert tag.data_type is DataType.INT16 and tag.access is Access.READ_WRITE
    assert (tag.low, tag.high) == (0.0, 250.0) and tag.deadband_kind is DeadbandKind.PERCENT
    assert tag.history_capacity == 500 and tag.persist and tag.initial == 100
    assert tag.scaling is not None and tag.scaling.eng_high == 250.0


@pytest.mark.parametrize(
    ("text", "line", "key", "words"),
    [
        ("[server]\nname = 'x'\nnmae = 'y'\n", 3, "server.nmae", "unknown key"),
        ("[server]\nwrite_timeout = 'soon'\n", 2, "server.write_timeout", "expected a number"),
        ("[server]\nwrite_timeout = -1\n", 2, "server.write_timeout", "> 0"),
        ("[[tags]]\npath = 'A/B'\ntype = 'float128'\n", 3, "tags[0].type", "float32"),
        ("[[tags]]\npath = 'A/+'\n", 2, "tags[0].path", "wildcards"),
        ("[[tags]]\npath = 'A//B'\n", 2, "tags[0].path", "single '/'"),
        (
            "[[tags]]\npath = 'A'\n[[tags]]\npath = 'B'\n[[tags]]\npath = 'A'\n",
            6,
            "tags[2].path",
            "duplicate tag path 'A'",
        ),
        ("[[tags]]\npath = 'A'\nrange = [10, 0]\n", 3, "tags[0].range", "low < high"),
        (
            "[[tags]]\npath = 'A'\ndeadband = 1\ndeadband_type = 'percent'\n",
            4,
            "tags[0].deadband_type",
            "range",
        ),
        (
            "[[tags]]\npath = 'A'\ntype = 'uint16'\ninitial = -5\n",
            4,
            "tags[0].initial",
            "outside UInt16",
        ),
        ("[[tags]]\npath = 'A'\nshape = [0]\n", 3, "tags[0].shape", "positive"),
        (
            "[[tags]]\npath = 'A'\ntype = 'string'\nhistory = true\n",
            4,
            "tags[0].history",
            "historized",
        ),
        ("[[signals]]\nname = 'V'\nsample_rate = 0\n", 3, "signals[0].sample_rate", "> 0"),
        (
            "[[signals]]\nname = 'V'\nsample_rate = 1000\n[[tags]]\npath = 'V/RMS'\n",
            2,
            "signals[0].name",
            "duplicate tag path 'V/RMS'",
        ),
        ("[tls]\ncert = 'a.pem'\n", 1, "tls.key", "together"),
        ("[simulator]\nupdate_hz = 1e6\n", 2, "simulator.update_hz", "1000"),
        ("[bogus]\nx = 1\n", 1, "bogus", "unknown key"),
    ],
)
def test_errors_name_key_line_and_expectation(text: str, line: int, key: str, words: str) -> None:
    err = error_of(text)
    assert err.key == key
    assert err.line == line
    assert words in str(err)
    assert str(err).startswith(f"test.toml:{line}: {key}: ")


def test_invalid_toml_reports_line() -> None:
    err = error_of("[server]\nname = \n")
    assert err.line == 2 and "not valid TOML" in str(err)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path / "nope.toml")
    assert "file not found" in str(info.value)


@pytest.mark.parametrize(
    ("desc", "ok", "loopback"),
    [
        ("tcp:1883:interface=127.0.0.1", True, True),
        ("tcp:1883", True, False),
        (r"tcp6:1883:interface=\:\:1", True, True),
        ("tls:8883:interface=0.0.0.0", True, False),
        ("udp:1883", False, False),
        ("tcp:99999", False, False),
        ("tcp:abc", False, False),
    ],
)
def test_endpoint_strings(desc: str, ok: bool, loopback: bool) -> None:
    assert (check_endpoint(desc) is None) is ok
    if ok:
        assert is_loopback_endpoint(desc) is loopback
