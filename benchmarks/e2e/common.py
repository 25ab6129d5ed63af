"""Shared helpers of the end-to-end benchmarks: the server child process, /proc sampling, a raw
MQTT 3.1.1 client, machine description and tables.

The server under test always runs in its own process (``server_child.py``: ``app.build`` on the
asyncio reactor, as ``twistd`` would run it), so that its CPU time and RSS can be read from
``/proc/<pid>`` without the load generators' share. Every process a benchmark starts is stopped
by the benchmark (SIGTERM, then SIGKILL after a timeout), by its own process id.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import select
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

USER, PASSWORD = "bench", "bench-password"  # engineer: may write tags and signal blocks
NS_URI = "urn:bench:tags"  # the OPC UA namespace of the tags in every benchmark config
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- machine, tables


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_lines() -> list[str]:
    import numpy

    return [
        f"machine: nproc={os.cpu_count()}, CPU {cpu_model()}, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        f"python {platform.python_version()} ({sys.executable}), numpy {numpy.__version__}",
        "command: " + " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
    ]


def print_header(title: str) -> None:
    print(f"== {title}")
    for line in machine_lines():
        print(line)
    print(flush=True)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (pasteable into docs/performance.md)."""
    cells = [[str(c) for c in r] for r in rows]
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(out)


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank; nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100.0 * (len(s) - 1))))
    return s[k]


# --------------------------------------------------------------------------- /proc


class ProcStat:
    """CPU seconds (utime + stime) and memory of one process, from /proc/<pid>."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14, 15 of proc(5)

    def mem(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) in bytes."""
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0]) * 1024
        return out

    def rss(self) -> int:
        return self.mem().get("VmRSS", 0)


def children_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += ProcStat(pid).cpu()
    return total


# --------------------------------------------------------------------------- users, config


def write_users(data_dir: Path) -> None:
    from iotserver.security.users import Role, User, hash_password, save_users

    data_dir.mkdir(parents=True, exist_ok=True)
    save_users(data_dir / "users.toml",
               [User(USER, Role.ENGINEER, hash_password(PASSWORD, n=2**10))])


def base_config(data_dir: Path, *, opcua_port: int | None = None, mqtt_port: int | None = None,
                extra_mqtt: str = "") -> str:
    """[server], simulator off, optional OPC UA (policy None, user login) and MQTT listeners."""
    text = f"""
[server]
data_dir = "{data_dir}"

[simulator]
enabled = false
"""
    if opcua_port is not None:
        text += f"""
[opcua]
endpoint = "opc.tcp://127.0.0.1:{opcua_port}/iotserver"
namespace_uri = "{NS_URI}"
security_policies = ["None"]
"""
    if mqtt_port is not None:
        text += f"""
[mqtt]
sys_interval = 0

[[mqtt.listeners]]
endpoint = "tcp:{mqtt_port}:interface=127.0.0.1"
{extra_mqtt}
"""
    return text


# --------------------------------------------------------------------------- the server process


