"""Every command in README.md and docs/ that can run on the built-in default is run here, against
the built-in default configuration (``iotserver show-default-config``) on free ports, and its
output is checked. Commands that cannot (root installs, a production config, benchmarks) are
listed with the reason; a new command block in a doc fails the first test until it is sorted.

The commands run as written, with only these substitutions: the default ports become the free
ones, ``~/.local/state/iotserver`` the test's data directory, ``~/.ssh`` a key in the test's
folder, ``.venv/bin/`` and a bare ``iotserver`` this Python's bin directory; ``mosquitto_sub``
gets ``-C 1 -W 20`` (one message, bounded wait), a password prompt reads ``the password`` from
stdin, ``ssh`` gets options that keep it away from the user's own known_hosts.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.tools import BIN, our

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMANDS = ("mbpoll", "iotserver", "mosquitto_sub", "mosquitto_pub", "mosquitto_rr", "ssh")
DEFAULT_PORTS = (1883, 8883, 5020, 4840, 2222)
PASSWORD = "the password"  # as written in docs/mqtt.md


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    text: str

    @property
    def first(self) -> str:
        return next(ln for ln in self.text.splitlines() if ln.strip() and not ln.startswith("#"))


def command_blocks() -> list[Block]:
    """Fenced ``sh`` blocks, and unlabelled blocks whose first line is one of our commands."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
            lang, body = m.group(1), m.group(2)
            lines = [ln for ln in body.splitlines() if ln.strip() and not ln.startswith("#")]
            if not lines or lang not in ("sh", ""):
                continue
            if lang == "" and lines[0].split()[0] not in COMMANDS:
                continue  # output, a tree, a table
            out.append(Block(doc.relative_to(ROOT).as_posix(), text[: m.start()].count("\n") + 1,
                             body))
    return out


# (doc, start of the block's first command) -> why it does not run on the built-in default.
NOT_ON_DEFAULT: dict[tuple[str, str], str] = {
    ("README.md", "bash scripts/bootstrap.sh"): "the install itself (.ci/run runs it)",
    ("README.md", ".venv/bin/twistd -n"): "starts the default: the fixture below does that",
    ("README.md", ".venv/bin/python -m pytest"): "this test suite (.ci/run runs it)",
    ("README.md", ".venv/bin/python -m pip install"): "lint install (.ci/run runs it)",
    ("docs/configuration.md", "twistd -n --reactor=asyncio iotserver --config /etc"):
        "a production config in /etc",
    ("docs/operations.md", "sudo useradd"): "root install steps",
    ("docs/operations.md", "sudo /opt/iotserver"): "root install steps",
    ("docs/operations.md", "sudo install"): "root install steps",
    ("docs/operations.md", "sudo -u iotserver"): "root install steps",
    ("docs/operations.md", "sudo systemctl"): "systemd (the unit is tested in test_systemd_unit)",
    ("docs/operations.md", "sudo nft"): "firewall rules (root)",
    ("docs/operations.md", "sudo -u iotserver sqlite3"): "backup of a production data dir",
    ("docs/operations.md", "iotserver users add"): "the service user's production data dir",
    ("docs/security.md", "sudo -u iotserver"): "a production config in /etc",
    ("docs/opcua.md", "iotserver certs list"):
        "a production config; needs a rejected client (test_trustcli, test_opcua_nodeopcua)",
    ("docs/operations.md", "nft "): "firewall rules (root)",
    ("docs/modbus.md", "iotserver sim-plc"): "a simulated PLC, not the server (test_sim_plc)",
    ("docs/performance.md", "python benchmarks/"): "benchmarks (test_benchmarks runs --help)",
}


def _classify(block: Block) -> tuple[str, str] | None:
    for key in list(RUN) + list(NOT_ON_DEFAULT):
        if key[0] == block.doc and block.first.startswith(key[1]):
            return key
    return None


def test_every_command_block_is_run_or_explained() -> None:
    unsorted = [f"{b.doc}:{b.line}: {b.first}" for b in command_blocks() if _classify(b) is None]
    assert not unsorted, "command blocks neither run here nor listed in NOT_ON_DEFAULT:\n" + \
        "\n".join(unsorted)


