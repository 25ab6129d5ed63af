"""The server as users run it, in a subprocess.

* :class:`Server`: ``twistd iotserver`` on a config file, with an MQTT listener on a free
  loopback port and one engineer (:data:`USER`, :data:`PASSWORD`); a test may rewrite
  :attr:`Server.cfg` before :meth:`Server.start`.
* :func:`spawn`: ``python -m iotserver.cli run --config CFG`` with its output appended to a
  log file; the caller waits for "iotserver ready" in that log.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import free_port, wait_for_sync
from helpers.tools import twistd

from iotserver.security.users import Role, User, hash_password, save_users

USER, PASSWORD = "eng", "engineer-pw"


class Server:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.data = tmp / "data"
        self.data.mkdir()
        save_users(self.data / "users.toml",
                   [User(USER, Role.ENGINEER, hash_password(PASSWORD, n=2**10))])
        self.cfg = tmp / "server.toml"
        self.cfg.write_text(f"""
[server]
data_dir = "{self.data}"

[[tags]]
path = "Site/Setpoint"
type = "float64"
access = "readwrite"
range = [0, 100]
initial = 10

[mqtt]
[[mqtt.listeners]]
endpoint = "tcp:{self.port}:interface=127.0.0.1"

[[mqtt.acl]]
user = "{USER}"
topic = "plant/#"
access = "readwrite"
""")
        self.proc: subprocess.Popen[str] | None = None
        self.log = tmp / "server.log"

    def start(self) -> None:
        out = self.log.open("a")
        self.proc = subprocess.Popen(
            twistd("--config", str(self.cfg)), stdout=out, stderr=subprocess.STDOUT, text=True)
        proc = self.proc
        wait_for_sync(lambda: "iotserver ready" in self.log.read_text() or proc.poll() is not None,
                      30, "the server")
        assert "iotserver ready" in self.log.read_text(), (
            "server did not start:\n" + self.log.read_text())

    def stop(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=15)
        # the next start must not find "ready" from this run
        self.log.write_text(self.log.read_text().replace("iotserver ready", "(was ready)"))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def spawn(cfg: Path, data_dir: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, IOTSERVER_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1")
    out = log_path.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "iotserver.cli", "run", "--config", str(cfg)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cfg.parent)
    finally:
        out.close()
