"""The broker service: listeners (plain and TLS with client certificates), startup failures,
idempotent stop, shutdown DISCONNECT, ACL reload, the console API."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import pytest
import pytest_twisted
from helpers.mqtt_harness import mqtt_config, net_connect, port_of, start
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from iotserver import app, config
from iotserver.mqtt.packets import MQTT_5, Disconnect, Publish, ReasonCode
from iotserver.security import pki
from iotserver.security.tls import client_context_factory, peer_certificate


@pytest_twisted.ensureDeferred
async def test_port_in_use_fails_start_and_stop_is_clean(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        stopped: list[bool] = []
        root, core = app.build(config.parse(mqtt_config(tmp_path / "d", port)), reactor,
                               stop_reactor=lambda: stopped.append(True))
        root.startService()
        service = core.services["mqtt"]
        await Deferred.fromCoroutine(_settle(service))
        assert service.failure is not None and "cannot listen" in str(service.failure.value)
        assert stopped == [True]
        await root.stopService()
        await root.stopService()


async def _settle(service: object) -> None:
    with contextlib.suppress(Exception):
        await service.started  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_shutdown_disconnects_v5_clients_and_console_api(tmp_path: Path) -> None:
    root = await start(mqtt_config(tmp_path / "d", 0))
    service = root.core.services["mqtt"]
    a = await net_connect(port_of(root), "a", MQTT_5)
    b = await net_connect(port_of(root), "b", MQTT_5)
    assert set(service.clients) == {"a", "b"} and set(service.sessions) == {"a", "b"}
    assert service.disconnect("a")
    assert (await a.expect(Disconnect)).reason_code == ReasonCode.ADMINISTRATIVE_ACTION
    await a.closed
    await root.stopService()
    assert (await b.expect(Disconnect)).reason_code == ReasonCode.SERVER_SHUTTING_DOWN
    await b.closed
    assert not service.clients


@pytest_twisted.ensureDeferred
async def test_tls_listener_requiring_client_certificates(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    (data / "users.toml").write_text('[users.plc7]\nrole = "engineer"\ncertificates = ["plc7"]\n')
    extra = """
