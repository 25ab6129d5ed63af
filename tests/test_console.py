"""The SSH console driven by the real OpenSSH client: exec, interactive pty, refused logins."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from helpers import wait_for
from helpers.console import (
    NEEDS_SSH,
    SSH_COMMON,
    Console,
    console_config,
    keygen,
    start_console,
    stop_console,
)
from twisted.internet import reactor, threads
from twisted.logger import LogLevel, globalLogPublisher

from iotserver import app
from iotserver.security.users import Role, User, hash_password, save_users

pytestmark = NEEDS_SSH


@pytest.fixture(scope="module", autouse=True)
def _tcp_fd_reserved() -> None:
    """Twisted reserves one fd (/dev/null) process-wide on its first listenTCP; not our leak."""
    from twisted.internet.protocol import Factory

    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.async_yield_fixture
async def console(tmp_path: Path) -> AsyncIterator[Console]:
    c = await start_console(tmp_path, 0)
    yield c
    await stop_console(c)


@pytest_twisted.ensureDeferred
async def test_exec_expression_statements_and_errors(console: Console) -> None:
    out, err, code = await console.ssh("6 * 7")
    assert (out, code) == ("42\n", 0), err
    out, err, code = await console.ssh(
        "x = tags.read('Site/Counter').value; print('x is', x); x + 1")
    assert (out, code) == ("x is 3\n4\n", 0), err
    out, err, code = await console.ssh("print('before'); 1 / 0")
    assert code == 1
    assert out == "before\n"
    assert err.strip() == "ZeroDivisionError: division by zero"
    out, err, code = await console.ssh("tags.read('No/Such')")
    assert code == 1 and err.strip() == "NotFound: unknown tag 'No/Such'"
    out, err, code = await console.ssh("exit(3)")
    assert code == 3
    out, err, code = await console.ssh("import sys; sys.exit(5)")  # never stops the server
    assert code == 5
    out, err, code = await console.ssh("exit('bye')")
    assert (err, code) == ("bye\n", 1)
    out, err, code = await console.ssh("1 +")
    assert code == 1 and "SyntaxError" in err and "Traceback" not in err
    assert (await console.ssh("'still here'"))[0] == "'still here'\n"
    assert console.errors == []


@pytest_twisted.ensureDeferred
async def test_exec_write_waits_for_the_quality(console: Console) -> None:
    out, _, code = await console.ssh("tags.write('Site/Setpoint', 42.5)")
    assert (out, code) == ("Site/Setpoint <- 42.5: Good\n", 0)
    assert console.core.store.read("Site/Setpoint").value == pytest.approx(42.5)
    out, _, code = await console.ssh("tags.write('Site/Setpoint', 500)")
    assert (out, code) == ("Site/Setpoint <- 500: BadOutOfRange\n", 1)
    out, _, code = await console.ssh("h = history('Site/Setpoint'); list(h.values)")
    assert code == 0 and "42.5" in out
    out, _, code = await console.ssh("tags.show('Site/*')")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["path", "value", "quality"]
    assert lines[2].startswith("Site/Setpoint") and "42.5 bar" in lines[2] and "Good" in lines[2]
    out, _, code = await console.ssh("wait(__import__('asyncio').sleep(0, 'slept'))")
    assert (out, code) == ("'slept'\n", 0)
    # a coroutine that never finishes, against wait()'s own timeout
    out, err, code = await console.ssh("wait(__import__('asyncio').Event().wait(), timeout=0.1)")
    assert code == 1 and "TimeoutError" in err


@pytest_twisted.ensureDeferred
async def test_wrong_key_is_refused(console: Console, tmp_path: Path) -> None:
    from twisted.logger import formatEvent

    stranger = keygen(tmp_path / "id_stranger")
    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        seen.append(formatEvent(event) or "")

    globalLogPublisher.addObserver(observe)
    try:
        out, err, code = await console.ssh("1", key=stranger, user="mallory")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert code == 255 and out == ""
    assert "Permission denied" in err
    # no password method offered while password_login is off
    assert "password" not in err
    assert any("offered for 'mallory' from 127.0.0.1 is not authorized" in line
               for line in seen)


def audit_records(console: Console) -> list[dict[str, Any]]:
    path = console.data / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest_twisted.ensureDeferred
async def test_key_login_and_write_are_audited(console: Console) -> None:
    """A successful key login is logged and audited as one (never as "not authorized"), and
    the session's writes carry its user, protocol and address."""
    from twisted.logger import formatEvent

    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        seen.append(formatEvent(event) or "")

    globalLogPublisher.addObserver(observe)
    try:
        _, err, code = await console.ssh("wait(tags.write('Site/Setpoint', 42.5))")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert code == 0, err
    assert not [line for line in seen if "not authorized" in line]
    assert any("console: 'admin' logged in from 127.0.0.1 (key, SHA256:" in line
               for line in seen)
    await console.core.audit.sync()
    records = audit_records(console)
    logins = [r for r in records if r["event"] == "login"]
    assert [(r["principal"], r["protocol"], r["peer"], r["method"], r["result"])
            for r in logins] == [("admin", "console", "127.0.0.1", "key", "ok")]
    writes = [r for r in records if r["event"] == "write"]
    assert len(writes) == 1
    w = writes[0]
    assert (w["principal"], w["protocol"], w["tag"], w["value"], w["result"]) == (
        "admin", "console", "Site/Setpoint", 42.5, "Good")
    assert w["peer"].startswith("127.0.0.1:")


