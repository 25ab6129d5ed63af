"""The [console] section: defaults, paths, refused endpoints, unknown keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from iotserver import config
from iotserver.confparse import ConfigError
from iotserver.console.config import DEFAULT_ENDPOINT, DEFAULT_TOML, ConsoleConfig


def parse(text: str, base: Path | None = None) -> ConsoleConfig:
    cfg = config.parse(text, source="c.toml", base_dir=base)
    section = cfg.sections["console"]
    assert isinstance(section, ConsoleConfig)
    return section


def test_builtin_default_has_a_loopback_console() -> None:
    assert DEFAULT_TOML in config.DEFAULT_CONFIG
    cfg = config.load(None)
    console = cfg.sections["console"]
    assert console.endpoint == DEFAULT_ENDPOINT == "tcp:2222:interface=127.0.0.1"
    assert console.password_login is False
    data = cfg.server.data_dir
    assert console.authorized_keys_path(data) == data / "console" / "authorized_keys"
    assert console.host_key_path(data) == data / "console" / "ssh_host_ed25519_key"
    assert "loopback only" in console.summary()[0]


def test_explicit_values_and_relative_paths(tmp_path: Path) -> None:
    console = parse(
        """
[console]
endpoint = "tcp:2022:interface=0.0.0.0"
authorized_keys = "keys/console_keys"
host_key = "/etc/iotserver/console_host_key"
password_login = true
""",
        tmp_path,
    )
    assert console.endpoint == "tcp:2022:interface=0.0.0.0"
    assert console.authorized_keys == tmp_path / "keys" / "console_keys"
    assert console.authorized_keys_path(Path("/ignored")) == tmp_path / "keys" / "console_keys"
    assert console.host_key == Path("/etc/iotserver/console_host_key")
    assert console.password_login is True
    summary = console.summary()
    assert "REACHABLE OFF-HOST" in summary[0]
    assert "admin" in summary[2]


def test_empty_section_means_defaults() -> None:
    assert parse("[console]\n") == ConsoleConfig()


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('bogus = 1', "console.bogus: unknown key"),
        ('endpoint = "tls:2222"', "SSH encrypts the connection itself"),
        ('endpoint = "ssl:2222"', "SSH encrypts the connection itself"),
        ('endpoint = "2222"', "expected a Twisted endpoint string"),
        ('endpoint = "tcp:99999"', "expected a port number"),
        ('password_login = "yes"', "console.password_login: expected true or false"),
        ('authorized_keys = 5', "console.authorized_keys: expected a string"),
    ],
)
def test_errors_name_the_key(line: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(f"[console]\n{line}\n", source="c.toml")
    assert expected in str(info.value)
    assert str(info.value).startswith("c.toml:2:")


def test_unix_and_systemd_endpoints_are_accepted() -> None:
    assert parse('[console]\nendpoint = "unix:/run/iotserver/console.sock"\n').endpoint.startswith(
        "unix:")
    assert parse('[console]\nendpoint = "systemd:domain=INET:index=0"\n').endpoint.startswith(
        "systemd:")
