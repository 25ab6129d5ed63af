"""The [opcua] section: defaults, every bad value named by its key, client mappings."""

from __future__ import annotations

from pathlib import Path

import pytest

from iotserver import config
from iotserver.confparse import ConfigError
from iotserver.opcua.config import DEFAULT_POLICIES, OpcUaConfig


def parse(text: str) -> OpcUaConfig:
    cfg = config.parse(text, source="t.toml", base_dir=Path("/etc/iot"))
    section = cfg.sections["opcua"]
    assert isinstance(section, OpcUaConfig)
    return section


def error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        config.parse(text, source="t.toml", base_dir=Path("/etc/iot"))
    return str(info.value)


def test_secure_defaults() -> None:
    cfg = parse("[opcua]\n")
    assert cfg.endpoint == "opc.tcp://127.0.0.1:4840/iotserver"
    assert cfg.security_policies == DEFAULT_POLICIES and "None" not in cfg.security_policies
    assert not cfg.allow_anonymous and cfg.warnings() == []
    assert cfg.application_uri.startswith("urn:") and cfg.namespace.endswith(":tags")
    assert cfg.pki_path(Path("/d")) == Path("/d/opcua/pki")
    assert any("Basic256Sha256 (Sign/SignAndEncrypt)" in line for line in cfg.summary())


def test_none_and_anonymous_are_warned_about_off_host() -> None:
    cfg = parse('[opcua]\nendpoint = "opc.tcp://0.0.0.0:4841"\n'
                'security_policies = ["None"]\nallow_anonymous = true\npki_dir = "pki"\n')
    assert not cfg.loopback and cfg.port == 4841
    warnings = cfg.warnings()
    assert all("reachable off-host" in w for w in warnings) and len(warnings) == 3
    assert any("passwords travel in clear text" in w for w in warnings)
    assert cfg.pki_path(Path("/d")) == Path("/etc/iot/pki")


@pytest.mark.parametrize(("body", "needle"), [
    ('endpoint = "tcp://x:1"', "opcua.endpoint: expected an opc.tcp://"),
    ('endpoint = "opc.tcp://x:99999"', "opcua.endpoint"),
    ('security_policies = ["Basic128Rsa15"]', "opcua.security_policies: expected policies"),
    ("security_policies = []", "expected at least one"),
    ('security_modes = ["Encrypt"]', "opcua.security_modes"),
    ('application_uri = "no uri"', "opcua.application_uri"),
    ("max_sessions = 0", "opcua.max_sessions"),
    ("max_browse_continuation_points = 0", "opcua.max_browse_continuation_points"),
    ("allow_anonymous = 1", "opcua.allow_anonymous: expected true or false"),
    ("bogus = 1", "opcua.bogus: unknown key"),
])
def test_bad_values_name_their_key(body: str, needle: str) -> None:
    assert needle in error(f"[opcua]\n{body}\n")


CLIENT = """
[opcua]
[[opcua.clients]]
name = "plc"
endpoint = "opc.tcp://10.0.0.2:4840"
{extra}
[[opcua.clients.nodes]]
node_id = "{node_id}"
path = "PLC/Temp"
type = "float32"
{node_extra}
"""


def test_client_nodes_become_tags_owned_by_the_client() -> None:
    cfg = parse(CLIENT.format(extra='security_policy = "Basic256Sha256"\nusername = "u"\n'
                                    'password = "p"', node_id="nsu=urn:plc;s=DB1.T",
                              node_extra='access = "readwrite"\nrange = [0, 10]'))
    (client,) = cfg.clients
    assert client.owner == "opcua:plc" and client.security_mode == "SignAndEncrypt"
    (tag,) = cfg.tag_defs()
    assert tag.owner == "opcua:plc" and tag.writable and tag.high == 10
    assert any("client plc" in line for line in cfg.summary())


@pytest.mark.parametrize(("extra", "node_id", "node_extra", "needle"), [
    ("", "ns=2;x=1", "", "node_id: expected a NodeId"),
    ("", "nsu=urn:x", "", "node_id: expected 'nsu=<uri>;<id>'"),
    ('username = "u"', "i=5", "", "password: expected username and password together"),
    ('security_policy = "Basic999"', "i=5", "", "security_policy: expected one of"),
    ("", "i=5", 'owner = "memory"', "owner: expected no owner"),
    ('user_certificate = "c.pem"\nuser_private_key = "k.pem"', "i=5", "",
     "expected a security_policy other than None"),
    ("reconnect_min_s = 5\nreconnect_max_s = 1", "i=5", "", "reconnect_max_s"),
    ("", "i=5", "wat = 1", "nodes[0].wat: unknown key"),
])
def test_client_errors(extra: str, node_id: str, node_extra: str, needle: str) -> None:
    assert needle in error(CLIENT.format(extra=extra, node_id=node_id, node_extra=node_extra))


def test_duplicate_client_names_and_tag_paths() -> None:
    text = CLIENT.format(extra="", node_id="i=5", node_extra="")
    dup = text + '\n[[opcua.clients]]\nname = "plc"\nendpoint = "opc.tcp://h:1"\n' \
        '[[opcua.clients.browse]]\nnode_id = "i=85"\nprefix = "X"\n'
    assert "unique client name" in error(dup)
    clash = text + '\n[[tags]]\npath = "PLC/Temp"\n'
    assert "duplicate tag path" in error(clash)