[[mqtt.listeners]]
endpoint = "tls:0:interface=127.0.0.1"
client_certs = "required"
"""
    text = mqtt_config(data, 0).replace("[mqtt.auth]", extra + "\n[mqtt.auth]")
    root = await start(text)
    tls_port = port_of(root, 1)
    try:
        ca = pki.load_cert(data / "tls" / "ca.pem")
        ca_key = pki.load_key(data / "tls" / "ca.key")
        cert, key = pki.issue_client_cert(ca, ca_key, "plc7")
        cert_path = pki.write_cert_pem(cert, tmp_path / "plc7.pem")
        key_path = pki.write_key_pem(key, tmp_path / "plc7.key")
        good = client_context_factory("127.0.0.1", ca_path=data / "tls" / "ca.pem",
                                      cert_path=cert_path, key_path=key_path)
        c = await net_connect(tls_port, "plc", MQTT_5, tls=good)
        broker = root.core.services["mqtt"].broker
        assert broker.sessions["plc"].user == "plc7"  # logged in by certificate
        await c.close()
        anonymous_tls = client_context_factory("127.0.0.1", ca_path=data / "tls" / "ca.pem")
        with pytest.raises(ConnectionError):  # the server refuses the handshake
            c = await net_connect(tls_port, "nocert", MQTT_5, tls=anonymous_tls)
        # a renewed server certificate reaches new connections after a reload (SIGHUP)
        renewed, renewed_key = pki.issue_server_cert(ca, ca_key, "iotserver",
                                                     dns_names=["localhost"],
                                                     ip_addresses=["127.0.0.1"])
        pki.write_cert_pem(renewed, data / "tls" / "server.pem", force=True)
        pki.write_key_pem(renewed_key, data / "tls" / "server.key", force=True)
        assert root.core.reload() == []
        c = await net_connect(tls_port, "plc", MQTT_5, tls=good)
        shown = peer_certificate(c.transport)
        assert shown is not None and shown.serial_number == renewed.serial_number
        await c.close()
    finally:
        await root.stopService()


@pytest_twisted.ensureDeferred
async def test_reload_rereads_the_acl_file(tmp_path: Path) -> None:
    acl_file = tmp_path / "acl.toml"
    acl_file.write_text('[[acl]]\nuser = "anonymous"\ntopic = "a/#"\naccess = "readwrite"\n')
    text = mqtt_config(tmp_path / "d", 0).replace(
        "allow_anonymous = true", f'allow_anonymous = true\nacl_file = "{acl_file}"').replace(
        'topic = "#"', 'topic = "never/#"')
    root = await start(text)
    try:
        broker = root.core.services["mqtt"].broker
        assert broker.acl.can_publish(None, "c", "a/x")
        assert not broker.acl.can_publish(None, "c", "b/x")
        acl_file.write_text('[[acl]]\nuser = "anonymous"\ntopic = "b/#"\naccess = "readwrite"\n')
        assert root.core.reload() == []
        assert broker.acl.can_publish(None, "c", "b/x")
        assert not broker.acl.can_publish(None, "c", "a/x")
        acl_file.write_text("[[acl]]\nbroken")
        problems = root.core.reload()
        assert problems and broker.acl.can_publish(None, "c", "b/x")  # old rules kept
        c = await net_connect(port_of(root), "c", MQTT_5)
        c.send(Publish("b/x", b"1", 1, packet_id=1), Publish("a/x", b"2", 1, packet_id=2))
        assert (await c.next()).reason_code == 0  # type: ignore[union-attr]
        assert (await c.next()).reason_code == ReasonCode.NOT_AUTHORIZED  # type: ignore[union-attr]
        await c.close()
    finally:
        await root.stopService()


@pytest_twisted.ensureDeferred
async def test_slow_consumer_is_bounded_and_does_not_stall_others(tmp_path: Path) -> None:
    from iotserver.mqtt.packets import Subscribe, SubscriptionOptions

    text = mqtt_config(tmp_path / "d", 0, extra="""
[mqtt.limits]
max_queued_messages = 100
write_buffer_bytes = 65536
""")
    root = await start(text)
    broker = root.core.services["mqtt"].broker
    port = port_of(root)
    stuck = socket.create_connection(("127.0.0.1", port))
    try:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x3c\x00\x03stk"
                      b"\x82\x06\x00\x01\x00\x01t\x00")  # CONNECT, SUBSCRIBE t QoS 0
        fast = await net_connect(port, "fast", MQTT_5)
        fast.send(Subscribe(1, (("t", SubscriptionOptions(0)),)))
        await fast.next()
        pub = await net_connect(port, "pub", MQTT_5)
        payload = b"x" * 1024
        session = broker.sessions["stk"]
        # publish until the stuck reader's transport is full and its queue overflows (how many
        # bytes the kernel buffers first depends on the load), while "fast" gets every one
        sent = got = 0
        while sent < 40_000 and not (session.conn is not None and session.conn.paused
                                     and broker.stats.dropped["queue_full_qos0"] > 0):
            pub.send(*(Publish("t", payload) for _ in range(100)))
            sent += 100
            while got < sent:
                p = await fast.next()
                assert isinstance(p, Publish)
                got += 1
        assert session.conn is not None and session.conn.paused
        tcp = session.conn.transport  # type: ignore[attr-defined]
        assert tcp.bufferSize == 65536 and tcp.SEND_LIMIT >= 65536  # [mqtt.limits] applied
        assert len(session.queue) <= 100
        assert broker.stats.dropped["queue_full_qos0"] > 0
        await fast.close()
        await pub.close()
    finally:
        stuck.close()
        await root.stopService()
