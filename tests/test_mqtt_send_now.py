"""The broker's immediate send on plain TCP (``compat_twisted.send_now``): what a read
produced is in the socket when ``dataReceived`` returns, not on a later reactor turn, and a
full transport still buffers everything, in order, with the connection paused as a producer
until it drains."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from helpers.mqtt_harness import mqtt_config, port_of, start
from twisted.internet import reactor, task

from iotserver.mqtt import protocol
from iotserver.mqtt.codec import encode
from iotserver.mqtt.packets import MQTT_3_1_1, Connect, Publish


async def _until(cond: Callable[[], bool], what: str, turns: int = 2000) -> None:
    """Let the reactor run until ``cond()`` holds (bounded)."""
    for _ in range(turns):
        if cond():
            return
        await task.deferLater(reactor, 0.001, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


def _recv_now(sock: socket.socket) -> bytes:
    """What is in the client socket right now, without letting the reactor run."""
    try:
        return sock.recv(1 << 20)
    except BlockingIOError:
        return b""


async def _connected(root: Any, client_id: str) -> tuple[socket.socket, Any]:
    """A raw non-blocking loopback client logged in as ``client_id``, and its server side."""
    broker = root.core.services["mqtt"].broker
    sock = socket.create_connection(("127.0.0.1", port_of(root)))
    sock.setblocking(False)
    sock.send(encode(Connect(client_id, MQTT_3_1_1, True, 0, None, None, None), MQTT_3_1_1))
    got = bytearray()

    def connack() -> bool:
        got.extend(_recv_now(sock))
        return len(got) >= 4

    await _until(connack, "CONNACK")
    assert bytes(got[:4]) == b"\x20\x02\x00\x00"
    await _until(lambda: client_id in broker.clients, "the session")
    return sock, broker.clients[client_id]


@pytest.mark.parametrize("eager", [True, False])
@pytest_twisted.ensureDeferred
async def test_pubacks_of_a_read_are_in_the_socket_when_the_read_returns(
        tmp_path: Path, eager: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "EAGER_SEND", eager)
    root = await start(mqtt_config(tmp_path / "d", 0))
    sock, proto = await _connected(root, "c")
    try:
        assert proto._eager is eager
        # a read carrying three QoS 1 PUBLISHes: three PUBACKs, written by one flush
        burst = b"".join(encode(Publish(f"t/{i}", b"x", 1, False, False, i + 1), MQTT_3_1_1)
                         for i in range(3))
        proto.dataReceived(burst)
        pubacks = b"".join(bytes((0x40, 2, 0, i + 1)) for i in range(3))
        if eager:  # sent, together, before dataReceived returned: no reactor turn in between
            assert _recv_now(sock) == pubacks
        else:  # Twisted's write sends on a later reactor turn
            root.core.services["mqtt"].broker.flush()  # what the end of the turn does
            assert _recv_now(sock) == b""
            got = bytearray()
            await _until(lambda: bool(got.extend(_recv_now(sock))) or len(got) >= 12, "PUBACKs")
            assert bytes(got) == pubacks
    finally:
        sock.close()
        await root.stopService()


@pytest_twisted.ensureDeferred
async def test_full_transport_buffers_in_order_and_pauses(tmp_path: Path) -> None:
    root = await start(mqtt_config(tmp_path / "d", 0).replace(
        "sys_interval = 0", "sys_interval = 0\n\n[mqtt.limits]\nwrite_buffer_bytes = 65536"))
    sock, proto = await _connected(root, "c")
    try:
        assert proto._eager
        transport = proto.transport
        # bytes already queued in Twisted's buffer: a flush must queue behind them
        transport.write(b"<queued>")
        proto.write(b"<next>")
        proto.flush()
        assert _recv_now(sock) == b""
        # the client stops reading: flushes fill the socket, the rest is buffered by Twisted
        chunks: list[bytes] = []
        for i in range(4000):  # bounded: 4000 x 4 KiB
            chunk = f"{i:08d}".encode() * 512
            chunks.append(chunk)
            proto.write(chunk)
            proto.flush()
            if proto.paused:
                break
        assert proto.paused, "the transport never paused its producer"
        assert transport.dataBuffer or transport._tempDataBuffer
        expected = b"<queued><next>" + b"".join(chunks)
        got = bytearray()

        def drained() -> bool:
            got.extend(_recv_now(sock))
            return len(got) >= len(expected)

        await _until(drained, "everything buffered", turns=20000)
        assert bytes(got) == expected
        await _until(lambda: not proto.paused, "resumeProducing")
    finally:
        sock.close()
        await root.stopService()
