"""Bounded input on the OPC UA TCP listener (Part 6 7.1): raw bytes from a socket, and an
asyncua client for what needs a whole secure channel."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from asyncua import ua
from asyncua.common.utils import Buffer
from asyncua.ua.ua_binary import struct_from_binary
from helpers import free_port, wait_for_aio
from helpers.opcua import aio, client, make_config, start

from iotserver.opcua import compat
from iotserver.opcua.channel import ChannelLimits, UaListener

TCP_TOO_LARGE = ua.StatusCodes.BadTcpMessageTooLarge


def hello(size_override: int | None = None, url: str = "opc.tcp://127.0.0.1/x",
          max_message: int = 0) -> bytes:
    body = struct.pack("<IIIII", 0, 65535, 65535, max_message, 0)
    enc = url.encode()
    body += struct.pack("<i", len(enc)) + enc
    size = 8 + len(body) if size_override is None else size_override
    return b"HELF" + struct.pack("<I", size) + body


async def exchange(port: int, data: bytes, *, then: bytes = b"") -> tuple[bytes, bool]:
    """Send ``data`` (and ``then`` after the first answer); return what came back and whether
    the server closed the connection (bounded waits)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    closed = False
    try:
        writer.write(data)
        await writer.drain()
        if then:
            received += await asyncio.wait_for(reader.read(65536), 10)
            writer.write(then)
            await writer.drain()
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            if not chunk:
                closed = True
                break
            received += chunk
    finally:
        writer.close()
    return received, closed


def error_code(data: bytes) -> int:
    assert data[:3] == b"ERR", data[:16]
    return int(struct_from_binary(ua.ErrorMessage, Buffer(data[8:])).Error.value)


@pytest.fixture
def extra() -> str:
    return ("hello_timeout_s = 0.5\nmax_message_size = 65536\nmax_chunk_count = 4\n"
            "max_connections = 3\n")


@pytest_twisted.ensureDeferred
async def test_oversized_and_unexpected_headers_are_refused_unbuffered(tmp_path: Path,
                                                                       extra: str) -> None:
    running = await start(make_config(tmp_path / "data", free_port(), anonymous=True,
                                      extra=extra))
    port = running.service.layer.listener.port
    stats = running.service.layer.listener.stats

    async def body() -> None:
        # a HEL header claiming 2 GiB: refused on the header, nothing of it buffered
        got, closed = await exchange(port, b"HELF" + struct.pack("<I", 2**31) + b"x" * 1000)
        assert closed and error_code(got) == TCP_TOO_LARGE
        # after a good HEL, a MSG chunk claiming 2 GiB
        ack_and_err, closed = await exchange(
            port, hello(), then=b"MSGF" + struct.pack("<I", 2**31) + b"\0" * 64)
        assert ack_and_err[:3] == b"ACK" and closed
        ack = struct_from_binary(ua.Acknowledge, Buffer(ack_and_err[8:28]))
        assert ack.MaxMessageSize == 65536 and ack.MaxChunkCount == 4
        assert ack.ReceiveBufferSize == 65535 and ack.SendBufferSize == 65535
        assert error_code(ack_and_err[28:]) == TCP_TOO_LARGE
        # anything but HEL first, or an unknown type
        got, closed = await exchange(port, b"MSGF" + struct.pack("<I", 100) + b"\0" * 92)
        assert closed and error_code(got) == ua.StatusCodes.BadTcpMessageTypeInvalid
        got, closed = await exchange(port, b"XYZF" + struct.pack("<I", 16) + b"\0" * 8)
        assert closed and error_code(got) == ua.StatusCodes.BadTcpMessageTypeInvalid
        # a client that never says HEL, or never opens a secure channel, is closed after
        # hello_timeout_s
        got, closed = await exchange(port, b"")
        assert closed and got == b""
        got, closed = await exchange(port, hello())
        assert closed and got[:3] == b"ACK"
        assert stats.too_large == 2 and stats.hello_timeouts == 2 and stats.malformed == 4
        counters = running.service.stats
        assert counters["channel_too_large"] == 2 and counters["channel_hello_timeouts"] == 2
        # beyond max_connections a connection is closed at once
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        got, closed = await exchange(port, hello())
        assert closed and got == b"" and stats.refused == 1
        for _, writer in held:
            writer.close()
        await running.wait_idle()
        assert not running.service.layer.listener.channels

    try:
        await aio(body())
    finally:
        await running.root.stopService()


