"""The server as users start it: twistd with the plugin, and the iotserver command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers.tools import our, twistd

TIMEOUT = 30


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["IOTSERVER_DATA_DIR"] = str(tmp_path / "data")
    return env


def _wait_for(proc: subprocess.Popen[str], needle: str, lines: list[str]) -> bool:
    deadline = time.monotonic() + TIMEOUT
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            return False
        lines.append(line)
        if needle in line:
            return True
    return False


def test_twistd_starts_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[simulator]\nenabled = true\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "twisted", "--help"], stdout=subprocess.DEVNULL
    )  # warm import caches so the timed part below is the server alone
    proc.wait(TIMEOUT)
    proc = subprocess.Popen(
        twistd("--config", str(cfg)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(tmp_path),
        cwd=tmp_path,
    )
    lines: list[str] = []
    try:
        assert _wait_for(proc, "iotserver ready", lines), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=TIMEOUT)  # bounded: a hang fails here
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = "".join(lines) + out
    # twistd re-raises the signal it stopped on (so init systems see "terminated by SIGTERM")
    assert proc.returncode in (0, -signal.SIGTERM), log
    assert "Traceback" not in log and "Unhandled" not in log
    assert "Server Shut Down" in log
    assert (tmp_path / "data" / "memory_tags.sqlite3").exists()


def test_iotserver_run_is_the_twistd_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[simulator]\nenabled = true\n")
    proc = subprocess.Popen(
        [our("iotserver"), "run", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(tmp_path),
        cwd=tmp_path,
    )
    lines: list[str] = []
    try:
        assert _wait_for(proc, "iotserver ready", lines), "".join(lines)
        assert any("AsyncioSelectorReactor" in line for line in lines)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Server Shut Down" in out
    assert not (tmp_path / "twistd.pid").exists()


def test_wrong_reactor_is_one_clear_line(tmp_path: Path) -> None:
    res = subprocess.run(
        [our("twistd"), "-n", "--pidfile=", "iotserver"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(tmp_path),
        cwd=tmp_path,
    )
    assert res.returncode == 2
    assert "--reactor=asyncio" in res.stderr and "Traceback" not in res.stderr + res.stdout


def test_bad_config_names_key_without_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[server]\nname = "x"\n\n[[tags]]\npath = "A/B"\ntype = "float99"\n')
    res = subprocess.run(
        twistd("--config", str(cfg)),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(tmp_path),
        cwd=tmp_path,
    )
    assert res.returncode == 1
    assert f"{cfg}:6: tags[0].type: expected one of" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_check_config_command(tmp_path: Path) -> None:
    good = subprocess.run(
        [our("iotserver"), "check-config"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(tmp_path),
    )
    assert good.returncode == 0 and "simulator: on" in good.stdout
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[simulator]\nenabeld = true\n")
    bad = subprocess.run(
        [our("iotserver"), "check-config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(tmp_path),
    )
    assert bad.returncode == 1
    assert bad.stderr.strip() == (
        f"iotserver: configuration error: {cfg}:2: simulator.enabeld: unknown key"
    )


def test_plugin_is_listed_by_twistd() -> None:
    res = subprocess.run([our("twistd"), "--help"], capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert "iotserver" in res.stdout


def test_acknowledged_memory_write_survives_kill_9(tmp_path: Path) -> None:
    """A child acknowledges memory-tag writes, then dies by SIGKILL: every ack must be on disk.

    The child prints a value only once its write has come back Good (the acknowledgement a
    client would get), so the newest printed value is the newest acknowledged one.
    """
    db = tmp_path / "m.sqlite3"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
from twisted.internet import reactor
from iotserver.tags.model import TagDef, DataType, Access
from iotserver.tags.store import TagStore, MemoryOwner
from iotserver.tags.persist import MemoryTagPersistence
from pathlib import Path
store = TagStore(reactor)
store.register_owner("memory", MemoryOwner(store, MemoryTagPersistence(Path({str(db)!r}))))
store.define(TagDef(path="S/x", data_type=DataType.INT64, access=Access.READ_WRITE, persist=True))
def write(i):
    store.write("S/x", i).addCallback(acked, i)
def acked(quality, i):
    print(i, quality.name, flush=True)  # the acknowledgement
    if i < 100_000:  # bounded: the parent kills it long before
        write(i + 1)
reactor.callWhenRunning(write, 1)
reactor.run()
""",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    acked = 0
    try:
        for line in child.stdout:
            number, quality = line.split()
            assert quality == "GOOD"  # only acknowledged writes are counted
            acked = int(number)
            if acked >= 50:
                break
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(TIMEOUT)
        child.stdout.close()
    assert acked >= 50  # the writes were acknowledged
    from iotserver.tags.persist import MemoryTagPersistence

    p = MemoryTagPersistence(db)
    try:
        saved = p.load_all()["S/x"][0]
    finally:
        p.close()
    assert saved >= acked
