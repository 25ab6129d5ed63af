"""Event-loop responsiveness under a flood of failed logins: MQTT, OPC UA and the SSH console.

One server process (``benchmarks/e2e/server_child.py``: ``app.build`` on the asyncio reactor,
users with the real scrypt cost) serves MQTT, OPC UA (policy None, clear-text passwords) and the
console (password logins on). A raw-socket MQTT client sends PINGREQ every 10 ms and times each
PINGRESP: that round trip is how long the event loop takes to answer a client. Phases of
``--seconds`` each, in one run:

* ``baseline``: pings only;
* ``mqtt``: CONNECTs with wrong passwords, from 2 threads, each attempt from another loopback
  source address (127.0.0.2 ...) and under another user name, so that the throttle lets them
  through and every one costs a real scrypt check (the worst case for the verifier);
* ``mqtt-1-address``: the same flood from 127.0.0.1 only (what one attacking host achieves);
* ``opcua``: asyncua clients (2 at once) activating sessions with wrong passwords;
* ``console``: OpenSSH clients (2 at once) with wrong passwords (SSH_ASKPASS);
* ``all``: the three floods at once.

The MQTT phases are then repeated against mosquitto (the peer: a password file, anonymous
pinger), with the same clients, and the p99 ratios printed. Printed per phase: ping p50 / p99 /
max (ms) and the ratio to the baseline, failed login
attempts per second seen by the clients, the server's password checks (hashed, refused by
the throttle), and the server's CPU. ``--server-root DIR`` runs the server of another checkout
(e.g. the previous release) for a before/after comparison in the same run conditions.

Run: ``python benchmarks/bench_login_flood.py [--quick] [--seconds 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "e2e"))

from common import (  # noqa: E402
    ProcStat,
    ServerProcess,
    free_port,
    pct,
    print_header,
    read_packet,
    table,
)

USER, PASSWORD = "eng", "engineer-password"
PING_INTERVAL = 0.01


def write_config(data: Path, ports: dict[str, int], login: str = "") -> Path:
    from iotserver.security.users import Role, User, hash_password, save_users

    data.mkdir(parents=True, exist_ok=True)
    save_users(data / "users.toml", [User(USER, Role.ENGINEER, hash_password(PASSWORD)),
                                     User("admin", Role.ADMIN, hash_password(PASSWORD))])
    (data / "console").mkdir(exist_ok=True)
    path = data / "bench.toml"
    path.write_text(f"""
[server]
data_dir = "{data}"

[simulator]
enabled = false

[mqtt]
sys_interval = 0

[[mqtt.listeners]]
endpoint = "tcp:{ports['mqtt']}:interface=127.0.0.1"
allow_anonymous = true

[opcua]
endpoint = "opc.tcp://127.0.0.1:{ports['opcua']}/iotserver"
security_policies = ["None"]

[console]
endpoint = "tcp:{ports['console']}:interface=127.0.0.1"
password_login = true
{login}
""")
    return path


class OtherServer(ServerProcess):
    """``server_child.py`` of another checkout (its own code on its own sys.path)."""

    def __init__(self, root: Path, config_path: Path, log_path: Path) -> None:
        super().__init__(config_path, log_path)
        self.root = root.resolve()

    def start(self, timeout: float = 180.0) -> dict[str, Any]:
        cmd = [sys.executable, "-u", str(self.root / "benchmarks" / "e2e" / "server_child.py"),
               "--config", str(self.config_path)]
        env = dict(os.environ, PYTHONPATH=str(self.root))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log_path.open("ab"),
                                     stdin=subprocess.DEVNULL, env=env)
        msg = self._read_json(timeout, "ready")
        if msg is None:
            self.kill()
            raise RuntimeError("server did not start; log:\n" + self.log_tail())
        return msg


# --------------------------------------------------------------------------- the pinger


class Pinger(threading.Thread):
    """PINGREQ every 10 ms on one anonymous MQTT 3.1.1 connection; round trips in ms."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        from iotserver.mqtt.codec import encode
        from iotserver.mqtt.packets import MQTT_3_1_1, Connect

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(encode(Connect(client_id="pinger", keepalive=0), MQTT_3_1_1))
        self.buf = bytearray()
        first, body, _ = read_packet(self.sock, self.buf)
        if first != 0x20 or body[1] != 0:
            raise SystemExit(f"pinger refused: {body!r}")
        self.samples: list[float] = []
        self.recording = False
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            t0 = time.perf_counter()
            self.sock.sendall(b"\xc0\x00")
            first, _, _ = read_packet(self.sock, self.buf)
            if first == 0xD0 and self.recording:
                self.samples.append((time.perf_counter() - t0) * 1000)
            time.sleep(PING_INTERVAL)

    def window(self, seconds: float) -> list[float]:
        self.samples = []
        self.recording = True
        time.sleep(seconds)
        self.recording = False
        return list(self.samples)


