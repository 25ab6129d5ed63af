"""The ``[console]`` section: an SSH console (a Python prompt inside the running server).

The console runs code with the server's own privileges, so it is only ever reachable with
credentials: SSH keys listed in an authorized_keys file and, when ``password_login`` is on,
passwords of users whose role is ``admin`` in the user file. There is no anonymous login.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from iotserver.confparse import Reader
from iotserver.edge import limits as edge_limits
from iotserver.edge.endpoint import Endpoint, parse_endpoint

DEFAULT_ENDPOINT = "tcp:2222:interface=127.0.0.1"

# Appended to the built-in default configuration: the console on loopback only. Nobody can log
# in until a public key is added to <data_dir>/console/authorized_keys (the server says how).
DEFAULT_TOML = f"""\
[console]
endpoint = "{DEFAULT_ENDPOINT}"
"""

# Kinds that make sense for SSH: it brings its own encryption, so ssl:/tls: would wrap it twice.
_CONSOLE_ENDPOINT_KINDS = ("tcp", "tcp6", "unix", "systemd")


@dataclass(frozen=True)
class ConsoleConfig:
    """Parsed ``[console]``; paths left as None default to files under ``server.data_dir``."""

    endpoint: str = DEFAULT_ENDPOINT
    authorized_keys: Path | None = None
    password_login: bool = False
    host_key: Path | None = None
    max_script_bytes: int = 1 << 20  # a script piped on stdin (ssh host < script.py)
    #: connection limits and timeouts; ``login_timeout`` is the SSH login grace time
    limits: edge_limits.Limits = edge_limits.CONSOLE

    @property
    def ep(self) -> Endpoint:
        return parse_endpoint(self.endpoint)

    def authorized_keys_path(self, data_dir: Path) -> Path:
        return self.authorized_keys or data_dir / "console" / "authorized_keys"

    def host_key_path(self, data_dir: Path) -> Path:
        return self.host_key or data_dir / "console" / "ssh_host_ed25519_key"

    def summary(self) -> list[str]:
        where = self.ep.where()
        keys = str(self.authorized_keys or "<data_dir>/console/authorized_keys")
        lim = self.limits
        lines = [f"SSH console on {self.endpoint} ({where}, at most {lim.max_connections} "
                 f"connections, login grace {lim.login_timeout:g} s)",
                 f"authorized keys: {keys}"]
        lines.append(
            "password login: admin users of the user file" if self.password_login
            else "password login: off"
        )
        return lines


def parse(r: Reader) -> ConsoleConfig:
    """Read ``[console]``; unknown keys and unusable endpoints are errors naming the key."""
    endpoint = r.endpoint("endpoint", DEFAULT_ENDPOINT, kinds=_CONSOLE_ENDPOINT_KINDS,
                          why=f"SSH encrypts the connection itself (e.g. {DEFAULT_ENDPOINT!r})")
    cfg = ConsoleConfig(
        endpoint=endpoint,
        authorized_keys=r.path("authorized_keys", None),
        password_login=r.bool("password_login", False),
        host_key=r.path("host_key", None),
        limits=edge_limits.read_limits(r, edge_limits.CONSOLE),
        max_script_bytes=r.int("max_script_bytes", 1 << 20, min=1024, max=64 << 20),
    )
    r.done()
    return cfg
