"""Listeners over real sockets: limits never shared between the plain and the Modbus/TCP
Security port (pymodbus as the client, plain and over TLS), the TLS handshake timeout, a
trickling socket, a churn of short connections, one-line startup errors and a safe stop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from helpers import aio, sleep, wait_for
from helpers.modbus_edge import (
    CONFIG,
    TIMEOUT,
    Modbus,
    client_tls,
    closed_by_server,
    idle_sockets,
    pymodbus_read,
    start,
    stop,
)
from twisted.internet import reactor

from iotserver import app, config


@pytest.fixture(scope="module", autouse=True)
def _listener_reservation() -> None:
    """Twisted keeps one /dev/null fd reserved once any port listens: not a test's leak."""
    from twisted.internet.tcp import _reservedFD

    _reservedFD.reserve()


@pytest.mark.interop
@pytest_twisted.ensureDeferred
async def test_idle_plain_sockets_leave_tls_clients_served(tmp_path: Path) -> None:
    m = await start(tmp_path)
    ctx = client_tls(tmp_path, m)
    hogs = idle_sockets(m.plain_port, 70)
    try:
        await wait_for(lambda: m.plain.stats.accepted + m.plain.stats.refused_listener_full == 70,
                       what="the plain listener to take or refuse all 70")
        assert m.plain.stats.open == 64 and m.plain.stats.refused_listener_full == 6
        assert await aio(pymodbus_read(m.tls_port, ctx)) == [0, 7]
        assert m.secure.stats.refused_listener_full == 0
    finally:
        await stop(m, hogs)


@pytest.mark.interop
@pytest_twisted.ensureDeferred
async def test_silent_tls_sockets_leave_plain_clients_served(tmp_path: Path) -> None:
    m = await start(tmp_path, extra="handshake_timeout = 3.0")
    ctx = client_tls(tmp_path, m)
    hogs = idle_sockets(m.tls_port, 70)  # TCP only: no ClientHello ever
    try:
        await wait_for(lambda: m.secure.stats.accepted + m.secure.stats.refused_listener_full
                       >= 70, what="the TLS listener to take or refuse all 70")
        assert m.secure.stats.refused_listener_full == 6
        assert await aio(pymodbus_read(m.plain_port)) == [0, 7]
        # the TLS handshake timeout frees the TLS slots: the TLS client gets in again
        await wait_for(lambda: m.secure.stats.handshake_timeouts == 64, what="handshake timeouts")
        assert m.secure.stats.open == 0
        await wait_for(lambda: sum(closed_by_server(s) for s in hogs) == 70, what="all closed")
        assert await aio(pymodbus_read(m.tls_port, ctx)) == [0, 7]
    finally:
        await stop(m, hogs)


@pytest_twisted.ensureDeferred
async def test_trickling_socket_is_closed_when_its_frame_is_late(tmp_path: Path) -> None:
    m = await start(tmp_path, extra="frame_timeout = 1.0\nidle_timeout = 60")
    s = idle_sockets(m.plain_port, 1)[0]
    frame = bytes.fromhex("000100000006010300000002")  # read holding 0..1, complete
    try:
        await wait_for(lambda: m.plain.stats.open == 1, what="the connection")
        s.send(frame)  # a complete first request is answered
        await wait_for(lambda: _readable(s), what="the answer")
        assert len(s.recv(100)) == 13
        sent = 0
        while not closed_by_server(s) and sent < 100:  # one byte every 0.2 s, never done
            with contextlib.suppress(OSError):  # closed meanwhile
                s.send(frame[sent % 11:sent % 11 + 1])
            sent += 1
            await sleep(0.2)
        assert closed_by_server(s), "a trickling socket was never closed"
        assert m.plain.stats.frame_timeouts == 1 and m.plain.stats.idle_timeouts == 0
        assert sent < 50  # closed after about frame_timeout, not after the idle timeout
    finally:
        await stop(m, [s])