# --------------------------------------------------------------------------- floods


class Flood:
    """``attempt(i)`` repeated from ``threads`` threads until stopped; counts attempts."""

    def __init__(self, name: str, attempt: Callable[[int], None], threads: int = 2) -> None:
        self.name = name
        self.attempt = attempt
        self.count = 0
        self.errors = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True)
                         for k in range(threads)]

    def _run(self, k: int) -> None:
        i = k
        while not self._stop.is_set():
            try:
                self.attempt(i)
            except Exception:
                with self._lock:
                    self.errors += 1
            with self._lock:
                self.count += 1
            i += len(self._threads)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def mqtt_attempt(port: int, spread: bool) -> Callable[[int], None]:
    from iotserver.mqtt.codec import encode
    from iotserver.mqtt.packets import MQTT_3_1_1, Connect

    def attempt(i: int) -> None:
        source = f"127.0.{1 + i // 250 % 200}.{2 + i % 250}" if spread else "127.0.0.1"
        name = f"user{i}" if spread else USER
        with socket.create_connection(("127.0.0.1", port), timeout=10,
                                      source_address=(source, 0)) as s:
            s.sendall(encode(Connect(client_id=f"flood{i}", keepalive=0, username=name,
                                     password=b"wrong"), MQTT_3_1_1))
            first, body, _ = read_packet(s, bytearray())
            if first != 0x20 or body[1] == 0:
                raise RuntimeError("a wrong password was accepted")

    return attempt


def opcua_attempt(port: int) -> Callable[[int], None]:
    url = f"opc.tcp://127.0.0.1:{port}/iotserver"

    async def once(i: int) -> None:
        from asyncua import Client

        c = Client(url, timeout=10)
        c.set_user(USER if i % 2 else f"user{i}")
        c.set_password("wrong")
        try:
            await c.connect()
        except Exception:
            return
        await c.disconnect()
        raise RuntimeError("a wrong password was accepted")

    def attempt(i: int) -> None:
        asyncio.run(once(i))

    return attempt