def drive_pty(port: int, key: Path) -> tuple[bytes, int | None]:
    """An interactive session through a pty: expression, window resize, Ctrl-D (blocking)."""
    import fcntl
    import pty
    import select
    import signal
    import struct
    import subprocess
    import termios
    import time

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    args = ["ssh", "-tt", *SSH_COMMON, "-p", str(port), "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes", "-i", str(key), "admin@127.0.0.1"]
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    seen = b""

    def expect(token: bytes, timeout: float = 10.0) -> bool:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while token not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    seen += os.read(master, 65536)
                except OSError:
                    break
        return token in seen

    try:
        if expect(b">>> "):
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 132, 0, 0))
            proc.send_signal(signal.SIGWINCH)
            os.write(master, b"6 * 7\r")
            expect(b"42")
            os.write(master, b"tags.write('Site/Setpoint', 7)\r")
            expect(b"Good")
            os.write(master, b"\x04")  # Ctrl-D
        status = proc.wait(timeout=10)
        expect(b"\x00", 0.2)  # drain what is left
        return seen, status
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return seen, None
    finally:
        os.close(master)


@pytest_twisted.ensureDeferred
async def test_interactive_session_resize_and_ctrl_d(console: Console) -> None:
    seen, status = await threads.deferToThread(drive_pty, console.port, console.key)
    text = seen.decode("utf-8", "replace")
    assert "iotserver console" in text
    assert "42" in text
    assert "Site/Setpoint <- 7: Good" in text
    assert status == 0
    assert console.errors == []
    assert console.core.services["console"].sessions == set()


@pytest_twisted.ensureDeferred
async def test_password_login_admin_only(tmp_path: Path) -> None:
    users = tmp_path / "data" / "users.toml"
    users.parent.mkdir(parents=True)
    save_users(users, [User("boss", Role.ADMIN, hash_password("s3cret")),
                       User("eng", Role.ENGINEER, hash_password("engpw"))])
    askpass = tmp_path / "askpass.sh"
    askpass.write_text('#!/bin/sh\necho "$CONSOLE_TEST_PASSWORD"\n')
    askpass.chmod(0o700)
    c = await start_console(tmp_path, 0, "password_login = true", authorize=False)
    try:
        async def login(user: str, password: str) -> tuple[str, str, int]:
            env = {"PATH": os.environ.get("PATH", ""), "SSH_ASKPASS": str(askpass),
                   "SSH_ASKPASS_REQUIRE": "force", "CONSOLE_TEST_PASSWORD": password}
            extra = ["-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password",
                     "-o", "NumberOfPasswordPrompts=1"]
            return await c.ssh("'hello'", user=user, extra=extra, env=env)

        assert await login("boss", "s3cret") == ("'hello'\n", "", 0)
        _, err, code = await login("boss", "wrong")
        assert code == 255 and "Permission denied" in err
        _, err, code = await login("eng", "engpw")  # right password, role not allowed
        assert code == 255 and "Permission denied" in err
        assert c.errors == []
        await c.core.audit.sync()
        logins = [(r["principal"], r["method"], r["result"]) for r in audit_records(c)
                  if r["event"] == "login"]
        assert logins == [("boss", "password", "ok"), ("boss", "password", "failed"),
                          ("eng", "password", "denied")]
    finally:
        await stop_console(c)


@pytest_twisted.ensureDeferred
async def test_host_key_created_once_and_no_keys_warning(tmp_path: Path) -> None:
    warnings: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.warn:
            from twisted.logger import formatEvent

            warnings.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        c = await start_console(tmp_path, 0, authorize=False)
        fingerprint = c.core.services["console"].host_key_fingerprint
        host_key = c.data / "console" / "ssh_host_ed25519_key"
        assert stat.S_IMODE(host_key.stat().st_mode) == 0o600
        listed = subprocess.run(["ssh-keygen", "-lf", str(host_key) + ".pub"], check=True,
                                capture_output=True, text=True).stdout
        assert listed.split()[1] == fingerprint  # what ssh shows on first connection
        assert any("nobody can log in" in w and "authorized_keys" in w for w in warnings)
        _, err, code = await c.ssh("1")
        assert code == 255 and "Permission denied" in err
        await stop_console(c)
        root, core = app.build(console_config(tmp_path, 0), reactor)
        root.startService()
        await core.services["console"].started
        assert core.services["console"].host_key_fingerprint == fingerprint
        await root.stopService()
    finally:
        globalLogPublisher.removeObserver(observe)


