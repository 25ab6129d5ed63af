"""``iotserver check-config`` opens every file a configuration names, and startup and CLI errors
are one line with exit status 1, never a traceback."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
from pathlib import Path

import pytest
from helpers.tools import our, twistd

from iotserver import cli, config
from iotserver.checkfiles import check_files
from iotserver.security import pki
from iotserver.security.pki_files import write_cert_pem, write_key_pem

TIMEOUT = 60


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "IOTSERVER_DATA_DIR": str(tmp_path / "data")}


@pytest.fixture
def material(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate with its key, another key, and an expired certificate."""
    ca, ca_key = pki.create_ca("test CA")
    cert, key = pki.issue_server_cert(ca, ca_key, "srv", dns_names=["localhost"],
                                      ip_addresses=["127.0.0.1"])
    old_ca, old_key = pki.create_ca(
        "old CA", days=1, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=10))
    out = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "srv.pem", "key": tmp_path / "srv.key",
           "other_key": tmp_path / "other.key", "expired": tmp_path / "expired.pem",
           "expired_key": tmp_path / "expired.key"}
    write_cert_pem(ca, out["ca"])
    write_cert_pem(cert, out["cert"])
    write_key_pem(key, out["key"])
    write_key_pem(pki.generate_key(), out["other_key"])
    write_cert_pem(old_ca, out["expired"])
    write_key_pem(old_key, out["expired_key"])
    return out


def _problems(tmp_path: Path, text: str) -> list[str]:
    return check_files(config.parse(text, source="c.toml", base_dir=tmp_path))


def test_good_files_have_no_problems(tmp_path: Path, material: dict[str, Path]) -> None:
    assert _problems(tmp_path, f"""
[server]
data_dir = "{tmp_path / 'data'}"
[tls]
cert = "{material['cert']}"
key = "{material['key']}"
ca = "{material['ca']}"
""") == []


def test_every_problem_is_reported_one_line_each(tmp_path: Path,
                                                 material: dict[str, Path]) -> None:
    (tmp_path / "plain-file").write_text("x")
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "users.toml").write_text("[users.bob]\nrole = 'wizard'\n")
    problems = _problems(tmp_path, f"""
[server]
data_dir = "{tmp_path / 'plain-file' / 'data'}"
users_file = "{tmp_path / 'users.toml'}"
[tls]
cert = "{material['cert']}"
key = "{material['other_key']}"
ca = "{tmp_path / 'a-dir'}"
[mqtt]
[[mqtt.listeners]]
endpoint = "tls:0:interface=127.0.0.1:cert={material['expired']}:key={material['expired_key']}"
[mqtt.auth]
acl_file = "{tmp_path / 'missing-acl.toml'}"
[modbus.server]
endpoints = ["tls:0:interface=127.0.0.1:cert={tmp_path / 'nocert.pem'}:key={material['key']}\
:ca={material['ca']}"]
""")
    text = "\n".join(problems)
    assert all(p.startswith("c.toml: ") and "\n" not in p for p in problems), text
    expected = [
        "server.data_dir: ",  # below a plain file
        "tls.key: " + f"{material['other_key']} is not the private key of tls.cert",
        "tls.ca: " + f"{tmp_path / 'a-dir'}: is a directory",
        "server.users_file: ",  # unknown role
        "mqtt.auth.acl_file: " + f"{tmp_path / 'missing-acl.toml'}: ACL file not found",
        "mqtt.listeners[0].endpoint cert=: certificate " + f"{material['expired']}",
        "modbus.server.endpoints[0] cert=: " + f"{tmp_path / 'nocert.pem'}: file not found",
    ]
    for start in expected:
        assert any(p.startswith("c.toml: " + start) for p in problems), (start, text)
    assert "expired on" in text
    assert len(problems) == len(expected), text