def console_attempt(port: int, askpass: Path) -> Callable[[int], None]:
    ssh = shutil.which("ssh")
    if ssh is None:
        raise SystemExit("the console flood needs the OpenSSH client (ssh)")
    env = {"PATH": os.environ.get("PATH", ""), "SSH_ASKPASS": str(askpass),
           "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}
    args = [ssh, "-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o",
            "UserKnownHostsFile=/dev/null", "-o", "LogLevel=QUIET", "-o", "ConnectTimeout=5",
            "-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password",
            "-o", "NumberOfPasswordPrompts=1", "-p", str(port)]

    def attempt(i: int) -> None:
        user = "admin" if i % 2 else f"user{i}"
        subprocess.run([*args, f"{user}@127.0.0.1", "1"], env=env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
                       check=False)

    return attempt


# --------------------------------------------------------------------------- main


def logins(server: ServerProcess) -> dict[str, int]:
    return server.stats().get("logins", {})  # type: ignore[no-any-return]


def run_phases(pinger: Pinger, stat: ProcStat, makers: dict[str, Callable[[], list[Flood]]],
               phases: list[str], seconds: float,
               counters: Callable[[], dict[str, int]]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    base_p99 = None
    for phase in phases:
        floods = makers[phase]()
        before = counters()
        cpu0 = stat.cpu()
        for f in floods:
            f.start()
        samples = pinger.window(seconds)
        for f in floods:
            f.stop()
        cpu = (stat.cpu() - cpu0) / seconds * 100
        after = counters()
        delta: dict[str, Any] = {k: after.get(k, 0) - before.get(k, 0)
                                 for k in ("failed", "throttled", "busy")} if after else {}
        p50, p99 = pct(samples, 50), pct(samples, 99)
        if base_p99 is None:
            base_p99 = p99
        attempts = sum(f.count for f in floods)
        rows.append([phase, f"{p50:.2f}", f"{p99:.2f}", f"{max(samples or [0]):.1f}",
                     f"{p99 / base_p99:.1f}x", f"{attempts / seconds:.0f}",
                     delta.get("failed", "-"), delta.get("throttled", "-"),
                     delta.get("busy", "-"), f"{cpu:.0f}%", len(samples)])
        print(f"{phase}: done", flush=True)
        for f in floods:
            if f.errors:
                print(f"  {f.name}: {f.errors} attempts raised", flush=True)
    return rows


def stop_pinger(pinger: Pinger) -> None:
    pinger.stopped.set()
    pinger.join(5)
    with contextlib.suppress(OSError):
        pinger.sock.close()


def mosquitto_rows(binary: str, tmp: Path, phases: list[str], seconds: float
                   ) -> list[list[Any]]:
    """The MQTT phases against mosquitto (password file, anonymous pinger), same clients."""
    port = free_port()
    passwd = tmp / "mosquitto.passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), USER, PASSWORD], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conf = tmp / "mosquitto.conf"
    # started as root, mosquitto would switch to its own user, who cannot read our temp dir
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                    f"password_file {passwd}\nmax_connections -1\nuser {getpass.getuser()}\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("mosquitto did not start") from None
                time.sleep(0.05)
        pinger = Pinger(port)
        pinger.start()
        makers: dict[str, Callable[[], list[Flood]]] = {
            "baseline": lambda: [],
            "mqtt": lambda: [Flood("mqtt", mqtt_attempt(port, True))],
            "mqtt-1-address": lambda: [Flood("mqtt", mqtt_attempt(port, False))],
        }
        try:
            return run_phases(pinger, ProcStat(proc.pid), makers,
                              [p for p in phases if p in makers], seconds, dict)
        finally:
            stop_pinger(pinger)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase (default 10)")
    parser.add_argument("--quick", action="store_true", help="3 s per phase")
    parser.add_argument("--server-root", type=Path, default=None,
                        help="run the server of another checkout (before/after comparisons)")
    parser.add_argument("--phases", default="baseline,mqtt,mqtt-1-address,opcua,console,all")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="[login] max_concurrent of our server (default: its default)")
    parser.add_argument("--mosquitto", default=shutil.which("mosquitto") or "",
                        help="the peer broker for the MQTT phases ('' to skip)")
    args = parser.parse_args()
    seconds = 3.0 if args.quick else args.seconds
    phases = args.phases.split(",")
    print_header("login flood: event-loop responsiveness (MQTT PINGREQ round trip)")
    ports = {"mqtt": free_port(), "opcua": free_port(), "console": free_port()}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        login = (f"\n[login]\nmax_concurrent = {args.max_concurrent}\n"
                 if args.max_concurrent else "")
        cfg = write_config(data, ports, login)
        askpass = Path(tmp) / "askpass.sh"
        askpass.write_text("#!/bin/sh\necho wrong\n")
        askpass.chmod(0o700)
        server = (ServerProcess(cfg, Path(tmp) / "server.log") if args.server_root is None
                  else OtherServer(args.server_root, cfg, Path(tmp) / "server.log"))
        server.start()
        pinger = Pinger(ports["mqtt"])
        pinger.start()
        makers: dict[str, Callable[[], list[Flood]]] = {
            "baseline": lambda: [],
            "mqtt": lambda: [Flood("mqtt", mqtt_attempt(ports["mqtt"], True))],
            "mqtt-1-address": lambda: [Flood("mqtt", mqtt_attempt(ports["mqtt"], False))],
            "opcua": lambda: [Flood("opcua", opcua_attempt(ports["opcua"]))],
            "console": lambda: [Flood("console", console_attempt(ports["console"], askpass))],
            "all": lambda: [Flood("mqtt", mqtt_attempt(ports["mqtt"], True)),
                            Flood("opcua", opcua_attempt(ports["opcua"])),
                            Flood("console", console_attempt(ports["console"], askpass))],
        }
        try:
            rows = run_phases(pinger, ProcStat(server.pid), makers, phases, seconds,
                              lambda: logins(server))
        finally:
            stop_pinger(pinger)
            server.stop()
        peer = mosquitto_rows(args.mosquitto, Path(tmp), phases, seconds) \
            if args.mosquitto else []
    headers = ["phase", "ping p50 ms", "ping p99 ms", "max ms", "p99 / baseline",
               "attempts/s", "checked", "throttled", "busy", "server CPU", "pings"]
    print()
    print(f"{seconds:g} s per phase; ping every {PING_INTERVAL * 1000:g} ms; "
          "checked = passwords hashed and refused; throttled = refused without hashing")
    print("\niotserver" + (f" ({args.server_root})" if args.server_root else ""))
    print(table(headers, rows))
    if peer:
        print("\nmosquitto (peer; PBKDF2 password file, no throttle), same clients")
        print(table(headers, peer))
        ours = {r[0]: float(r[2]) for r in rows}
        print("\nping p99, iotserver / mosquitto: " + ", ".join(
            f"{r[0]} {ours[r[0]] / max(float(r[2]), 1e-9):.1f}x" for r in peer if r[0] in ours))


if __name__ == "__main__":
    main()