def _readable(s: socket.socket) -> bool:
    try:
        return bool(s.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False


@pytest_twisted.ensureDeferred
async def test_churn_of_short_connections_is_never_refused_below_the_limit(
        tmp_path: Path) -> None:
    m = await start(tmp_path, max_connections=16)
    request = bytes.fromhex("000100000006010300000002")
    done = {"ok": 0, "failed": 0}

    async def worker(n: int) -> None:
        for _ in range(n):
            reader, writer = await asyncio.open_connection("127.0.0.1", m.plain_port)
            writer.write(request)
            try:
                answer = await asyncio.wait_for(reader.readexactly(13), 5)
                done["ok" if answer[7] == 3 else "failed"] += 1
            except (asyncio.IncompleteReadError, ConnectionError):
                done["failed"] += 1
            finally:
                writer.close()

    try:
        # 12 clients at a time (below the limit of 16), 600 connections in all
        await aio(asyncio.gather(*(worker(50) for _ in range(12))))
        assert done == {"ok": 600, "failed": 0}
        assert m.plain.stats.refused_listener_full == 0
    finally:
        await stop(m, [])


@pytest_twisted.ensureDeferred
async def test_port_in_use_and_bad_certificate_are_one_line_errors(tmp_path: Path) -> None:
    from iotserver.lifecycle import StartupError

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    cases = [
        (f'["tcp:{port}:interface=127.0.0.1"]', f"Modbus TCP cannot listen on tcp:{port}"),
        (f'["tls:0:interface=127.0.0.1:cert={bad}:key={bad}:ca={bad}"]',
         "Modbus/TCP Security tls:0"),
    ]
    try:
        for endpoints, words in cases:
            text = CONFIG.format(data=tmp_path / "data", max_connections=4, extra="").replace(
                '["tcp:0:interface=127.0.0.1", "tls:0:interface=127.0.0.1"]', endpoints)
            root, core = app.build(config.parse(text, source="t.toml"), reactor)
            service = core.services["modbus"]
            root.startService()
            await service.started
            await root.stopService()
            assert service.failure is not None and service.failure.check(StartupError)
            message = str(service.failure.value)
            assert words in message and "\n" not in message and "Traceback" not in message
    finally:
        taken.close()


@pytest_twisted.ensureDeferred
async def test_stop_stops_every_port_even_when_one_fails(tmp_path: Path) -> None:
    m = await start(tmp_path)
    plain_port = m.plain_port
    real: Callable[[], Awaitable[Any]] = m.plain.port.stopListening

    def broken() -> Any:
        raise RuntimeError("this port will not stop")

    m.plain.port.stopListening = broken
    try:
        await m.root.stopService()
        assert m.secure.port.disconnected  # the second port stopped all the same
    finally:
        await real()
    with socket.socket() as s:
        s.bind(("127.0.0.1", plain_port))  # and the first one is free again


@pytest_twisted.ensureDeferred
async def test_mqtt_listener_limit_is_counted_in_sys(tmp_path: Path, free_port: int) -> None:
    from helpers.mqtt_harness import mqtt_config, net_connect
    from helpers.mqtt_harness import start as start_mqtt

    from iotserver.mqtt.packets import MQTT_5, Publish, Subscribe, SubscriptionOptions

    sys_read = '[[mqtt.acl]]\nuser = "anonymous"\ntopic = "$SYS/#"\naccess = "read"\n'
    text = mqtt_config(tmp_path / "d", free_port, sys_read).replace(
        "sys_interval = 0", "sys_interval = 0.1").replace(
        f'endpoint = "tcp:{free_port}:interface=127.0.0.1"',
        f'endpoint = "tcp:{free_port}:interface=127.0.0.1"\nmax_connections = 2')
    root = await start_mqtt(text)
    service = root.core.services["mqtt"]
    listener = service.listeners.listeners[0]
    watcher = await net_connect(free_port, "watcher", MQTT_5)
    hogs = idle_sockets(free_port, 2)  # the second slot, then one too many
    try:
        await wait_for(lambda: listener.stats.refused_listener_full == 1, what="a refusal")
        watcher.send(Subscribe(1, (("$SYS/broker/listeners/#", SubscriptionOptions(0)),)))
        seen: dict[str, bytes] = {}
        while seen.get("$SYS/broker/listeners/refused_listener_full") != b"1":
            p = await watcher.next()
            if isinstance(p, Publish):
                seen[p.topic] = p.payload
        port_topic = f"$SYS/broker/listeners/tcp:{free_port}:interface=127.0.0.1/open"
        while seen.get(port_topic) != b"2":  # the watcher and one idle socket
            p = await watcher.next()
            if isinstance(p, Publish):
                seen[p.topic] = p.payload
        await watcher.close()
    finally:
        for s in hogs:
            s.close()
        await root.stopService()


@pytest.mark.interop
@pytest_twisted.ensureDeferred
async def test_modbus_tls_endpoint_with_its_own_files_requires_client_certificates(
        tmp_path: Path) -> None:
    first = await start(tmp_path)  # creates the local CA and server certificate
    ctx = client_tls(tmp_path, first)
    await stop(first, [])
    tls = tmp_path / "data" / "tls"
    own = (f"tls:0:interface=127.0.0.1:cert={tls / 'server.pem'}:key={tls / 'server.key'}"
           f":ca={tls / 'ca.pem'}")
    text = CONFIG.format(data=tmp_path / "data", max_connections=4, extra="").replace(
        '["tcp:0:interface=127.0.0.1", "tls:0:interface=127.0.0.1"]',
        f'["tcp:0:interface=127.0.0.1", "{own}"]')
    root, core = app.build(config.parse(text, source="t.toml"), reactor)
    root.startService()
    await core.services["modbus"].started
    m = Modbus(root, core, tmp_path / "data")
    try:
        assert await aio(pymodbus_read(m.tls_port, ctx)) == [0, 7]
        anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        anonymous.load_verify_locations(tls / "ca.pem")
        anonymous.check_hostname = False

        async def without_certificate() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", m.tls_port,
                                                           ssl=anonymous)
            try:
                writer.write(bytes.fromhex("000100000006010300000002"))
                return await asyncio.wait_for(reader.read(100), TIMEOUT)
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    await writer.wait_closed()

        # refused by the TLS layer (alert 116, RFC 8446), not only by the role check after it
        with pytest.raises(ssl.SSLError, match=r"(?i)certificate.required"):
            await aio(without_certificate())
    finally:
        await stop(m, [])