@pytest_twisted.ensureDeferred
async def test_a_message_over_the_negotiated_size_closes_the_channel(tmp_path: Path,
                                                                     extra: str) -> None:
    running = await start(make_config(tmp_path / "data", free_port(), anonymous=True,
                                      extra=extra))
    stats = running.service.layer.listener.stats

    async def body() -> None:
        async with client(running) as c:
            node = c.get_node(ua.NodeId("Line1/Name", running.service.space.idx))
            with pytest.raises(Exception):  # noqa: B017 - the connection is closed under it
                await asyncio.wait_for(node.write_value("x" * 200_000), 15)
        assert stats.too_large == 1

    try:
        await aio(body())
    finally:
        await running.root.stopService()


@pytest_twisted.ensureDeferred
async def test_read_max_age_and_browse_of_unknown_nodes(tmp_path: Path) -> None:
    running = await start(make_config(tmp_path / "data", free_port(), anonymous=True))

    async def body() -> None:
        async with client(running) as c:
            params = ua.ReadParameters()
            params.MaxAge = -1
            params.NodesToRead = [ua.ReadValueId(NodeId=ua.NodeId(ua.ObjectIds.Server),
                                                 AttributeId=ua.AttributeIds.BrowseName)]
            with pytest.raises(ua.UaStatusCodeError) as info:
                await c.uaclient.read(params)
            assert info.value.code == ua.StatusCodes.BadMaxAgeInvalid
            browse = ua.BrowseParameters()
            desc = ua.BrowseDescription()
            desc.NodeId = ua.NodeId("No/Such/Node", running.service.space.idx)
            browse.NodesToBrowse = [desc]
            results = await c.uaclient.browse(browse)
            assert results[0].StatusCode.value == ua.StatusCodes.BadNodeIdUnknown

    try:
        await aio(body())
    finally:
        await running.root.stopService()


def test_malformed_warnings_are_rate_limited() -> None:
    """The listener logs through the server's one rate-limited log, on the session clock."""
    from types import SimpleNamespace

    from twisted.internet.task import Clock
    from twisted.logger import Logger

    events: list[Any] = []
    clock = Clock()
    clock.advance(1000)
    listener = UaListener(cast(Any, None), cast(Any, SimpleNamespace(clock=clock)), None, [],
                          ChannelLimits())
    listener.ratelog.log = Logger(namespace="iotserver.opcua", observer=events.append)
    for _ in range(5):
        listener.ratelog.warn("malformed", "bad input from {peer}", peer="x")
    clock.advance(11)
    listener.ratelog.warn("malformed", "bad input from {peer}", peer="y")
    assert [e["peer"] for e in events] == ["x", "y"]
    assert events[1]["suppressed"] == 4 and listener.ratelog.suppressed["malformed"] == 4


def test_compat_names_the_asyncua_version_in_one_line(monkeypatch: Any) -> None:
    compat.check()  # the installed asyncua has everything
    monkeypatch.setattr(compat, "PROBLEMS", ["Server has no _policies"])
    with pytest.raises(compat.AsyncuaIncompatible) as info:
        compat.check()
    text = str(info.value)
    assert "\n" not in text and f"asyncua {compat.ASYNCUA_VERSION}" in text
    assert "_policies" in text


@pytest_twisted.ensureDeferred
async def test_secure_channel_renewal_keeps_the_session(tmp_path: Path) -> None:
    from asyncua import Client

    running = await start(make_config(tmp_path / "data", free_port(), anonymous=True))
    stats = running.service.layer.listener.stats

    async def body() -> None:
        c = Client(running.url, timeout=10)
        c.secure_channel_timeout = 1000  # ms: asyncua renews at 75 % of it
        await c.connect()
        try:
            await wait_for_aio(lambda: stats.renewals >= 2, what="two channel renewals")
            assert await c.nodes.server_state.read_value() == 0
        finally:
            await c.disconnect()
        await running.wait_idle()

    try:
        await aio(body())
    finally:
        await running.root.stopService()


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5555)


