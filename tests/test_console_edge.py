"""The SSH console's door: a login grace time, and malformed SSH packets before login closing
that one connection with one log line, no traceback (the real console listener, raw sockets,
then the OpenSSH client to show it still serves)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from pathlib import Path
from typing import Any

import pytest_twisted
from helpers import aio
from helpers.console import NEEDS_SSH, start_console, stop_console
from twisted.internet import reactor, task
from twisted.logger import LogLevel, globalLogPublisher

pytestmark = NEEDS_SSH

TIMEOUT = 10.0
VERSION = b"SSH-2.0-fuzz_1.0\r\n"


def packet(payload: bytes, padding: int | None = None, length: int | None = None) -> bytes:
    """An unencrypted SSH binary packet (RFC 4253 section 6), optionally with lies in it."""
    pad = 8 - (5 + len(payload)) % 8
    pad = pad + 8 if pad < 4 else pad
    pad_field = pad if padding is None else padding
    body = bytes((pad_field,)) + payload + b"\x00" * pad
    return struct.pack(">I", len(body) if length is None else length) + body


def name_list(text: bytes) -> bytes:
    return struct.pack(">I", len(text)) + text


KEXINIT_OK_START = b"\x14" + b"\x00" * 16  # msg 20 + cookie

MALFORMED = [
    packet(KEXINIT_OK_START + b"\x00\x00\x00"),  # KEXINIT cut inside its first name-list
    packet(KEXINIT_OK_START + name_list(b"curve25519-sha256") + b"\xff\xff\xff\xff"),
    packet(KEXINIT_OK_START + b"".join(name_list(b"\xff\xfe") for _ in range(10)) + b"\x00" * 5),
    packet(b"\x14"),  # KEXINIT with nothing in it
    packet(b"\x1e" + b"\x00\x00\x00\x05abc"),  # KEX_ECDH_INIT before any KEXINIT, cut short
    packet(b"\x05" + b"\xff\xff\xff\xff"),  # SERVICE_REQUEST with a lying string length
    packet(b"\x14", padding=250),  # padding longer than the packet
    packet(b""),  # an empty payload
    struct.pack(">I", 0xFFFFFFF0) + b"\x04" + b"\x00" * 16,  # packet length 4 GB
    # these two wait for more bytes that never come: the frame timeout closes them
    b"\x00\x00\x00\x03\x01\x00\x00",  # shorter than one cipher block
    bytes(range(256)) * 4,  # noise, read as a packet of 66051 bytes
]


async def exchange(port: int, data: bytes) -> bool:
    """Send the version line and ``data``; True when the server closes within TIMEOUT."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(VERSION + data)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
            except ConnectionError:
                return True
            except TimeoutError:
                return False
            if not chunk:
                return True
        return False
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):  # the server aborted: a reset
            await writer.wait_closed()


@pytest_twisted.ensureDeferred
async def test_malformed_packets_before_login_close_quietly(tmp_path: Path,
                                                          free_port: int) -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    console = await start_console(tmp_path, free_port, "frame_timeout = 1.0")
    try:
        for data in MALFORMED:
            assert await aio(exchange(free_port, data)), f"not closed after {data[:20]!r}"
        # the console still serves a real client afterwards
        out, err, code = await console.ssh("6 * 7")
        assert (out, code) == ("42\n", 0), err
    finally:
        await stop_console(console)
        globalLogPublisher.removeObserver(events.append)
    bad = [e for e in events if "log_failure" in e or e.get("log_level") in (
        LogLevel.critical, LogLevel.error)]
    assert bad == [], [e.get("log_format") for e in bad]
    service = console.core.services["console"]
    assert service.factory.malformed >= 1
    warned = [e for e in events if e.get("log_namespace") == "iotserver.console"
              and "malformed SSH packet" in (e.get("log_format") or "")]
    assert 1 <= len(warned) <= service.factory.malformed  # one line, rate-limited


@pytest_twisted.ensureDeferred
async def test_login_grace_time_closes_a_connection_that_never_logs_in(
        tmp_path: Path, free_port: int) -> None:
    console = await start_console(tmp_path, free_port, "login_timeout = 1.0")
    try:
        # the version line and nothing else: closed once the grace time is over
        assert await aio(exchange(free_port, b""))
        listener = console.core.services["console"].listeners.listeners[0]
        assert listener.stats.login_timeouts == 1
        # a real login within the grace time is not affected
        out, err, code = await console.ssh("1 + 1")
        assert (out, code) == ("2\n", 0), err
        assert listener.stats.login_timeouts == 1
        stats = console.core.services["console"].edge_stats()
        assert stats[listener.name]["login_timeouts"] == 1
    finally:
        await stop_console(console)
    await task.deferLater(reactor, 0, lambda: None)