@pytest_twisted.ensureDeferred
async def test_mqtt_trickled_connect_is_closed(tmp_path: Path, free_port: int) -> None:
    from helpers.mqtt_harness import mqtt_config
    from helpers.mqtt_harness import start as start_mqtt

    text = mqtt_config(tmp_path / "d", free_port).replace(
        f'endpoint = "tcp:{free_port}:interface=127.0.0.1"',
        f'endpoint = "tcp:{free_port}:interface=127.0.0.1"\nframe_timeout = 1.0\n'
        'login_timeout = 60')
    root = await start_mqtt(text)
    listener = root.core.services["mqtt"].listeners.listeners[0]
    s = idle_sockets(free_port, 1)[0]
    connect = b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x3c\x00\x03abc"
    try:
        await wait_for(lambda: listener.stats.open == 1, what="the connection")
        sent = 0
        while not closed_by_server(s) and sent < len(connect) - 1:  # never the last byte
            with contextlib.suppress(OSError):  # closed meanwhile
                s.send(connect[sent:sent + 1])
            sent += 1
            await sleep(0.2)
        await wait_for(lambda: closed_by_server(s), what="the close")
        assert listener.stats.frame_timeouts == 1 and listener.stats.login_timeouts == 0
    finally:
        s.close()
        await root.stopService()