def test_missing_configured_users_file_and_key(tmp_path: Path, material: dict[str, Path]) -> None:
    problems = _problems(tmp_path, f"""
[server]
data_dir = "{tmp_path / 'data'}"
users_file = "{tmp_path / 'nobody.toml'}"
[tls]
cert = "{material['cert']}"
key = "{tmp_path / 'gone.key'}"
""")
    assert problems == [
        f"c.toml: tls.key: {tmp_path / 'gone.key'}: file not found",
        f"c.toml: server.users_file: {tmp_path / 'nobody.toml'}: file not found "
        "(password logins would be off)",
    ]


def test_default_users_file_may_be_missing(tmp_path: Path) -> None:
    """<data_dir>/users.toml appears with the first 'iotserver users add': not a problem."""
    assert _problems(tmp_path, f'[server]\ndata_dir = "{tmp_path / "data"}"\n') == []


def test_check_config_cli_exits_1_with_one_line_per_problem(
        tmp_path: Path, material: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n[tls]\ncert = "{material["cert"]}"'
                   f'\nkey = "{material["other_key"]}"\n[mqtt.auth]\nacl_file = "nope.toml"\n')
    assert cli.main(["check-config", str(cfg)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"iotserver: {cfg}: tls.key: {material['other_key']} is not the private key of tls.cert "
        f"{material['cert']}",
        f"iotserver: {cfg}: mqtt.auth.acl_file: {tmp_path / 'nope.toml'}: ACL file not found",
    ]


def test_check_config_into_a_closed_pipe_is_no_traceback(tmp_path: Path) -> None:
    """`iotserver check-config | head`: the reader is gone before we write."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        res = subprocess.run([our("iotserver"), "check-config"], stdout=write_end,
                             stderr=subprocess.PIPE, text=True, timeout=TIMEOUT,
                             env=_env(tmp_path))
    finally:
        os.close(write_end)
    assert res.returncode == 1
    assert res.stderr == "iotserver: output closed early (broken pipe)\n"


def _run_server(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    return subprocess.run(twistd("--config", str(cfg)), capture_output=True, text=True,
                          timeout=TIMEOUT, env=_env(tmp_path), cwd=tmp_path)


def test_history_over_budget_is_one_line(tmp_path: Path) -> None:
    res = _run_server(tmp_path, '[history]\nmax_bytes = 1048576\n\n[[tags]]\npath = "A/B"\n'
                                'history = 1000000\n')
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "Traceback" not in out and "stderr#error" not in out, out
    lines = [ln for ln in out.splitlines() if "#critical]" in ln]
    assert len(lines) == 1, out
    assert "history.max_bytes = 1048576 is too small: ring 'tag:A/B' needs 16000000 bytes" \
        in lines[0], out


def test_port_in_use_is_the_one_cause_logged(tmp_path: Path, free_port: int) -> None:
    ua_port = free_port
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = _run_server(tmp_path, f"""
[modbus.server]
endpoints = ["tcp:{port}:interface=127.0.0.1"]

[opcua]
endpoint = "opc.tcp://127.0.0.1:{ua_port}/iotserver"
""")
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "Traceback" not in out and "failed to start" not in out, out
    critical = [ln for ln in out.splitlines() if "#critical]" in ln]
    assert len(critical) == 1, out
    assert f"tcp:{port}:interface=127.0.0.1" in critical[0] and "in use" in critical[0], out


def test_generated_material_of_an_earlier_start_is_checked(tmp_path: Path,
                                                           material: dict[str, Path]) -> None:
    tls = tmp_path / "data" / "tls"
    tls.mkdir(parents=True)
    (tls / "ca.pem").write_bytes(material["expired"].read_bytes())
    (tls / "server.pem").write_bytes(material["cert"].read_bytes())
    (tls / "server.key").write_bytes(material["other_key"].read_bytes())
    problems = _problems(tmp_path, f'[server]\ndata_dir = "{tmp_path / "data"}"\n')
    assert len(problems) == 2, problems
    assert problems[0] == f"c.toml: tls (generated): {tls / 'server.key'} is not the private key " \
        f"of tls (generated) {tls / 'server.pem'}"
    assert problems[1].startswith(f"c.toml: tls (generated): certificate {tls / 'ca.pem'}") \
        and "expired on" in problems[1]