# ------------------------------------------------------------------------------ the default


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Default:
    proc: subprocess.Popen[bytes]
    ports: dict[int, int]
    data: Path
    home: Path
    log: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
                "IOTSERVER_DATA_DIR": str(self.data), "HOME": str(self.home)}

    def localize(self, script: str) -> str:
        """The substitutions listed in the module docstring."""
        script = re.sub(r"^iotserver run &.*$", "", script, flags=re.M)  # the fixture runs it
        script = re.sub(r"\s{2,}#.*$", "", script, flags=re.M)  # comments after a command
        # a password prompt reads the password from stdin instead
        script = re.sub(r"^(iotserver users (add|passwd) \S+)(.*)$",
                        r'\1 --password-stdin\3 <<< "$DOC_PASSWORD"', script, flags=re.M)
        # SIGHUP re-reads the user file: wait until the log says so before the next line
        script = script.replace(
            "kill -HUP <server pid>",
            f"n=$(grep -c 'reloaded .* users' {self.log} || true); kill -HUP {self.proc.pid}; "
            f"for _ in $(seq 200); do [ $(grep -c 'reloaded .* users' {self.log} || true) -gt "
            f"$n ] && break; sleep 0.05; done")
        script = re.sub(r"\b({})\b".format("|".join(map(str, self.ports))),
                        lambda m: str(self.ports[int(m.group(1))]), script)
        script = script.replace("~/.local/state/iotserver", str(self.data))
        script = script.replace("~/.ssh/", f"{self.home}/.ssh/")
        script = script.replace(".venv/bin/", f"{BIN}/")
        script = re.sub(r"^iotserver ", f"{our('iotserver')} ", script, flags=re.M)
        script = re.sub(r"\bmosquitto_sub ", "mosquitto_sub -C 1 -W 20 ", script)
        script = script.replace(
            "ssh -p", f"ssh -o BatchMode=yes -o IdentitiesOnly=yes -i {self.home}/.ssh/id_ed25519 "
            f"-o StrictHostKeyChecking=no -o UserKnownHostsFile={self.home}/known_hosts -p")
        # a background subscriber must be subscribed before the next line publishes
        script = re.sub(
            r"^(mosquitto_sub .*?)\s*&\s*$",
            r"\1 -d > sub.out 2>&1 &\n"
            r"for _ in $(seq 200); do grep -q SUBACK sub.out && break; sleep 0.05; done",
            script, flags=re.M)
        return script

    def run(self, script: str, data_dir: Path | None = None) -> str:
        env = {**self.env(), "DOC_PASSWORD": PASSWORD}
        if data_dir is not None:
            env["IOTSERVER_DATA_DIR"] = str(data_dir)
        subprocess.run(["rm", "-f", "sub.out"], cwd=self.home, check=True)
        res = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", self.localize(script) + "\nwait\n"
             "[ ! -f sub.out ] || grep -v '^Client ' sub.out"],
            stdin=subprocess.DEVNULL, capture_output=True, env=env, cwd=self.home,
            timeout=120)
        out = res.stdout.decode() + res.stderr.decode()
        assert res.returncode == 0, f"{script}\nexit {res.returncode}:\n{out}"
        return out


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Default]:
    tmp = tmp_path_factory.mktemp("docs")
    ports = dict(zip(DEFAULT_PORTS, _free_ports(len(DEFAULT_PORTS)), strict=True))
    text = subprocess.run([our("iotserver"), "show-default-config"], capture_output=True,
                          text=True, check=True).stdout
    for old, new in ports.items():
        text, n = re.subn(rf"(?<=:){old}(?=[:/])", str(new), text)  # in endpoints only
        assert n == 1, f"port {old} is in {n} endpoints of the default"
    cfg = tmp / "default.toml"
    cfg.write_text(text)
    log = tmp / "server.log"
    data = tmp / "data"
    home = tmp / "home"
    home.mkdir()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [our("twistd"), "-n", "--reactor=asyncio", "--pidfile=", "iotserver", "--config",
             str(cfg)], stdout=out, stderr=subprocess.STDOUT, cwd=tmp,
            env={**os.environ, "IOTSERVER_DATA_DIR": str(data)})
    srv = Default(proc, ports, data, home, log)
    try:
        deadline = time.monotonic() + 60
        while b"iotserver ready" not in log.read_bytes():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield srv
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _floats(text: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2))
            for m in re.finditer(r"^\[(\d+)\]:\s+(-?[\d.]+)\s*$", text, re.M)}


