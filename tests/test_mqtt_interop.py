"""Real clients against the broker service: paho-mqtt (3.1.1 and 5.0) and mosquitto_pub/_sub,
over plain TCP and TLS with client certificates.

The broker runs in the test's reactor; paho runs in its own threads and mosquitto clients in
subprocesses, so the reactor is never blocked: the test polls with ``helpers.wait_for``.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from helpers import wait_for
from helpers.mqtt_harness import start
from helpers.paho import MOSQUITTO, V5, V311, paho_client
from twisted.internet import threads, utils

from iotserver.security import pki

paho = pytest.importorskip("paho.mqtt.client")
from paho.mqtt.properties import Properties as PahoProperties  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402

pytestmark = pytest.mark.interop


def server_config(data_dir: Path, port: int, tls_port: int) -> str:
    return f"""
[server]
data_dir = "{data_dir}"

[mqtt]
sys_interval = 0

[[mqtt.listeners]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[[mqtt.listeners]]
endpoint = "tls:{tls_port}:interface=127.0.0.1"
client_certs = "optional"

[mqtt.auth]
allow_anonymous = true

[[mqtt.acl]]
user = "anonymous"
topic = "#"
access = "readwrite"

[[mqtt.acl]]
user = "device1"
topic = "#"
access = "readwrite"

[mqtt.bridge]
enabled = false
"""


class Server:
    def __init__(self, root: Any, port: int, tls_port: int, data_dir: Path) -> None:
        self.root = root
        self.port = port
        self.tls_port = tls_port
        self.data_dir = data_dir
        self.service = root.core.services["mqtt"]
        self.broker = self.service.broker


@pytest_twisted.async_yield_fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "users.toml").write_text(
        '[users.device1]\nrole = "engineer"\ncertificates = ["device1"]\n')
    root = await start(server_config(data_dir, 0, 0))  # both listeners on port 0
    plain, tls = (p.getHost().port for p in root.core.services["mqtt"].ports)
    try:
        yield Server(root, plain, tls, data_dir)
    finally:
        await root.stopService()


# --------------------------------------------------------------------------- paho


@pytest.mark.parametrize("protocol", [V311, V5])
@pytest_twisted.ensureDeferred
async def test_paho_qos_round_trips_and_retained(server: Server, protocol: int) -> None:
    sub = await paho_client(server.port, "sub", protocol)
    pub = await paho_client(server.port, "pub", protocol)
    try:
        pub.c.publish("ret/x", b"retained", qos=1, retain=True)
        await wait_for(lambda: server.broker.retained.get("ret/x") is not None)
        await sub.subscribe("ret/#", 2)
        await sub.subscribe("t/#", 2)
        for qos in (0, 1, 2):
            pub.c.publish("t/a", f"q{qos}".encode(), qos=qos)
        await wait_for(lambda: len(sub.messages) >= 4, what="4 messages")
        got = [(m.topic, m.payload, m.qos, bool(m.retain)) for m in sub.messages]
        assert got == [("ret/x", b"retained", 1, True), ("t/a", b"q0", 0, False),
                       ("t/a", b"q1", 1, False), ("t/a", b"q2", 2, False)]
    finally:
        sub.stop()
        pub.stop()


@pytest_twisted.ensureDeferred
async def test_paho_v5_properties_and_topic_alias(server: Server) -> None:
    sub = await paho_client(server.port, "sub", V5)
    pub = await paho_client(server.port, "pub", V5)
    try:
        await sub.subscribe("v5/#", 1)
        props = PahoProperties(PacketTypes.PUBLISH)
        props.UserProperty = [("plant", "7"), ("line", "A")]
        props.ContentType = "application/json"
        props.ResponseTopic = "v5/reply"
        props.CorrelationData = b"\x01\x02"
        props.PayloadFormatIndicator = 1
        props.MessageExpiryInterval = 120
        props.TopicAlias = 1
        pub.c.publish("v5/data", b"{}", qos=1, properties=props)
        alias_only = PahoProperties(PacketTypes.PUBLISH)
        alias_only.TopicAlias = 1
        pub.c.publish("", b"again", qos=1, properties=alias_only)  # topic from the alias
        await wait_for(lambda: len(sub.messages) >= 2, what="2 messages")
        m, m2 = sub.messages[:2]
        assert (m.topic, m.payload, m2.topic, m2.payload) == ("v5/data", b"{}", "v5/data",
                                                              b"again")
        p = m.properties
        assert p.UserProperty == [("plant", "7"), ("line", "A")]
        assert (p.ContentType, p.ResponseTopic, p.CorrelationData) == (
            "application/json", "v5/reply", b"\x01\x02")
        assert p.PayloadFormatIndicator == 1 and 118 <= p.MessageExpiryInterval <= 120
    finally:
        sub.stop()
        pub.stop()


@pytest_twisted.ensureDeferred
async def test_paho_will_on_abrupt_close(server: Server) -> None:
    watcher = await paho_client(server.port, "watcher", V311)
    doomed = await paho_client(server.port, "doomed", V5, will=("will/doomed", b"offline"))
    try:
        await watcher.subscribe("will/#", 1)
        doomed.kill()
        await wait_for(lambda: watcher.payloads() == [b"offline"], what="the will")
    finally:
        watcher.stop()


@pytest_twisted.ensureDeferred
async def test_paho_persistent_session_offline_queue(server: Server) -> None:
    sub = await paho_client(server.port, "durable", V311, clean=False)
    await sub.subscribe("q/#", 1)
    sub.stop()
    await wait_for(lambda: "durable" not in server.broker.clients)
    pub = await paho_client(server.port, "pub5", V5)
    try:
        for i in range(5):
            pub.c.publish("q/x", b"%d" % i, qos=1)
        pub.c.publish("q/x", b"qos0 is not queued", qos=0)
        await wait_for(lambda: len(server.broker.sessions["durable"].queue) == 5)
        sub = await paho_client(server.port, "durable", V311, clean=False)
        await wait_for(lambda: len(sub.messages) >= 5, what="queued messages")
        assert sub.payloads() == [b"0", b"1", b"2", b"3", b"4"]
    finally:
        sub.stop()
        pub.stop()


@pytest_twisted.ensureDeferred
async def test_paho_shared_subscription(server: Server) -> None:
    members = [await paho_client(server.port, f"m{i}", V5) for i in range(2)]
    pub = await paho_client(server.port, "pub", V311)
    try:
        for m in members:
            await m.subscribe("$share/workers/jobs/#", 1)
        for i in range(10):
            pub.c.publish("jobs/x", b"%d" % i, qos=1)
        await wait_for(lambda: sum(len(m.messages) for m in members) >= 10)
        counts = sorted(len(m.messages) for m in members)
        assert counts == [5, 5]
        assert sorted(p for m in members for p in m.payloads()) == sorted(
            b"%d" % i for i in range(10))
    finally:
        for m in members:
            m.stop()
        pub.stop()


@pytest_twisted.ensureDeferred
async def test_malformed_packet_closes_only_that_client(server: Server) -> None:
    sub = await paho_client(server.port, "sub", V5)
    try:
        await sub.subscribe("ok", 0)

        def misbehave() -> list[bytes]:
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
                raw.sendall(b"\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x03bad")
                connack = raw.recv(100)
                raw.sendall(b"\x30\x02\x00\x05")  # PUBLISH whose topic runs past the packet
                return [connack, raw.recv(100), raw.recv(100)]

        connack, disconnect, eof = await threads.deferToThread(misbehave)
        assert connack[0] == 0x20 and connack[3] == 0  # CONNACK, accepted
        assert disconnect[0] == 0xE0 and disconnect[2] == 0x81  # DISCONNECT 0x81 Malformed
        assert eof == b""  # and closed
        pub = await paho_client(server.port, "pub", V311)
        pub.c.publish("ok", b"still served")
        await wait_for(lambda: sub.payloads() == [b"still served"])
        pub.stop()
        assert server.broker.stats.protocol_errors == 1
    finally:
        sub.stop()


# --------------------------------------------------------------------------- mosquitto clients


def _client_cert(data_dir: Path, out: Path, name: str) -> tuple[Path, Path]:
    ca = pki.load_cert(data_dir / "tls" / "ca.pem")
    ca_key = pki.load_key(data_dir / "tls" / "ca.key")
    cert, key = pki.issue_client_cert(ca, ca_key, name)
    return (pki.write_cert_pem(cert, out / f"{name}.pem"),
            pki.write_key_pem(key, out / f"{name}.key"))


@pytest.mark.skipif(not MOSQUITTO, reason="mosquitto-clients not installed")
@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
@pytest_twisted.ensureDeferred
async def test_mosquitto_clients_over_tcp_and_tls_with_client_certificate(
        server: Server, tmp_path: Path, version: str) -> None:
    ca = server.data_dir / "tls" / "ca.pem"
    cert, key = _client_cert(server.data_dir, tmp_path, "device1")
    sub = utils.getProcessOutputAndValue(
        "mosquitto_sub",
        ["-h", "127.0.0.1", "-p", str(server.tls_port), "-V", version, "--cafile", str(ca),
         "--cert", str(cert), "--key", str(key), "-i", "msub", "-t", "m/#", "-q", "2",
         "-C", "3", "-W", "10", "-v"])
    await wait_for(lambda: "msub" in server.broker.clients
                   and server.broker.sessions["msub"].subs, timeout=10)
    assert server.broker.sessions["msub"].user == "device1"  # certificate login
    for qos in ("0", "1", "2"):
        out, err, code = await utils.getProcessOutputAndValue(
            "mosquitto_pub",
            ["-h", "127.0.0.1", "-p", str(server.port), "-V", version, "-t", "m/x", "-q", qos,
             "-m", f"qos{qos}"])
        assert code == 0, err
    out, err, code = await sub
    assert code == 0, err
    assert out.decode().splitlines() == ["m/x qos0", "m/x qos1", "m/x qos2"]
    # TLS without a client certificate still works (certificates are optional here)
    out, err, code = await utils.getProcessOutputAndValue(
        "mosquitto_pub",
        ["-h", "127.0.0.1", "-p", str(server.tls_port), "-V", version, "--cafile", str(ca),
         "-t", "m/y", "-q", "1", "-m", "anon"])
    assert code == 0, err


@pytest.mark.skipif(not MOSQUITTO, reason="mosquitto-clients not installed")
@pytest_twisted.ensureDeferred
async def test_mosquitto_retained_and_v5_user_property(server: Server) -> None:
    out, err, code = await utils.getProcessOutputAndValue(
        "mosquitto_pub",
        ["-h", "127.0.0.1", "-p", str(server.port), "-V", "mqttv5", "-t", "keep/me", "-r",
         "-q", "1", "-m", "sticky", "-D", "publish", "user-property", "site", "7"])
    assert code == 0, err
    out, err, code = await utils.getProcessOutputAndValue(
        "mosquitto_sub",
        ["-h", "127.0.0.1", "-p", str(server.port), "-V", "mqttv5", "-t", "keep/#", "-C", "1",
         "-W", "5", "-F", "%t %p %P %r"])
    assert code == 0, err
    assert out.decode().strip() == "keep/me sticky site:7 1"
