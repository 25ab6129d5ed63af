"""Differential property tests: the Modbus server with its fast paths (``fast_paths = true``:
FC06's short way, reading and sending past Twisted's layers) and without them answers the
same random requests, valid and malformed, with the same bytes and leaves the same store."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.testing import StringTransport

from fastpath_servers import make_server, snapshot

from iotserver import compat_twisted


def adu(tid: int, unit: int, pdu: bytes, protocol: int = 0, length: int | None = None) -> bytes:
    return struct.pack(">HHHB", tid, protocol, len(pdu) + 1 if length is None else length,
                       unit) + pdu


addr = st.integers(0, 14)
u16 = st.integers(0, 0xFFFF)
pdus = st.one_of(
    st.builds(lambda fc, a, n: struct.pack(">BHH", fc, a, n),
              st.sampled_from([1, 2, 3, 4]), addr, st.integers(0, 130)),
    st.builds(lambda a, v: struct.pack(">BHH", 5, a, v), addr,
              st.sampled_from([0, 0xFF00, 0x1234])),
    st.builds(lambda a, v: struct.pack(">BHH", 6, a, v), addr, u16),
    st.builds(lambda a, v: struct.pack(">BHH", 6, a, v), st.integers(0, 2), u16),
    st.builds(lambda a, bits, extra: struct.pack(">BHHB", 0x0F, a, len(bits),
                                                 (len(bits) + 7) // 8 + extra)
              + bytes((len(bits) + 7) // 8 + max(extra, 0)),
              addr, st.lists(st.booleans(), min_size=1, max_size=12), st.sampled_from([0, 0, 1])),
    st.builds(lambda a, vals: struct.pack(f">BHHB{len(vals)}H", 0x10, a, len(vals),
                                          2 * len(vals), *vals),
              addr, st.lists(u16, min_size=1, max_size=6)),
    st.builds(lambda a, am, om: struct.pack(">BHHH", 0x16, a, am, om), addr, u16, u16),
    st.builds(lambda ra, rn, wa, vals: struct.pack(f">BHHHHB{len(vals)}H", 0x17, ra, rn, wa,
                                                   len(vals), 2 * len(vals), *vals),
              addr, st.integers(1, 4), addr, st.lists(u16, min_size=1, max_size=4)),
    st.just(bytes((0x11,))),
    st.just(bytes((0x2B, 0x0E, 0x01, 0x00))),
    st.binary(min_size=1, max_size=10),
)
frames = st.builds(lambda tid, unit, pdu: adu(tid, unit, pdu), u16,
                   st.sampled_from([1, 1, 1, 1, 9]), pdus)
broken = st.one_of(
    st.builds(lambda pdu: adu(1, 1, pdu, protocol=1), pdus),
    st.builds(lambda pdu, n: adu(1, 1, pdu, length=n), pdus, st.sampled_from([0, 1, 255, 300])),
)
requests = st.tuples(st.lists(frames, min_size=1, max_size=8), st.one_of(st.none(), broken))


# -------------------------------------------------------------------- in-process (StringTransport)


@settings(max_examples=150, deadline=None)
@given(requests, st.booleans())
def test_fast_and_plain_answer_alike_in_process(reqs: tuple[list[bytes], bytes | None],
                                                split: bool) -> None:
    frames_, tail = reqs
    out = []
    for fast in (True, False):
        clock = task.Clock()
        server = make_server(fast, clock)
        proto = server.factory().buildProtocol(None)
        tr = StringTransport()
        proto.makeConnection(tr)
        replies = []
        for frame in [*frames_, *([tail] if tail else [])]:
            if split and len(frame) > 3:
                proto.dataReceived(frame[:3])
                proto.dataReceived(frame[3:])
            else:
                proto.dataReceived(frame)
            clock.advance(0)
            replies.append(tr.value())
            tr.clear()
        out.append((replies, snapshot(server), tr.disconnecting, dict(server.stats.exceptions)))
        server.stop()
    assert out[0] == out[1]


# ------------------------------------------------------------------------------ real sockets
# The servers run in a child process (tests/fastpath_servers.py): pytest-twisted runs
# synchronous tests inside the reactor, so a Hypothesis test cannot wait for the reactor.


class Servers:
    def __init__(self) -> None:
        here = Path(__file__).resolve().parent
        self.proc = subprocess.Popen([sys.executable, str(here / "fastpath_servers.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        words = self.proc.stdout.readline().split()
        assert words[0] == "ports", words
        self.ports = [int(w) for w in words[1:]]

    def dump(self) -> list[Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("dump\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())  # type: ignore[no-any-return]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    s = Servers()
    try:
        yield s
    finally:
        s.close()


def exchange(port: int, frames_: list[bytes]) -> tuple[list[bytes], bool]:
    """Send frames one at a time, each after the previous reply: the replies, and whether
    the server closed the connection."""
    replies: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        for frame in frames_:
            sock.sendall(frame)
            while True:
                if len(buf) >= 6 and len(buf) >= 6 + struct.unpack_from(">H", buf, 4)[0]:
                    n = 6 + struct.unpack_from(">H", buf, 4)[0]
                    replies.append(buf[:n])
                    buf = buf[n:]
                    break
                try:
                    data = sock.recv(4096)
                except ConnectionResetError:
                    data = b""
                if not data:
                    return replies, True
                buf += data
    return replies, False


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reqs=requests)
def test_fast_and_plain_answer_alike_over_tcp(servers: Servers,
                                              reqs: tuple[list[bytes], bytes | None]) -> None:
    frames_, tail = reqs
    sent = [*frames_, *([tail] if tail else [])]
    fast, plain = (exchange(port, sent) for port in servers.ports)
    assert fast == plain
    stores = servers.dump()
    assert stores[0] == stores[1]


def test_fast_paths_switch_and_compat_check() -> None:
    """fast_paths = false turns every shortcut off; on, they are on where Twisted allows."""
    on = make_server(True, task.Clock())
    off = make_server(False, task.Clock())
    assert on.fast is compat_twisted.AVAILABLE and off.fast is False
    proto = off.factory().buildProtocol(None)
    proto.makeConnection(StringTransport())
    assert not proto._short and not proto._eager and proto._reader is None
    # this Twisted has everything the fast paths use (CI tests the pinned range)
    assert compat_twisted.PROBLEM == ""


def test_missing_twisted_internal_is_named_in_one_line_and_turns_fast_paths_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import twisted
    from twisted.internet import asyncioreactor
    from twisted.logger import globalLogPublisher

    monkeypatch.delattr(asyncioreactor.AsyncioSelectorReactor, "_readOrWrite")
    problem = compat_twisted._check()
    assert problem == (f"Twisted {twisted.__version__} lacks AsyncioSelectorReactor."
                       "_readOrWrite(): the Modbus server's fast paths are off")
    monkeypatch.setattr(compat_twisted, "AVAILABLE", False)
    monkeypatch.setattr(compat_twisted, "PROBLEM", problem)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        server = make_server(True, task.Clock())
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert server.fast is False
    assert [e["problem"] for e in events if "problem" in e] == [problem]
    proto = server.factory().buildProtocol(None)
    proto.makeConnection(StringTransport())
    assert not proto._short
