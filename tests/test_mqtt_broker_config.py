"""``[mqtt]`` parsing: the built-in default, errors that name the key, warnings."""

from __future__ import annotations

import pytest

from iotserver import config
from iotserver.confparse import ConfigError
from iotserver.mqtt.config import DEFAULT_TOML, NEVER, MqttConfig


def parse(body: str) -> MqttConfig:
    return config.parse(f"[mqtt]\n{body}", source="t.toml").sections["mqtt"]  # type: ignore[no-any-return]


def error(body: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(body)
    return str(info.value)


def test_builtin_default_is_loopback_with_anonymous_warned() -> None:
    assert DEFAULT_TOML in config.DEFAULT_CONFIG
    cfg = config.load(None).sections["mqtt"]
    assert cfg.builtin_default and cfg.auth.allow_anonymous
    assert [lst.endpoint for lst in cfg.listeners] == ["tcp:1883:interface=127.0.0.1",
                                                       "tls:8883:interface=127.0.0.1"]
    assert all(lst.loopback for lst in cfg.listeners)
    assert cfg.listeners[1].client_certs == "optional"
    assert len(cfg.warnings()) == 2 and all("loopback" in w for w in cfg.warnings())
    assert [r.access.name for r in cfg.acl] == ["READ", "READ", "DENY", "READWRITE"]


def test_config_file_defaults_are_closed() -> None:
    cfg = parse("")
    assert not cfg.builtin_default and not cfg.auth.allow_anonymous
    assert cfg.listeners[0].endpoint == "tcp:1883:interface=127.0.0.1"
    assert cfg.limits.max_session_expiry == NEVER and cfg.persistence.synchronous == "full"
    assert cfg.bridge.prefix == "iotserver" and cfg.topic_prefix == "iotserver"
    assert cfg.warnings() == []
    assert any("persistence" in line for line in cfg.summary())


def test_full_section() -> None:
    cfg = parse("""
sys_interval = 5
[[mqtt.listeners]]
endpoint = "tls:8883:interface=0.0.0.0"
client_certs = "required"
[[mqtt.listeners]]
endpoint = "tcp:1883:interface=0.0.0.0"
allow_anonymous = true
[mqtt.auth]
anonymous_user = "guest"
acl_file = "acl.toml"
[[mqtt.acl]]
user = "plc7"
topic = "devices/%c/#"
access = "readwrite"
[mqtt.limits]
max_connections = 10
receive_maximum = 20
[mqtt.persistence]
synchronous = "normal"
commit_interval = 0.005
[mqtt.bridge]
prefix = "site7/gw"
publish = ["Line1/**"]
qos = 1
""")
    assert cfg.sys_interval == 5 and cfg.limits.max_connections == 10
    assert cfg.listeners[0].client_certs == "required" and cfg.listeners[0].is_tls
    assert cfg.listeners[1].allow_anonymous and not cfg.listeners[0].allow_anonymous
    assert cfg.auth.anonymous_user == "guest" and cfg.acl_file is not None
    assert cfg.acl[0].topic == "devices/%c/#"
    assert cfg.bridge.publish == ("Line1/**",) and cfg.bridge.qos == 1
    warnings = cfg.warnings()
    assert len(warnings) == 2 and all("OFF-HOST" in w for w in warnings)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("colour = 1", "mqtt.colour: unknown key"),
        ("[mqtt.limits]\nmax_inflight = 0", "mqtt.limits.max_inflight"),
        ("[mqtt.limits]\nmaxinflight = 5", "mqtt.limits.maxinflight: unknown key"),
        ('[[mqtt.listeners]]\nendpoint = "tcp:1883"\nclient_certs = "optional"',
         "client certificates need a tls: endpoint"),
        ('[[mqtt.listeners]]\nendpoint = "udp:1883"', "mqtt.listeners[0].endpoint"),
        ('[[mqtt.listeners]]\nendpoint = "tcp:1"\n[[mqtt.listeners]]\nendpoint = "tcp:1"',
         "duplicate endpoint"),
        ('[mqtt.bridge]\nprefix = "a/#"', "mqtt.bridge.prefix"),
        ('[[mqtt.acl]]\ntopic = "a/#/b"\naccess = "read"', "mqtt.acl[0].topic"),
        ('[[mqtt.acl]]\ntopic = "a"\naccess = "all"', "mqtt.acl[0].access"),
        ('[mqtt.persistence]\nsynchronous = "off"', "mqtt.persistence.synchronous"),
        ('[[mqtt.listeners]]\nendpoint = "tls:1:ca=x.pem"', "client_certs"),
    ],
)
def test_errors_name_the_key(body: str, needle: str) -> None:
    assert needle in error(body)
