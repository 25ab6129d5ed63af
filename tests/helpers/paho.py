"""paho-mqtt as a device uses it, for the interop tests: :class:`Paho` (a client in its own
network thread, recording what arrives), :func:`paho_client` (one that has its CONNACK), the
protocol levels :data:`V311` and :data:`V5`, and :data:`MOSQUITTO` (mosquitto_pub/_sub found).
The broker runs in the test's reactor; paho runs in its own threads, so tests poll with
``helpers.wait_for`` and never block the reactor."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for

paho = pytest.importorskip("paho.mqtt.client")
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties as PahoProperties  # noqa: E402

V311 = paho.MQTTv311
V5 = paho.MQTTv5
MOSQUITTO = shutil.which("mosquitto_pub") is not None and shutil.which("mosquitto_sub") is not None


class Paho:
    """A paho client in its own network thread, recording what arrives."""

    def __init__(self, port: int, client_id: str, protocol: int = V311, *,
                 clean: bool = True, will: tuple[str, bytes] | None = None,
                 session_expiry: int | None = None, tls_files: tuple[Path, ...] = (),
                 login: tuple[str, str] | None = None) -> None:
        kw: dict[str, Any] = {"client_id": client_id, "protocol": protocol}
        if protocol != V5:
            kw["clean_session"] = clean
        self.c = paho.Client(CallbackAPIVersion.VERSION2, **kw)
        self.messages: list[Any] = []
        self.connected = threading.Event()
        self.subscribed: list[Any] = []
        self.lock = threading.Lock()
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda c, u, mid, codes, p: self.subscribed.append(codes)
        if will is not None:
            self.c.will_set(will[0], will[1], qos=1)
        if login is not None:
            self.c.username_pw_set(*login)
        self.flags: list[Any] = []  # CONNACK flags, one per connection
        self.c.on_connect = lambda c, u, f, rc, p: (self.flags.append(f), self.connected.set())
        if tls_files:
            ca, cert, key = [*tls_files, None, None][:3]
            self.c.tls_set(ca_certs=str(ca), certfile=cert and str(cert),
                           keyfile=key and str(key))
        props = None
        clean_start: Any = paho.MQTT_CLEAN_START_FIRST_ONLY
        if protocol == V5:
            clean_start = clean
            if session_expiry is not None:
                props = PahoProperties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = session_expiry
        self.c.connect("127.0.0.1", port, keepalive=30, clean_start=clean_start,
                       properties=props)
        self.c.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.messages.append(msg)

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [m.payload for m in self.messages]

    async def ready(self) -> Paho:
        await wait_for(self.connected.is_set, what="paho CONNACK")
        return self

    async def subscribe(self, topic: str, qos: int = 0, **kw: Any) -> None:
        n = len(self.subscribed)
        self.c.subscribe(topic, qos, **kw)
        await wait_for(lambda: len(self.subscribed) > n, what="SUBACK")

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()
        self.c._reset_sockets()  # paho keeps a wake-up socket pair open otherwise

    def kill(self) -> None:
        """Close the socket without DISCONNECT (an abrupt network loss)."""
        self.c.loop_stop()
        self.c._reset_sockets()


async def paho_client(*args: Any, **kw: Any) -> Paho:
    return await Paho(*args, **kw).ready()
