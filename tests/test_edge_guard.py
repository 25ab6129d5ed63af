"""The edge guard on an injected clock: per-listener and per-peer limits, slots freed at once,
login, frame (trickling), idle timeouts, counters and rate-limited log lines."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from iotserver.edge.guard import GuardedFactory, Probe
from iotserver.edge.limits import Limits

LIMITS = Limits(max_connections=3, max_connections_per_peer=2, handshake_timeout=5,
                login_timeout=10, frame_timeout=4, idle_timeout=30)


class Lines(Protocol):
    """A toy protocol: frames are lines; it counts the complete ones."""

    def __init__(self) -> None:
        self.buf = b""
        self.frames = 0
        self.made = False
        self.lost = False

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while b"\n" in self.buf:
            _, self.buf = self.buf.split(b"\n", 1)
            self.frames += 1

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True


class LinesFactory(Factory):
    def buildProtocol(self, addr: Any) -> Lines:
        return Lines()


PROBE = Probe(partial=lambda p: bool(p.buf))


def addr(host: str = "10.0.0.1", port: int = 40000) -> IPv4Address:
    return IPv4Address("TCP", host, port)


def guarded(limits: Limits = LIMITS, probe: Probe = PROBE) -> tuple[GuardedFactory, Clock]:
    clock = Clock()
    return GuardedFactory("Test tcp:1", LinesFactory(), limits, clock, probe=probe), clock


def connect(f: GuardedFactory, host: str = "10.0.0.1") -> tuple[Any, StringTransport]:
    proto = f.buildProtocol(addr(host))
    transport = StringTransport()
    if proto is not None:
        proto.makeConnection(transport)
    return proto, transport


def lose(proto: Any) -> None:
    proto.connectionLost(Failure(ConnectionError("gone")))


def test_listener_limit_is_per_listener_and_freed_at_once() -> None:
    f, _ = guarded()
    other, _ = guarded()
    protos = [connect(f, f"10.0.0.{i}")[0] for i in range(3)]
    assert all(p is not None for p in protos)
    assert connect(f, "10.0.0.9")[0] is None  # full
    assert f.stats.refused_listener_full == 1
    assert connect(other, "10.0.0.9")[0] is not None  # a full listener is not shared
    lose(protos[0])
    assert f.stats.open == 2
    assert connect(f, "10.0.0.9")[0] is not None  # the slot came back with the loss
    assert f.stats.accepted == 4 and f.stats.open_maximum == 3


def test_per_peer_limit() -> None:
    f, _ = guarded()
    a1, _ = connect(f, "10.0.0.1")
    connect(f, "10.0.0.1")
    assert connect(f, "10.0.0.1")[0] is None
    assert f.stats.refused_peer_full == 1
    assert connect(f, "10.0.0.2")[0] is not None  # another address still gets in
    lose(a1)
    assert connect(f, "10.0.0.1")[0] is not None


def test_guard_hands_the_protocol_the_real_transport() -> None:
    f, _ = guarded()
    guard, transport = connect(f)
    assert guard.inner.made and guard.inner.transport is transport
    guard.dataReceived(b"hello\n")
    assert guard.inner.frames == 1
    lose(guard)
    assert guard.inner.lost


def test_login_timeout_until_first_complete_frame() -> None:
    f, clock = guarded()
    _silent, silent_t = connect(f, "10.0.0.1")
    talker, talker_t = connect(f, "10.0.0.2")
    clock.advance(9)
    talker.dataReceived(b"hi\n")
    clock.advance(1.5)
    assert silent_t.disconnecting and not talker_t.disconnecting
    assert f.stats.login_timeouts == 1
    assert f.stats.open == 1  # the silent one's slot is free before its loss is processed


def test_login_timeout_with_an_asynchronous_login() -> None:
    state = {"in": False}
    f, clock = guarded(probe=Probe(partial=PROBE.partial, greeted=lambda p: state["in"]))
    proto, transport = connect(f)
    proto.dataReceived(b"user x\n")  # a complete frame, but not logged in yet
    state["in"] = True  # the login completes later (a password check in a thread)
    clock.advance(10)
    assert not transport.disconnecting and f.stats.login_timeouts == 0
    state["in"] = False  # the next one never logs in
    proto2, transport2 = connect(f, "10.0.0.3")
    proto2.dataReceived(b"user y\n")
    clock.advance(10)
    assert transport2.disconnecting and f.stats.login_timeouts == 1


def test_trickling_frame_is_closed_although_bytes_keep_coming() -> None:
    f, clock = guarded()
    proto, transport = connect(f)
    proto.dataReceived(b"ok\n")  # greeted
    for _ in range(3):  # one byte every 1.5 s: never idle, the frame never ends
        proto.dataReceived(b"x")
        clock.advance(1.3)
    assert not transport.disconnecting  # 3.9 s after the frame's first byte
    clock.advance(0.2)
    assert transport.disconnecting
    assert f.stats.frame_timeouts == 1 and f.stats.idle_timeouts == 0


def test_frames_completed_in_time_keep_the_connection() -> None:
    f, clock = guarded()
    proto, transport = connect(f)
    for _ in range(20):
        proto.dataReceived(b"ab")
        clock.advance(3)
        proto.dataReceived(b"c\n")  # each frame takes 3 s < 4 s
        clock.advance(3)
    assert not transport.disconnecting and proto.inner.frames == 20


def test_idle_timeout_counts_from_the_last_byte() -> None:
    f, clock = guarded()
    proto, transport = connect(f)
    proto.dataReceived(b"ok\n")
    clock.advance(25)
    proto.dataReceived(b"ping\n")
    clock.advance(25)
    assert not transport.disconnecting  # 25 s since the last byte
    clock.advance(5)
    assert transport.disconnecting and f.stats.idle_timeouts == 1


def test_zero_turns_a_timeout_off() -> None:
    f, clock = guarded(replace(LIMITS, login_timeout=0, frame_timeout=0, idle_timeout=0))
    proto, transport = connect(f)
    proto.dataReceived(b"x")
    clock.advance(100_000)
    assert not transport.disconnecting and not clock.getDelayedCalls()


def test_timers_stop_with_the_connection() -> None:
    f, clock = guarded()
    proto, _ = connect(f)
    proto.dataReceived(b"x")
    assert clock.getDelayedCalls()
    lose(proto)
    assert not clock.getDelayedCalls()
    assert f.stats.open == 0


def test_refusals_are_logged_rate_limited() -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        f, clock = guarded(replace(LIMITS, max_connections=1, login_timeout=0))
        connect(f, "10.0.0.1")
        for i in range(50):
            assert connect(f, f"10.0.1.{i}")[0] is None
        clock.advance(11)
        assert connect(f, "10.0.2.1")[0] is None
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [e for e in events if e.get("log_namespace") == "iotserver.edge"
             and e.get("log_level") == LogLevel.warn]
    assert len(lines) == 2 and f.stats.refused_listener_full == 51
    assert lines[1]["suppressed"] == 49


def test_mqtt_probe_trickled_connect_and_slow_login() -> None:
    """The MQTT broker protocol behind the guard: a CONNECT trickled byte by byte is closed by
    the frame timeout; one held by a slow authenticator by the login timeout."""
    from helpers.mqtt_harness import FakeAuth, Harness

    from iotserver.mqtt.codec import encode
    from iotserver.mqtt.packets import MQTT_3_1_1, Connect
    from iotserver.mqtt.service import PROBE as MQTT_PROBE

    limits = replace(LIMITS, login_timeout=10, frame_timeout=4, idle_timeout=0)
    auth = FakeAuth()
    h = Harness(auth=auth)
    f = GuardedFactory("MQTT tcp:1883", h.factory, limits, h.clock, probe=MQTT_PROBE)
    h.factory = f  # type: ignore[assignment]
    connect_bytes = encode(Connect("c", MQTT_3_1_1), MQTT_3_1_1)
    trickler = h.open()
    for byte in connect_bytes[:3]:
        trickler.send_raw(bytes([byte]))
        h.advance(1.5)
    assert trickler.closed and f.stats.frame_timeouts == 1
    auth.hold = True  # the password check takes longer than the login timeout
    slow = h.open()
    slow.send_raw(connect_bytes)
    h.advance(10.1)
    assert slow.closed and f.stats.login_timeouts == 1
    auth.hold = False
    fine = h.open()
    fine.send_raw(connect_bytes)
    h.advance(50)  # well past the login timeout, within its keepalive (60 s x 1.5)
    assert not fine.closed and f.stats.login_timeouts == 1


class PausableTransport(StringTransport):
    """A StringTransport that looks like a TCP connection whose reading can be paused."""

    def __init__(self) -> None:
        import socket

        super().__init__()
        self.socket = socket.socket()
        self.reactor = self
        self.reading = True

    def getReaders(self) -> list[Any]:
        return [self] if self.reading else []

    def pauseProducing(self) -> None:
        self.reading = False

    def resumeProducing(self) -> None:
        self.reading = True


def test_paused_reading_is_not_the_peers_fault() -> None:
    """While the protocol has stopped reading (flow control), an unfinished frame and the
    silence are ours: neither the frame nor the idle timeout closes the connection."""
    f, clock = guarded()
    proto = f.buildProtocol(addr())
    transport = PausableTransport()
    try:
        proto.makeConnection(transport)
        proto.dataReceived(b"ok\n")
        proto.dataReceived(b"half a fra")
        transport.pauseProducing()  # e.g. a write waits for a slow PLC
        clock.advance(35)  # past frame_timeout (4) and idle_timeout (30)
        assert not transport.disconnecting
        transport.resumeProducing()
        clock.advance(4)  # a fresh frame period once we read again: the peer is late now
        assert transport.disconnecting and f.stats.frame_timeouts == 1
    finally:
        transport.socket.close()