def check_readme_clients(out: str) -> bool:
    assert re.search(r"^iotserver/tags/Plant/Line1/\S+ \{\"v\":", out, re.M), out
    assert re.search(r"^iotserver/tags/Plant/Utilities/Heartbeat \{\"v\":\d+", out, re.M), out
    # mbpoll: pump speed, speed setpoint (1480 at start), current, flow rate, aligned
    values = _floats(out)
    assert sorted(values) == [0, 2, 4, 6], out
    assert values[2] == 1480, out
    assert 1000 < values[0] < 2000 and 0 < values[4] < 100 and 0 < values[6] < 120, out
    assert "ns=2;s=Plant/Line1/Pump1/SpeedSetpoint" in out and "1480.0" in out, out
    assert re.search(r"^1[0-9]{3}\.\d+$", out, re.M), out  # uaread of the speed
    return True


def check_mbpoll_doc(out: str) -> bool:
    assert re.search(r"^\[1\]:\s+1[0-9]{3}(\.\d+)?$", out, re.M), out  # speed, reference 1
    assert re.search(r"^\[3\]:\s+1480$", out, re.M), out  # the setpoint before the write
    assert re.search(r"Written 1 references", out), out
    assert re.search(r"^\[100\]:\s+1[0-9]{4}$", out, re.M), out  # 0.1 rpm per count
    assert re.search(r"^\[0\]:\s+[01]$", out, re.M), out  # discrete inputs
    return True


def check_plc7(out: str, srv: Default) -> bool:
    out = srv.run("mosquitto_sub -h 127.0.0.1 -p 1883 "
                  "-t iotserver/tags/Plant/Line1/Pump1/SpeedSetpoint")
    assert '{"v":1510' in out, out
    return True


@dataclass(frozen=True)
class Run:
    check: Callable[[str, Default], object]
    own_data_dir: bool = False  # user-file commands that need no server


# (doc, start of the first command) -> how its output is checked; run in document order.
RUN: dict[tuple[str, str], Run] = {
    ("README.md", "mosquitto_sub -h 127.0.0.1 -p 1883 -t 'iotserver/tags/Plant/Line1/#'"):
        Run(lambda out, _: check_readme_clients(out)),
    ("README.md", "install -d -m 0700 ~/.ssh"):
        Run(lambda out, _: re.search(r"Plant/Line1/Pump1/Speed\s.*rpm", out)),
    ("docs/modbus.md", "iotserver certs client scada-1"):
        Run(lambda out, srv: (srv.data / "tls/clients/panel-3.pem").is_file()),
    ("docs/modbus.md", "mbpoll -m tcp -p 5020 -a 1 -r 1 -c 2"):
        Run(lambda out, _: check_mbpoll_doc(out)),
    ("docs/mqtt.md", "iotserver run &"):
        Run(lambda out, _: re.search(r"^iotserver/tags/\S+ \{\"v\":", out, re.M)),
    ("docs/mqtt.md", "iotserver users add erik --role engineer          # asks"):
        Run(lambda out, _: re.search(r'SpeedSetpoint/set/result \{"ok":true\}', out)),
    ("docs/mqtt.md", "mosquitto_sub -h 127.0.0.1 -p 8883"):
        Run(lambda out, _: re.search(r"^iotserver/tags/\S+ \{\"v\":", out, re.M)),
    ("docs/mqtt.md", "iotserver users add olga"):
        Run(lambda out, _: re.search(r"olga\s+operator", out) and re.search(r"erik\s+engineer",
                                                                             out),
            own_data_dir=True),
    ("docs/mqtt.md", "iotserver certs client plc7"): Run(check_plc7),
    ("docs/mqtt.md", "mosquitto_rr"): Run(lambda out, _: '{"ok":true}' in out),
    ("docs/security.md", "openssl s_client -connect 127.0.0.1:8883 -brief </dev/null"):
        Run(lambda out, _: "Protocol version: TLSv1.3" in out and "AES128-SHA refused" in out),
    ("docs/operations.md", "ssh -p 2222 admin@127.0.0.1 'tags.write("):
        Run(lambda out, _: "write failed" not in out
            and '"Plant/Line1/Press1/TemperatureSetpoint": 120' in out),
}


def _run_blocks() -> list[Block]:
    return [b for b in command_blocks() if (key := _classify(b)) is not None and key in RUN]


@pytest.mark.interop
@pytest.mark.parametrize("block", _run_blocks(), ids=lambda b: f"{b.doc}:{b.line}")
def test_documented_commands_on_the_default(block: Block, default: Default,
                                            tmp_path: Path) -> None:
    key = _classify(block)
    assert key is not None
    spec = RUN[key]
    out = default.run(block.text, data_dir=tmp_path / "data" if spec.own_data_dir else None)
    assert spec.check(out, default), out
