"""The SSH console started in-process for the tests that drive it with the OpenSSH client:
:func:`start_console` / :func:`stop_console`, the :class:`Console` handle with its ``ssh``
runner, and :data:`NEEDS_SSH`, the marks of a module that needs the OpenSSH client."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogLevel, globalLogPublisher

from iotserver import app, config

NEEDS_SSH = [
    pytest.mark.interop,
    pytest.mark.skipif(shutil.which("ssh") is None or shutil.which("ssh-keygen") is None,
                       reason="needs the OpenSSH client"),
]

SSH_COMMON = [
    "-F", "/dev/null",
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "ConnectTimeout=5",
]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


@dataclass
class Console:
    port: int
    data: Path
    key: Path
    core: Any
    root: Any
    errors: list[dict[str, Any]]

    async def ssh(self, command: str, *, key: Path | None = None, user: str = "admin",
                  extra: list[str] | None = None, env: dict[str, str] | None = None
                  ) -> tuple[str, str, int]:
        """Run the ssh client without blocking the reactor; (stdout, stderr, exit status)."""
        args = SSH_COMMON + ["-p", str(self.port)] + (extra if extra is not None else [
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i", str(key or self.key)])
        args += [f"{user}@127.0.0.1", command]
        out, err, code = await getProcessOutputAndValue(
            shutil.which("ssh"), args, env=env or {"PATH": os.environ.get("PATH", "")})
        return out.decode(), err.decode(), code


def console_config(tmp_path: Path, port: int, extra: str = "") -> config.Config:
    return config.parse(f"""
[server]
data_dir = "{tmp_path / 'data'}"

[[tags]]
path = "Site/Setpoint"
type = "float32"
unit = "bar"
access = "readwrite"
range = [0, 100]
initial = 10
history = 100

[[tags]]
path = "Site/Counter"
type = "int32"
initial = 3

[[signals]]
name = "Site/Vibration"
sample_rate = 1000

[console]
endpoint = "tcp:{port}:interface=127.0.0.1"
{extra}
""", source="test.toml")


async def start_console(tmp_path: Path, port: int, extra: str = "", *,
                        authorize: bool = True) -> Console:
    key = keygen(tmp_path / "id_test")
    data = tmp_path / "data"
    if authorize:
        (data / "console").mkdir(parents=True)
        auth = data / "console" / "authorized_keys"
        auth.write_bytes(b"# operators\n" + (tmp_path / "id_test.pub").read_bytes())
        auth.chmod(0o600)
    errors: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical) or "log_failure" in event:
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    root, core = app.build(console_config(tmp_path, port, extra), reactor)
    root.startService()
    await core.services["console"].started
    if port == 0:  # listening on port 0: the port the system chose
        port = core.services["console"].port.getHost().port
    console = Console(port, data, key, core, root, errors)
    console._observer = observe  # type: ignore[attr-defined]
    return console


async def stop_console(console: Console) -> None:
    await console.root.stopService()
    globalLogPublisher.removeObserver(console._observer)  # type: ignore[attr-defined]
