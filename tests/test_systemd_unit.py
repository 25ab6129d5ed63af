"""scripts/iotserver.service as written: systemd accepts it, and its ExecStartPre, ExecStart
(with the ``--logfile`` that docs/operations.md says to append) and ExecReload lines work.

Only the installation paths are substituted: /opt/iotserver/bin is this Python's bin directory,
/etc/iotserver/iotserver.toml a configuration in the test's folder, $MAINPID the server's pid.
"""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from helpers.tools import BIN

from iotserver.security.users import Role, User, hash_password, save_users

UNIT = Path(__file__).resolve().parent.parent / "scripts" / "iotserver.service"
TIMEOUT = 60


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def _localize(line: str, cfg: Path, pid: int | None = None) -> list[str]:
    line = line.replace("/opt/iotserver/bin/", f"{BIN}/")
    line = line.replace("/etc/iotserver/iotserver.toml", str(cfg))
    if pid is not None:
        line = line.replace("$MAINPID", str(pid))
    return shlex.split(line)


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze not installed (scripts/bootstrap.sh installs systemd)"
    unit = tmp_path / "iotserver.service"
    unit.write_text(UNIT.read_text().replace("/opt/iotserver/bin/", f"{BIN}/"))
    res = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                         timeout=TIMEOUT)
    problems = [ln for ln in (res.stdout + res.stderr).splitlines() if str(unit) in ln]
    assert res.returncode == 0 and not problems, res.stdout + res.stderr


def test_unit_lines_run_as_written(tmp_path: Path) -> None:
    service = _unit()["Service"]
    assert service["Type"] == "simple" and service["User"] == "iotserver"
    assert service["KillSignal"] == "SIGTERM" and service["Restart"] == "on-failure"
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    save_users(data / "users.toml", [User("ops", Role.ADMIN, hash_password("x" * 12, n=16, r=1,
                                                                           p=1))])
    cfg = tmp_path / "iotserver.toml"
    cfg.write_text(f'[server]\ndata_dir = "{data}"\n\n[simulator]\nenabled = true\n')
    env = {**os.environ, **dict([service["Environment"].split("=", 1)])}

    pre = subprocess.run(_localize(service["ExecStartPre"], cfg), capture_output=True, text=True,
                         timeout=TIMEOUT, env=env, cwd=tmp_path)
    assert pre.returncode == 0 and f"{cfg}: OK" in pre.stdout, pre.stdout + pre.stderr

    # docs/operations.md: "add --logfile /var/log/iotserver/iotserver.log to ExecStart"
    log = tmp_path / "iotserver.log"
    argv = [*_localize(service["ExecStart"], cfg), "--logfile", str(log)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            cwd=tmp_path)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (log.exists() and "iotserver ready" in log.read_text()):
            assert proc.poll() is None, log.read_text() if log.exists() else "no log"
            assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
            time.sleep(0.1)
        reload = subprocess.run(_localize(service["ExecReload"], cfg, proc.pid), timeout=TIMEOUT)
        assert reload.returncode == 0
        while "reloaded 1 users" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        proc.send_signal(getattr(signal, service["KillSignal"]))
        code = proc.wait(float(service["TimeoutStopSec"]))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # systemd counts "killed by SIGTERM" as a clean stop, like exit status 0
    assert code in (0, -signal.SIGTERM), code
    text = log.read_text()
    assert "Server Shut Down" in text and "Traceback" not in text, text
    assert not (tmp_path / "twistd.pid").exists()
