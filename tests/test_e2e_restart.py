"""A server restart (SIGTERM, and kill -9) keeps memory tags, retained messages and
persistent MQTT sessions. The server runs as users run it: twistd in a subprocess."""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for_sync
from helpers.server_process import PASSWORD, USER, Server
from paho.mqtt import client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

pytestmark = pytest.mark.interop


class Mqtt:
    """A paho v5 client whose received messages land in a queue."""

    def __init__(self, port: int, client_id: str, *, clean_start: bool = True) -> None:
        self.msgs: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=paho.MQTTv5)
        self.c.username_pw_set(USER, PASSWORD)
        self.c.on_message = lambda _c, _u, m: self.msgs.put((m.topic, m.payload, m.retain))
        self.acks: dict[int, Any] = {}
        self.c.on_publish = lambda _c, _u, mid, rc, _p: self.acks.__setitem__(mid, rc)
        self.subacks: set[int] = set()
        self.c.on_subscribe = lambda _c, _u, mid, _rc, _p: self.subacks.add(mid)
        ready: queue.Queue[Any] = queue.Queue()
        self.c.on_connect = lambda _c, _u, flags, rc, _p: ready.put((flags, rc))
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.c.connect("127.0.0.1", port, clean_start=clean_start, properties=props)
        self.c.loop_start()
        self.flags, rc = ready.get(timeout=10)
        assert not rc.is_failure, rc

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        wait_for_sync(lambda: info.mid in self.acks, what=f"PUBACK of {topic}")
        assert not self.acks[info.mid].is_failure, f"{topic}: PUBACK {self.acks[info.mid]}"

    def subscribe(self, topic: str) -> None:
        _, mid = self.c.subscribe(topic, qos=1)
        wait_for_sync(lambda: mid in self.subacks, what=f"SUBACK of {topic}")

    def wait_for(self, topic: str, timeout: float = 10) -> tuple[bytes, bool]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                t, payload, retain = self.msgs.get(timeout=0.1)
            except queue.Empty:
                continue
            if t == topic:
                return payload, retain
        raise AssertionError(f"nothing on {topic}")

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()
        self.c._reset_sockets()


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_restart_keeps_memory_tags_retained_and_sessions(tmp_path: Path, how: int) -> None:
    server = Server(tmp_path)
    server.start()
    clients: list[Mqtt] = []
    try:
        keeper = Mqtt(server.port, "keeper", clean_start=True)
        keeper.subscribe("plant/events")
        keeper.close()  # offline now; its session (and subscription) persists

        pub = Mqtt(server.port, "writer")
        clients.append(pub)
        pub.subscribe("iotserver/tags/Site/Setpoint/set/result")
        pub.publish("plant/status", b"running", retain=True)
        pub.publish("plant/events", b"evt-1")  # queued for the offline keeper
        pub.publish("iotserver/tags/Site/Setpoint/set", b"42.5")
        assert json.loads(pub.wait_for("iotserver/tags/Site/Setpoint/set/result")[0]) == {
            "ok": True}
        pub.close()
        clients.clear()

        server.stop(how)
        server.start()

        fresh = Mqtt(server.port, "reader")
        clients.append(fresh)
        fresh.subscribe("plant/status")
        assert fresh.wait_for("plant/status") == (b"running", True)
        fresh.subscribe("iotserver/tags/Site/Setpoint")
        tag = json.loads(fresh.wait_for("iotserver/tags/Site/Setpoint")[0])
        assert tag["v"] == 42.5 and tag["q"] == "Good"

        back = Mqtt(server.port, "keeper", clean_start=False)
        clients.append(back)
        assert back.flags.session_present
        assert back.wait_for("plant/events")[0] == b"evt-1"
    finally:
        for c in clients:
            with contextlib.suppress(Exception):
                c.close()
        if server.proc is not None and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
            try:
                server.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
    assert "Traceback" not in server.log.read_text()