@pytest_twisted.ensureDeferred
async def test_stop_closes_open_sessions(console: Console) -> None:
    from twisted.internet.defer import Deferred

    service = console.core.services["console"]
    running = Deferred.fromCoroutine(  # a session busy until it is closed
        console.ssh("wait(__import__('asyncio').Event().wait(), timeout=30)"))
    await wait_for(lambda: service.sessions, what="the console session")
    await service.stopService()
    out, _, code = await running
    assert code != 0 and out == ""
    assert service.sessions == set()


@pytest_twisted.ensureDeferred
async def test_port_in_use_is_a_clear_startup_error(tmp_path: Path) -> None:
    from twisted.internet.protocol import Factory

    from iotserver.lifecycle import StartupError

    blocker = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    busy = blocker.getHost().port
    root, core = app.build(console_config(tmp_path, busy), reactor)
    try:
        root.startService()
        service = core.services["console"]
        await service.started
        assert service.failure is not None and service.failure.check(StartupError)
        assert f"SSH console cannot listen on tcp:{busy}" in str(service.failure.value)
    finally:
        await root.stopService()
        await blocker.stopListening()


async def ssh_stdin(console: Console, script: bytes) -> tuple[str, str, int]:
    """``ssh host < script``: no command, stdin is not a terminal (the script travels on it)."""
    import asyncio

    from twisted.internet.defer import Deferred

    async def run() -> tuple[str, str, int]:
        proc = await asyncio.create_subprocess_exec(
            shutil.which("ssh") or "ssh", *SSH_COMMON, "-p", str(console.port),
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i", str(console.key),
            "admin@127.0.0.1", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={"PATH": os.environ.get("PATH", "")})
        out, err = await asyncio.wait_for(proc.communicate(script), 30)
        return out.decode(), err.decode(), int(proc.returncode or 0)

    return await Deferred.fromFuture(asyncio.ensure_future(run()))


@pytest_twisted.ensureDeferred
async def test_exec_fails_when_any_write_failed(console: Console) -> None:
    """Not only the last value counts: a refused write earlier in the script exits 1."""
    out, err, code = await console.ssh(
        "tags.write('Site/Setpoint', 500); tags.write('Site/Setpoint', 20)")
    assert code == 1, (out, err)
    assert out == "Site/Setpoint <- 20: Good\n"
    assert err == "write failed: Site/Setpoint <- 500: BadOutOfRange\n"
    out, err, code = await console.ssh(
        "for v in (30, 40): tags.write('Site/Setpoint', v)\nprint('done')")
    assert (out, err, code) == ("done\n", "", 0)
    assert console.core.store.read("Site/Setpoint").value == pytest.approx(40)
    # a raise after a good write: the short error, exit 1, and the write stays done
    out, err, code = await console.ssh("tags.write('Site/Setpoint', 41); tags.read('No/Such')")
    assert (out, code) == ("", 1) and err == "NotFound: unknown tag 'No/Such'\n"
    assert console.errors == []


SCRIPT = b"""\
def ramp(path, values):
    for v in values:
        tags.write(path, v)
    return len(values)

n = ramp('Site/Setpoint', [11, 12, 13])
print('wrote', n)
"""


@pytest_twisted.ensureDeferred
async def test_script_piped_on_stdin(console: Console) -> None:
    out, err, code = await ssh_stdin(console, SCRIPT)
    assert (out, err, code) == ("wrote 3\n", "", 0)
    assert console.core.store.read("Site/Setpoint").value == pytest.approx(13)
    out, err, code = await ssh_stdin(console, SCRIPT.replace(b"13]", b"999]"))
    assert code == 1 and out == "wrote 3\n", (out, err)
    assert err == "write failed: Site/Setpoint <- 999: BadOutOfRange\n"
    out, err, code = await ssh_stdin(console, b"x = 1\nraise ValueError('bad recipe')\n")
    assert (out, err, code) == ("", "ValueError: bad recipe\n", 1)
    out, err, code = await ssh_stdin(console, b"def f(:\n")
    assert code == 1 and "SyntaxError" in err and "<stdin>" in err and "Traceback" not in err
    assert console.errors == []


@pytest_twisted.ensureDeferred
async def test_script_on_stdin_is_bounded(tmp_path: Path, free_port: int) -> None:
    c = await start_console(tmp_path, free_port, "max_script_bytes = 1024")
    try:
        _, err, code = await ssh_stdin(c, b"x = 1\n" * 400)
    finally:
        await stop_console(c)
    assert code == 1 and err == "script longer than console.max_script_bytes (1024)\n", err
