"""A configuration starts only what it asks for, and what it names but lacks is a warning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from iotserver import app, config

CLIENTS_ONLY = """
[server]
data_dir = "{data}"

[[opcua.clients]]
name = "plc"
endpoint = "opc.tcp://127.0.0.1:{port}/nobody"
reconnect_min_s = 5

[[opcua.clients.nodes]]
path = "PLC/Temp"
node_id = "ns=2;s=Temp"
type = "float64"
"""


def test_opcua_clients_only_asks_for_no_server(tmp_path: Path) -> None:
    cfg = config.parse(CLIENTS_ONLY.format(data=tmp_path, port=4841))
    opcua = cfg.sections["opcua"]
    assert opcua.server is False and opcua.warnings() == []
    assert opcua.summary()[0] == "server: off (only [[opcua.clients]] configured)"
    with_server = config.parse(CLIENTS_ONLY.format(data=tmp_path, port=1).replace(
        "[[opcua.clients]]", '[opcua]\nendpoint = "opc.tcp://127.0.0.1:4841/x"\n\n'
        "[[opcua.clients]]", 1))
    assert with_server.sections["opcua"].server is True
    assert config.parse("[opcua]\n").sections["opcua"].server is True
    assert config.parse("[opcua]\nserver = false\n").sections["opcua"].server is False


class _Log:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __enter__(self) -> _Log:
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self.events.append)

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_level") is LogLevel.warn]


@pytest_twisted.ensureDeferred
async def test_opcua_clients_only_starts_the_client_and_no_server(tmp_path: Path,
                                                                 free_port: int) -> None:
    cfg = config.parse(CLIENTS_ONLY.format(data=tmp_path / "data", port=free_port))
    root, core = app.build(cfg, reactor)
    with _Log() as log:
        root.startService()
        service = core.services["opcua"]
        await service.started
        try:
            assert service.failure is None
            assert service.server is None and service.iserver is None
            assert list(service.clients) == ["plc"]
            assert not [w for w in core.listeners if w[0] == "OPC UA"]
        finally:
            await root.stopService()
    assert not [w for w in log.warnings() if "security policy" in w or "anonymous" in w]


def test_configured_users_file_that_is_missing_is_a_warning(tmp_path: Path) -> None:
    missing = tmp_path / "etc" / "users.toml"
    cfg = config.parse(f'[server]\ndata_dir = "{tmp_path / "data"}"\nusers_file = "{missing}"\n',
                       source="plant.toml")
    root, _ = app.build(cfg, reactor)
    with _Log() as log:
        root.startService()
        try:
            warnings = [w for w in log.warnings() if "users_file" in w]
        finally:
            root.stopService()
    assert warnings == [
        f"plant.toml: server.users_file = {missing} does not exist: password logins are off "
        "until 'iotserver users add' creates it"]


def test_default_users_file_missing_is_no_warning(tmp_path: Path) -> None:
    cfg = config.parse(f'[server]\ndata_dir = "{tmp_path / "data"}"\n')
    root, _ = app.build(cfg, reactor)
    with _Log() as log:
        root.startService()
        root.stopService()
    assert not [w for w in log.warnings() if "user" in w]