class ServerProcess:
    """``server_child.py`` in its own process; stats over stdout on SIGUSR1, stop by SIGTERM."""

    def __init__(self, config_path: Path, log_path: Path, *, profile: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.profile = profile
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._buf = b""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 180.0) -> dict[str, Any]:
        cmd = [sys.executable, "-u", str(HERE / "server_child.py"), "--config",
               str(self.config_path)]
        if self.profile is not None:
            cmd += ["--profile", str(self.profile)]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        if self.env:
            env.update(self.env)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log_path.open("ab"),
                                     stdin=subprocess.DEVNULL, env=env)
        msg = self._read_json(timeout, "ready")
        if msg is None:
            self.kill()
            raise RuntimeError("server did not start; log:\n" + self.log_tail())
        return msg

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def _read_json(self, timeout: float, kind: str) -> dict[str, Any] | None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                with contextlib.suppress(ValueError):
                    msg = json.loads(line)
                    if msg.get("kind") == kind:
                        return msg  # type: ignore[no-any-return]
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([fd], [], [], min(left, 0.5))
            if r:
                data = os.read(fd, 1 << 16)
                if not data:
                    return None
                self._buf += data
            elif self.proc.poll() is not None:
                return None

    def stats(self, timeout: float = 30.0) -> dict[str, Any]:
        """Ask the server for its counters (SIGUSR1; it answers between two reactor turns)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR1)
        msg = self._read_json(timeout, "stats")
        if msg is None:
            raise RuntimeError("no stats from the server; log:\n" + self.log_tail())
        return msg

    def stop(self, timeout: float = 20.0) -> dict[str, Any] | None:
        """SIGTERM; the final counters, or None when it had to be killed."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        msg = self._read_json(timeout, "final")
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        return msg

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Procs:
    """Processes started by a benchmark; ``stop_all`` ends them by pid (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def popen(self, cmd: list[str], **kw: Any) -> subprocess.Popen[Any]:
        p = subprocess.Popen(cmd, **kw)
        self.procs.append(p)
        return p

    def stop_all(self, timeout: float = 10.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def start_sim_plcs(procs: Procs, count: int, registers: int, interval: float,
                   log_dir: Path) -> list[int]:
    """``iotserver sim-plc`` processes on free ports; returns the ports once all listen."""
    ports = []
    waiting = []
    for i in range(count):
        port = free_port()
        log = (log_dir / f"plc{i}.log").open("wb")
        p = procs.popen([sys.executable, "-m", "iotserver.cli", "sim-plc", "--port", str(port),
                         "--registers", str(registers), "--interval", str(interval)],
                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)))
        ports.append(port)
        waiting.append((port, p))
    deadline = time.monotonic() + 30
    for port, p in waiting:
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sim-plc on port {port} did not start")
            time.sleep(0.05)
    return ports


# --------------------------------------------------------------------------- raw MQTT 3.1.1


def mqtt_connect(port: int, client_id: str, *, user: str | None = USER,
                 password: str | None = PASSWORD, timeout: float = 10.0) -> socket.socket:
    """A blocking socket after a successful CONNACK (keepalive 0: no pings needed)."""
    from iotserver.mqtt.codec import encode
    from iotserver.mqtt.packets import MQTT_3_1_1, Connect

    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.sendall(encode(Connect(client_id=client_id, keepalive=0, username=user,
                                password=password.encode() if password else None),
                        MQTT_3_1_1))
    first, body, _ = read_packet(sock, bytearray())
    if first != 0x20 or len(body) < 2 or body[1] != 0:
        raise ConnectionError(f"CONNACK refused: {first:#x} {body!r}")
    return sock


def mqtt_subscribe(sock: socket.socket, topic_filter: str, qos: int = 0,
                   buf: bytearray | None = None) -> bytearray:
    """SUBSCRIBE and wait for the SUBACK; returns the buffer with what arrived after it."""
    from iotserver.mqtt.codec import encode
    from iotserver.mqtt.packets import MQTT_3_1_1, Subscribe, SubscriptionOptions

    sock.sendall(encode(Subscribe(1, ((topic_filter, SubscriptionOptions(qos=qos)),)),
                        MQTT_3_1_1))
    buf = bytearray() if buf is None else buf
    pending = []
    while True:
        first, body, raw = read_packet(sock, buf)
        if first == 0x90:
            if body[-1] & 0x80:
                raise ConnectionError(f"SUBACK refused {topic_filter!r}")
            break
        pending.append(raw)
    return bytearray(b"".join(pending)) + buf


def read_packet(sock: socket.socket, buf: bytearray) -> tuple[int, bytes, bytes]:
    """Blocking read of one packet: (first byte, body, raw bytes)."""
    while True:
        pkt = split_packet(buf, 0)
        if pkt is not None:
            first, start, end = pkt
            raw = bytes(buf[:end])
            body = bytes(buf[start:end])
            del buf[:end]
            return first, body, raw
        data = sock.recv(1 << 16)
        if not data:
            raise ConnectionError("broker closed the connection")
        buf += data


def split_packet(buf: bytes | bytearray, pos: int) -> tuple[int, int, int] | None:
    """(first byte, body start, end) of the packet at ``pos``, or None when incomplete."""
    n = len(buf)
    if n - pos < 2:
        return None
    mult, value, i = 1, 0, pos + 1
    while True:
        if i >= n:
            return None
        b = buf[i]
        value += (b & 0x7F) * mult
        mult *= 128
        i += 1
        if not b & 0x80:
            break
    if i + value > n:
        return None
    return buf[pos], i, i + value


def publish_topic_payload(buf: bytes | bytearray, first: int, start: int,
                          end: int) -> tuple[bytes, bytes]:
    """Topic and payload of a 3.1.1 PUBLISH body."""
    tlen = (buf[start] << 8) | buf[start + 1]
    topic = bytes(buf[start + 2:start + 2 + tlen])
    p = start + 2 + tlen + (2 if first & 0x06 else 0)
    return topic, bytes(buf[p:end])


SIG_HEADER = struct.Struct("<4sBBHqdI")
