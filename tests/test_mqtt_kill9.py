"""kill -9 of the real server process against paho-mqtt clients:
a QoS 2 stream killed at many points is delivered exactly once, and a persistent session
whose SUBACK arrived survives a kill right after it.

The server runs as users run it (``python -m iotserver.cli run``) in a subprocess; paho runs
in its own network threads with automatic reconnects, as a device would."""

from __future__ import annotations

import collections
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.mqtt_harness import mqtt_config
from helpers.server_process import spawn

paho = pytest.importorskip("paho.mqtt.client")
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties as PahoProperties  # noqa: E402

pytestmark = pytest.mark.interop
V311, V5 = paho.MQTTv311, paho.MQTTv5
START_TIMEOUT = 60.0


class Server:
    """The server process, killed and started again on the same port and data directory."""

    def __init__(self, tmp: Path, port: int, text: str | None = None) -> None:
        self.port = port
        self.cfg = tmp / "server.toml"
        self.cfg.write_text(text if text is not None else mqtt_config(tmp / "data", port))
        self.log = tmp / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.up = threading.Event()

    def start(self) -> None:
        self.proc = spawn(self.cfg, self.cfg.parent / "data", self.log)
        self.starts += 1
        wait(lambda: self.log.read_text(errors="replace").count("iotserver ready")
             >= self.starts, START_TIMEOUT, "server start",
             lambda: self.proc is not None and self.proc.poll() is not None)
        self.up.set()

    def kill(self) -> None:
        self.up.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        self.up.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def wait(cond: Callable[[], bool], timeout: float, what: str,
         failed: Callable[[], bool] = lambda: False) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline or failed():
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Client:
    """A paho client with a persistent session, reconnecting once the server is back.

    Its network loop is driven here rather than by ``loop_start``: paho-mqtt 2.x resets its
    in-flight state on every reconnect attempt, and a second reset (after an attempt the
    still-restarting server refused) turns a QoS 2 message that waits for PUBCOMP back into
    a new PUBLISH, which the broker must treat as a new publication (MQTT 4.3.3: once PUBREL
    is answered with PUBCOMP, the packet id is free) -- a duplicate made by the client. So
    this client reconnects only when ``up`` is set, in one attempt, as a careful application
    does."""

    def __init__(self, port: int, client_id: str, protocol: int, up: threading.Event) -> None:
        kw: dict[str, Any] = {"client_id": client_id, "protocol": protocol}
        if protocol != V5:
            kw["clean_session"] = False
        self.c = paho.Client(CallbackAPIVersion.VERSION2, **kw)
        self.up = up
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.payloads: list[bytes] = []
        self.connacks: list[bool] = []
        self.subacks: list[Any] = []
        self.completed: set[int] = set()  # mids whose flow ended (PUBACK / PUBCOMP)
        self.on_suback: Callable[[], None] | None = None
        self.c.on_message = self._message
        self.c.on_connect = self._connect
        self.c.on_subscribe = self._subscribe
        self.c.on_publish = self._published
        props = None
        clean_start: Any = paho.MQTT_CLEAN_START_FIRST_ONLY  # 3.1.1: clean_session above
        if protocol == V5:
            clean_start = False
            props = PahoProperties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        self.c.connect("127.0.0.1", port, keepalive=10, clean_start=clean_start,
                       properties=props)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            if self.c.loop(0.05) == paho.MQTT_ERR_SUCCESS:
                continue
            while not self.stopping.is_set() and not self.up.wait(0.05):
                pass  # the server is down: wait until it is back, then one attempt
            if self.stopping.is_set():
                return
            try:
                self.c.reconnect()
            except OSError:
                self.stopping.wait(0.2)  # killed again meanwhile: the next loop retries

    def _message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.payloads.append(msg.payload)

    def _connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self.lock:
            self.connacks.append(bool(flags.session_present))

    def _subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        if self.on_suback is not None:
            self.on_suback()  # in paho's thread, at once: no time for a lazy commit
        with self.lock:
            self.subacks.append(codes)

    def _published(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        with self.lock:
            self.completed.add(mid)

    def all_completed(self, infos: list[Any]) -> bool:
        # publish() while disconnected answers "not connected" but keeps a QoS 1/2 message
        # for the next connection, so completion is what the broker acknowledged
        with self.lock:
            return all(i.mid in self.completed for i in infos)

    def received(self) -> list[bytes]:
        with self.lock:
            return list(self.payloads)

    def close(self) -> None:
        self.c.disconnect()
        self.stopping.set()
        self.thread.join(10)
        self.c._reset_sockets()  # paho keeps a wake-up socket pair open otherwise


@pytest.fixture
def server(tmp_path: Path, free_port: int) -> Iterator[Server]:
    s = Server(tmp_path, free_port)
    s.start()
    try:
        yield s
    finally:
        s.stop()
        s.kill()
        text = s.log.read_text(errors="replace")
        assert "Traceback" not in text, text


@pytest.mark.parametrize("protocol", [V311, V5])
def test_qos2_exactly_once_across_kill_9(server: Server, protocol: int) -> None:
    n = 1000
    sub = Client(server.port, "qos2-sub", protocol, server.up)
    pub = Client(server.port, "qos2-pub", protocol, server.up)
    infos: list[Any] = []
    stop = threading.Event()

    def produce() -> None:  # a steady stream (200/s while the server is up): kills land in it
        for i in range(n):
            while not server.up.wait(0.05):
                if stop.is_set():
                    return
            infos.append(pub.c.publish("kill9/stream", b"%d" % i, qos=2))
            time.sleep(0.005)

    producer = threading.Thread(target=produce, daemon=True)
    try:
        wait(lambda: bool(sub.connacks), 10, "subscriber CONNACK")
        sub.c.subscribe("kill9/stream", qos=2)
        wait(lambda: bool(sub.subacks), 10, "SUBACK")
        wait(lambda: bool(pub.connacks), 10, "publisher CONNACK")
        producer.start()
        # kill -9 at many points of the stream: whatever is in flight in either direction
        # (PUBLISH, PUBREC, PUBREL, PUBCOMP, a commit) at that moment
        mid_stream = 0
        for k, at in enumerate((80, 220, 360, 500, 640, 780)):
            wait(lambda at=at: len(sub.received()) >= at, 120, f"{at} messages")
            mid_stream += len(infos) < n or not pub.all_completed(infos)
            server.kill()
            server.start()
            back = k + 2
            wait(lambda back=back: len(sub.connacks) >= back and len(pub.connacks) >= back,
                 30, "both clients back")
        producer.join(60)
        assert mid_stream == 6
        wait(lambda: pub.all_completed(infos), 120, "every PUBCOMP")
        wait(lambda: len(set(sub.received())) >= n, 60, "every message")
        # a session resends what it still holds before anything newer (MQTT-4.6.0-6, one
        # topic, in order): once a last message is through, no duplicate can still come
        pub.c.publish("kill9/stream", b"end", qos=2)
        wait(lambda: b"end" in sub.received(), 30, "the last message")
        counts = collections.Counter(sub.received())
        duplicates = {p: c for p, c in counts.items() if c > 1}
        lost = set(range(n)) - {int(p) for p in counts if p != b"end"}
        assert (duplicates, lost) == ({}, set())
        assert sub.connacks[1:] == [True] * 6  # every reconnect resumed the stored session
    finally:
        stop.set()
        sub.close()
        pub.close()


@pytest.mark.parametrize("protocol", [V311, V5])
def test_new_session_and_subscription_survive_kill_9_right_after_suback(
        server: Server, protocol: int) -> None:
    sub = Client(server.port, "fresh-sub", protocol, server.up)
    pub = None
    try:
        wait(lambda: bool(sub.connacks), 10, "CONNACK")
        assert sub.connacks == [False]  # a new session
        sub.on_suback = server.kill  # kill -9 the moment the SUBACK is in
        sub.c.subscribe("kill9/sub/#", qos=1)
        wait(lambda: bool(sub.subacks), 10, "SUBACK")
        sub.on_suback = None
        server.start()
        wait(lambda: len(sub.connacks) >= 2, 30, "reconnect")
        assert sub.connacks[1] is True  # the session was on disk before its CONNACK
        pub = Client(server.port, "fresh-pub", V311, server.up)
        wait(lambda: bool(pub.connacks), 10, "publisher CONNACK")
        pub.c.publish("kill9/sub/x", b"after the restart", qos=1).wait_for_publish(10)
        wait(lambda: sub.received() == [b"after the restart"], 10, "the message")
    finally:
        sub.close()
        if pub is not None:
            pub.close()


def test_a_will_on_a_set_topic_is_a_write_after_kill_9(tmp_path: Path, free_port: int) -> None:
    """A will stored by the killed process is published by the next one through the tag
    bridge: a will on <tag>/set writes the tag (as the will's owner), never reaches
    subscribers as a message."""
    import sqlite3

    from iotserver.security.users import Role, User, hash_password, save_users

    data = tmp_path / "data"
    data.mkdir()
    save_users(data / "users.toml", [User("erik", Role.ENGINEER, hash_password("pw", n=2**10))])
    server = Server(tmp_path, free_port, f"""
[server]
data_dir = "{data}"

[[tags]]
path = "Site/Setpoint"
type = "float64"
access = "readwrite"
range = [0, 100]
initial = 10

[mqtt]
sys_interval = 0

[[mqtt.listeners]]
endpoint = "tcp:{free_port}:interface=127.0.0.1"
""")
    topic = "iotserver/tags/Site/Setpoint"
    server.start()
    dev = watcher = None
    try:
        dev = paho.Client(CallbackAPIVersion.VERSION2, client_id="dev", protocol=V5)
        dev.username_pw_set("erik", "pw")
        dev.will_set(topic + "/set", b"37", qos=1)
        dev.connect("127.0.0.1", free_port)
        dev.loop_start()
        db = data / "mqtt" / "broker.sqlite3"

        def will_stored() -> bool:
            try:
                con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
                try:
                    return bool(con.execute("SELECT 1 FROM wills WHERE client_id = 'dev'")
                                .fetchall())
                finally:
                    con.close()
            except sqlite3.Error:
                return False

        wait(will_stored, 10, "the will on disk")
        server.kill()
        dev.loop_stop()
        dev._reset_sockets()
        dev = None
        server.start()
        got: list[tuple[str, bytes]] = []
        lock = threading.Lock()
        watcher = paho.Client(CallbackAPIVersion.VERSION2, client_id="watcher", protocol=V5)
        watcher.username_pw_set("erik", "pw")

        def on_message(c: Any, u: Any, m: Any) -> None:
            with lock:
                got.append((m.topic, m.payload))

        watcher.on_message = on_message
        watcher.on_connect = lambda c, u, f, rc, p: c.subscribe("iotserver/tags/Site/#", 1)
        watcher.connect("127.0.0.1", free_port)
        watcher.loop_start()

        def value() -> Any:
            import json

            with lock:
                values = [json.loads(p)["v"] for t, p in got if t == topic]
            return values[-1] if values else None

        wait(lambda: value() == 37.0, 20, "the tag written by the will")
        with lock:
            assert (topic + "/set") not in [t for t, _ in got]
    finally:
        for c in (dev, watcher):
            if c is not None:
                c.disconnect()
                c.loop_stop()
                c._reset_sockets()
        server.stop()
        server.kill()
    text = server.log.read_text(errors="replace")
    assert "Traceback" not in text, text