class FakeTable:
    def __init__(self) -> None:
        from twisted.internet.task import Clock

        self.clock = Clock()

    def channel_lost(self, channel: Any) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_a_response_over_the_clients_max_message_size_becomes_a_fault() -> None:
    from asyncua.ua.ua_binary import struct_to_binary

    from iotserver.opcua.channel import ChannelLimits, UaChannel, UaListener

    async def body() -> None:
        listener = UaListener(None, FakeTable(), None, [], ChannelLimits())  # type: ignore[arg-type]
        channel = UaChannel(listener)
        transport = FakeTransport()
        channel.connection_made(transport)
        try:
            channel.data_received(hello(max_message=10_000))
            assert transport.written[-1][:3] == b"ACK"
            channel.is_open = True  # as after OpenSecureChannel (policy None frames as is)
            response = ua.ReadResponse()
            response.ResponseHeader.RequestHandle = 42
            response.Results = [ua.DataValue(ua.Variant("x" * 20_000))]
            channel.send(7, struct_to_binary(response))
            chunk = transport.written[-1]
            assert chunk[:4] == b"MSGF" and len(chunk) < 200
            # MSG header 12, symmetric security header 4, sequence header 8, then the body
            fault = struct_from_binary(ua.ServiceFault, Buffer(chunk[24:]))
            assert fault.ResponseHeader.RequestHandle == 42
            assert fault.ResponseHeader.ServiceResult.value == ua.StatusCodes.BadResponseTooLarge
            assert listener.stats.response_too_large == 1
        finally:
            channel.connection_lost(None)

    await aio(body())


@pytest_twisted.ensureDeferred
async def test_a_channel_whose_token_is_not_renewed_is_closed(tmp_path: Path) -> None:
    from asyncua import Client

    running = await start(make_config(tmp_path / "data", free_port(), anonymous=True))
    layer = running.service.layer

    async def body() -> None:
        c = Client(running.url, timeout=10, watchdog_intervall=60)
        c.secure_channel_timeout = 1000  # ms, the shortest lifetime we grant
        await c.connect()
        try:
            task = c._renew_channel_task  # a client that stops renewing its token
            assert task is not None
            task.cancel()
            await wait_for_aio(lambda: layer.listener.stats.token_expired >= 1,
                               what="the channel to be closed")
            await running.wait_idle()
            assert not layer.listener.channels
        finally:
            with contextlib.suppress(Exception):
                await c.disconnect()
        await running.wait_idle()

    try:
        await aio(body())
    finally:
        await running.root.stopService()


@pytest_twisted.ensureDeferred
async def test_one_address_cannot_hold_every_connection(tmp_path: Path) -> None:
    """max_connections_per_address: a host holding its share of idle connections leaves the
    listener open to another host (127.0.0.2 is loopback too)."""
    running = await start(make_config(tmp_path / "data", free_port(), anonymous=True,
                                      extra="max_connections_per_address = 2\n"))
    layer = running.service.layer
    port, stats = layer.listener.port, layer.listener.stats

    async def body() -> None:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await wait_for_aio(lambda: len(layer.listener.channels) == 2, what="two connections")
        got, closed = await exchange(port, hello())  # a third from the same host
        assert closed and got == b"" and stats.refused_per_address == 1
        reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                       local_addr=("127.0.0.2", 0))
        try:
            writer.write(hello())
            await writer.drain()
            ack = await asyncio.wait_for(reader.read(65536), 10)
            assert ack[:3] == b"ACK"  # another host is served
        finally:
            writer.close()
        for _, w in held:
            w.close()
        await running.wait_idle()
        assert running.service.stats is not None
        assert running.service.stats["channel_refused_per_address"] == 1

    try:
        await aio(body())
    finally:
        await running.root.stopService()
