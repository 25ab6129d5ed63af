"""The one endpoint parser: every kind, escapes, malformed strings, and config errors naming
file, line and key in every section that takes an endpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from iotserver import config
from iotserver.confparse import ConfigError
from iotserver.edge.endpoint import Endpoint, EndpointError, parse_endpoint, split_description


def test_tcp_forms() -> None:
    ep = parse_endpoint("tcp:1883:interface=127.0.0.1")
    assert ep == Endpoint("tcp:1883:interface=127.0.0.1", "tcp", port=1883,
                          interface="127.0.0.1")
    assert ep.loopback and not ep.is_tls and ep.host == "127.0.0.1"
    assert parse_endpoint("tcp:port=502").port == 502
    assert parse_endpoint("tcp:0:backlog=7").backlog == 7
    wild = parse_endpoint("tcp:1883")
    assert wild.host == "0.0.0.0" and not wild.loopback and wild.where() == "REACHABLE OFF-HOST"
    six = parse_endpoint(r"tcp6:1883:interface=\:\:1")
    assert six.interface == "::1" and six.loopback
    assert parse_endpoint("tcp6:1883").host == "::"
    assert parse_endpoint("tcp:1:interface=127.8.9.10").loopback
    assert parse_endpoint("tcp:1:interface=localhost").loopback
    assert not parse_endpoint("tcp:1:interface=10.0.0.1").loopback


def test_tls_and_ssl() -> None:
    ep = parse_endpoint(r"tls:8883:interface=\:\:1:cert=/etc/a\:b.pem:key=k.pem:ca=ca.pem"
                        ":clientAuth=required")
    assert (ep.kind, ep.port, ep.interface, ep.cert, ep.key, ep.ca, ep.client_auth) == (
        "tls", 8883, "::1", "/etc/a:b.pem", "k.pem", "ca.pem", "required")
    assert ep.is_tls and ep.own_certificate
    plain_tls = parse_endpoint("tls:802")
    assert plain_tls.is_tls and not plain_tls.own_certificate and plain_tls.client_auth is None
    assert parse_endpoint("tls:802:clientAuth=required").client_auth == "required"
    ssl = parse_endpoint("ssl:8883:privateKey=server.pem")
    assert ssl.key == "server.pem" and ssl.cert == "server.pem"  # Twisted: certKey defaults
    assert parse_endpoint("ssl:8883:privateKey=k.pem:certKey=c.pem").cert == "c.pem"


def test_unix_and_systemd() -> None:
    ep = parse_endpoint("unix:/run/x.sock:mode=660:lockfile=0")
    assert (ep.path, ep.mode, ep.lockfile, ep.loopback) == ("/run/x.sock", 0o660, False, True)
    sd = parse_endpoint("systemd:domain=INET:index=0")
    assert (sd.domain, sd.index, sd.loopback) == ("INET", 0, False)


def test_split_description_escapes() -> None:
    assert split_description(r"a\:b:c\\d:") == ["a:b", "c\\d", ""]
    assert split_description("") == [""]
    with pytest.raises(EndpointError, match="lone backslash"):
        split_description("tcp:1\\")


@pytest.mark.parametrize(("text", "words"), [
    ("", "expected a Twisted endpoint string"),
    ("1883", "expected a Twisted endpoint string"),
    ("udp:1883", "kinds: tcp, tcp6, tls, ssl, unix, systemd"),
    ("TCP:1883", "expected a Twisted endpoint string"),
    ("tcp:", "expected a port number"),
    ("tcp:99999", "expected a port number 0..65535"),
    ("tcp:-1", "expected a port number"),
    ("tcp:1e3", "expected a port number"),
    ("tcp:\u0661\u0662", "expected a port number"),  # Arabic-Indic digits: isdigit() is True
    ("tcp:1:2", "unexpected positional argument '2'"),
    ("tcp:1:interface=", "interface must be an address"),
    ("tcp:1:interface=a b", "interface must be an address"),
    ("tcp:1:backlog=0", "backlog must be a number 1..65535"),
    ("tcp:1:backlog=lots", "backlog must be a number"),
    ("tcp:1:port=2", "option 'port' given twice"),
    ("tcp:1:inteface=127.0.0.1", "did you mean 'interface'?"),
    ("tcp:1\x00", "control characters"),
    ("tcp:1:interface=127.0.0.1\n", "control characters"),
    ("tcp:1\\", "lone backslash"),
    ("tls:80:clientauth=required", "unknown option 'clientauth' for tls: (did you mean "
     "'clientAuth'?)"),
    ("tls:80:certfile=x", "unknown option 'certfile'"),
    ("tls:80:cert=a:cert=b", "given twice"),
    ("tls:80:clientAuth=yes", "clientAuth must be one of none, optional, required"),
    ("tls:80:cert=a.pem", "give cert= and key= together"),
    ("tls:80:ca=ca.pem", "ca= needs cert= and key="),
    ("tls:80:cert=a:key=b:clientAuth=optional", "clientAuth=optional needs ca=PATH"),
    ("tls:80:cert=:key=b", "cert must be a file path"),
    ("tls:interface=x", "missing port"),
    ("ssl:443", "missing privateKey=PATH"),
    ("ssl:443:privateKey=k:sslmethod=TLSv1_METHOD", "sslmethod is not supported"),
    ("ssl:443:privateKey=k:extraCertChain=c", "extraCertChain is not supported"),
    ("unix:", "missing the socket path"),
    ("unix:/x:mode=999", "mode must be octal"),
    ("unix:/x:lockfile=yes", "lockfile must be 0 or 1"),
    ("systemd:domain=INET", "missing index="),
    ("systemd:domain=IPX:index=0", "domain must be one of INET, INET6, UNIX"),
    ("systemd:0", "unexpected positional argument"),
])
def test_malformed(text: str, words: str) -> None:
    with pytest.raises(EndpointError) as info:
        parse_endpoint(text)
    message = str(info.value)
    assert words in message
    assert "\n" not in message  # one line


def test_kinds_narrowed_with_reason() -> None:
    with pytest.raises(EndpointError, match="SSH encrypts; expected one of tcp:, unix:"):
        parse_endpoint("tls:22", ("tcp", "unix"), "SSH encrypts")


def test_with_port_shows_the_real_port() -> None:
    assert parse_endpoint("tcp:0:interface=127.0.0.1").with_port(4321) == (
        "tcp:4321:interface=127.0.0.1")
    assert parse_endpoint("tls:0").with_port(4321) == "tls:4321"
    assert parse_endpoint("tcp:1883").with_port(4321) == "tcp:1883"


# -- the same misspelling is refused in every section, with file, line and key ----------------


@pytest.mark.parametrize(("body", "key", "line"), [
    ('[modbus.server]\nendpoints = ["tls:802:clientauth=required"]\n',
     "modbus.server.endpoints[0]", 2),
    ('[[mqtt.listeners]]\nendpoint = "tls:8883:clientauth=required"\n',
     "mqtt.listeners[0].endpoint", 2),
    ('[console]\n\nendpoint = "tcp:2222:clientauth=required"\n', "console.endpoint", 3),
])
def test_misspelt_option_is_an_error_everywhere(body: str, key: str, line: int) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(body, source="site.toml")
    err = info.value
    assert err.key == key and err.line == line
    text = str(err)
    assert text.startswith(f"site.toml:{line}: {key}: ") and "unknown option 'clientauth'" in text
    assert "\n" not in text


@pytest.mark.parametrize(("body", "words"), [
    ('[modbus.server]\nendpoints = ["tls:802:clientAuth=optional"]\n',
     "requires client certificates"),
    ('[modbus.server]\nendpoints = ["ssl:802:privateKey=k.pem"]\n', "use tls:PORT"),
    ('[[mqtt.listeners]]\nendpoint = "tls:8883:clientAuth=required"\n', "client_certs"),
    ('[console]\nendpoint = "ssl:2222:privateKey=k"\n', "SSH encrypts the connection itself"),
    ('[modbus.server]\nlogin_timeout = -1\n', "modbus.server.login_timeout"),
    ('[[mqtt.listeners]]\nendpoint = "tcp:1"\nmax_connections = 0\n',
     "mqtt.listeners[0].max_connections"),
    ('[console]\nframe_timeout = "soon"\n', "console.frame_timeout: expected a number"),
])
def test_section_rules(body: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(body, source="site.toml")
    assert words in str(info.value)


def test_limits_are_per_listener_in_config() -> None:
    cfg = config.parse('[mqtt.limits]\nconnect_timeout = 4\n'
                       '[[mqtt.listeners]]\nendpoint = "tcp:1:interface=127.0.0.1"\n'
                       'max_connections = 5\nidle_timeout = 60\n'
                       '[[mqtt.listeners]]\nendpoint = "tcp:2:interface=127.0.0.1"\n'
                       '[modbus.server]\nmax_connections = 3\nframe_timeout = 2.5\n'
                       '[console]\nlogin_timeout = 12\n', source="site.toml")
    first, second = cfg.section("mqtt").listeners
    assert (first.limits.max_connections, first.limits.idle_timeout) == (5, 60.0)
    assert first.limits.max_connections_per_peer == 5  # never above the listener's limit
    assert first.limits.login_timeout == second.limits.login_timeout == 4.0  # connect_timeout
    assert second.limits.max_connections == 1000
    modbus = cfg.section("modbus").server
    assert (modbus.limits.max_connections, modbus.limits.frame_timeout) == (3, 2.5)
    assert cfg.section("console").limits.login_timeout == 12.0


def test_check_config_accepts_what_startup_accepts(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The misspelt option that check-config used to pass under [[mqtt.listeners]] (and whose
    listener then failed at start) is refused, as under [modbus.server]."""
    from iotserver import cli

    for body, key in [
        ('[[mqtt.listeners]]\nendpoint = "tls:8883:clientauth=required"\n',
         "mqtt.listeners[0].endpoint"),
        ('[modbus.server]\nendpoints = ["tls:802:clientauth=required"]\n',
         "modbus.server.endpoints[0]"),
    ]:
        cfg = tmp_path / "site.toml"
        cfg.write_text(body)
        assert cli.main(["check-config", str(cfg)]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"iotserver: configuration error: {cfg}:2: {key}: ")
        assert "unknown option 'clientauth'" in err and "\n" not in err
    cfg.write_text('[[mqtt.listeners]]\nendpoint = "tls:8883:interface=127.0.0.1"\n'
                   'max_connections = 50\n')
    assert cli.main(["check-config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "listener tls:8883:interface=127.0.0.1 (loopback only" in out
    assert "at most 50 connections, 50 per peer" in out


def test_exposure_warnings() -> None:
    from iotserver.edge.listen import exposure_warnings

    assert exposure_warnings("MQTT", parse_endpoint("tcp:1883:interface=127.0.0.1")) == []
    assert exposure_warnings("MQTT", parse_endpoint("tls:8883")) == []
    lines = exposure_warnings("MQTT", parse_endpoint("tcp:1883"), anonymous=True,
                              consequence="passwords travel unencrypted")
    assert lines == ["MQTT listener tcp:1883 is plain text and REACHABLE OFF-HOST: passwords "
                     "travel unencrypted",
                     "MQTT listener tcp:1883 accepts anonymous clients (REACHABLE OFF-HOST)"]
    assert exposure_warnings("MQTT", parse_endpoint("unix:/run/m.sock"), anonymous=True) == [
        "MQTT listener unix:/run/m.sock accepts anonymous clients (loopback only)"]
    assert exposure_warnings("SSH console", parse_endpoint("tcp:22"), encrypted=True) == []
