"""Shared harness for the broker's protocol and broker tests: the Twisted protocol over
``StringTransport`` and ``task.Clock``, clients that speak through the sans-I/O codec, and
the broker service started in-process on loopback (:func:`mqtt_config`, :func:`start`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from iotserver import app, config
from iotserver.mqtt.broker import Broker
from iotserver.mqtt.codec import Decoder, encode
from iotserver.mqtt.config import LimitsConfig, ListenerConfig, MqttConfig
from iotserver.mqtt.packets import (
    MQTT_3_1_1,
    NO_PROPERTIES,
    Connack,
    Connect,
    Packet,
    Properties,
    Publish,
    ReasonCode,
    Will,
)
from iotserver.mqtt.protocol import MqttServerFactory, MqttServerProtocol


class AuthResult:
    def __init__(self, ok: bool, user: str | None, reason: int = 0) -> None:
        self.ok = ok
        self.user = user
        self.reason = reason


class FakeAuth:
    """Anyone may log in as the user name they give, except user "bad"; ``hold`` keeps the
    answer pending until ``release()``."""

    def __init__(self) -> None:
        self.hold = False
        self.pending: list[tuple[Deferred[Any], AuthResult]] = []
        self.calls: list[tuple[Any, ...]] = []

    def authenticate(self, client_id: str, username: str | None, password: bytes | None,
                     cert_identity: str | None, peer: str | None = None) -> Deferred[Any]:
        self.calls.append((client_id, username, password, cert_identity, peer))
        if username == "bad":
            result = AuthResult(False, None, ReasonCode.BAD_USER_NAME_OR_PASSWORD)
        else:
            result = AuthResult(True, username)
        if self.hold:
            d: Deferred[Any] = Deferred()
            self.pending.append((d, result))
            return d
        return succeed(result)

    def release(self) -> None:
        pending, self.pending = self.pending, []
        for d, result in pending:
            d.callback(result)


class AllowAcl:
    """Allow-all ACL with an optional deny list of topic prefixes (for ACL paths)."""

    def __init__(self, deny: tuple[str, ...] = ()) -> None:
        self.deny = deny

    def can_publish(self, user: str | None, client_id: str, topic: str) -> bool:
        return not topic.startswith(self.deny) if self.deny else True

    def can_subscribe(self, user: str | None, client_id: str, topic_filter: str) -> bool:
        return not topic_filter.startswith(self.deny) if self.deny else True

    def can_receive(self, user: str | None, client_id: str, topic: str) -> bool:
        return not topic.startswith(self.deny) if self.deny else True


class Client:
    """One connection: ``send`` packets, ``packets()`` decodes what the broker wrote."""

    def __init__(self, harness: Harness, version: int) -> None:
        self.h = harness
        self.version = version
        self.transport = StringTransport()
        self.proto: MqttServerProtocol = harness.factory.buildProtocol(None)
        self.proto.makeConnection(self.transport)
        self.decoder = Decoder(role="client", version=version)
        self.lost = False
        self.pending: list[Packet] = []  # decoded but not yet returned by packets()

    def send(self, *packets: Packet) -> None:
        self.send_raw(b"".join(encode(p, self.version) for p in packets))

    def send_raw(self, data: bytes) -> None:
        self.proto.dataReceived(data)
        self.h.pump()
        self._check_closed()

    def _check_closed(self) -> None:
        if self.transport.disconnecting and not self.lost:
            self.lost = True
            self.proto.connectionLost(Failure(ConnectionLost()))

    def packets(self) -> list[Packet]:
        self.h.pump()
        data = self.transport.value()
        self.transport.clear()
        pending, self.pending = self.pending, []
        return pending + self.decoder.feed(data)

    def publishes(self) -> list[Publish]:
        return [p for p in self.packets() if isinstance(p, Publish)]

    def one(self, cls: type) -> Any:
        got = self.packets()
        assert len(got) == 1 and isinstance(got[0], cls), got
        return got[0]

    @property
    def closed(self) -> bool:
        self._check_closed()
        return self.transport.disconnecting

    def drop(self) -> None:
        """The network connection breaks (no DISCONNECT)."""
        if not self.lost:
            self.lost = True
            self.proto.connectionLost(Failure(ConnectionLost()))
        self.h.pump()


class Harness:
    def __init__(self, *, acl: Any = None, store: Any = None, auth: FakeAuth | None = None,
                 cfg: MqttConfig | None = None, **limits: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        lst = ListenerConfig("tcp:0", allow_anonymous=True)
        self.cfg = cfg or MqttConfig(listeners=(lst,), limits=LimitsConfig(**limits))
        self.broker = Broker(self.cfg, self.clock, acl=acl, store=store)
        self.auth = auth or FakeAuth()
        self.factory = MqttServerFactory(self.broker, lst, self.auth)

    def pump(self) -> None:
        self.clock.advance(0)

    def open(self, version: int = MQTT_3_1_1) -> Client:
        return Client(self, version)

    def connect(self, client_id: str = "c", version: int = MQTT_3_1_1, *, clean: bool = True,
                keepalive: int = 0, will: Will | None = None,
                props: Properties = NO_PROPERTIES, username: str | None = None,
                password: bytes | None = None, expect: int = 0) -> Client:
        c = self.open(version)
        c.send(Connect(client_id, version, clean, keepalive, username, password, will, props))
        store = self.broker.store
        if getattr(store, "waiters", None):  # a persistent session's CONNACK waits for this
            store.commit()
        got = c.packets()
        ack = got[0]
        assert isinstance(ack, Connack) and ack.reason_code == expect, got
        c.pending = got[1:]  # a resumed session's messages follow the CONNACK
        c.connack = ack  # type: ignore[attr-defined]
        return c

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.pump()


def props(**kw: Any) -> Properties:
    return replace(NO_PROPERTIES, **kw)


# --------------------------------------------------------------------------- over real sockets


class NetClient(Protocol):
    """A minimal MQTT client over a real connection, for service and restart tests."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.decoder = Decoder(role="client", version=version)
        self.queue: DeferredQueue[Packet] = DeferredQueue()
        self.closed: Deferred[None] = Deferred()
        self.connack: Connack | None = None

    def dataReceived(self, data: bytes) -> None:
        for p in self.decoder.feed(data):
            self.queue.put(p)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.queue.put(None)  # type: ignore[arg-type]  # wakes a waiting next()
        if not self.closed.called:
            self.closed.callback(None)

    def send(self, *packets: Packet) -> None:
        self.transport.write(b"".join(encode(p, self.version) for p in packets))

    async def next(self, timeout: float = 5.0) -> Packet:
        from twisted.internet import reactor

        d = self.queue.get()
        d.addTimeout(timeout, reactor)
        packet = await d
        if packet is None:
            self.queue.put(None)  # type: ignore[arg-type]  # closed for every later call too
            raise ConnectionError("connection closed")
        return packet

    async def expect(self, cls: type, timeout: float = 5.0) -> Any:
        p = await self.next(timeout)
        assert isinstance(p, cls), p
        return p

    async def close(self) -> None:
        if not self.closed.called:
            self.transport.loseConnection()
            await self.closed

    def abort(self) -> Deferred[None]:
        if not self.closed.called:
            self.transport.abortConnection()
        return self.closed


async def net_connect(port: int, client_id: str, version: int = MQTT_3_1_1, *,
                      clean: bool = True, props: Properties = NO_PROPERTIES,
                      will: Will | None = None, username: str | None = None,
                      password: bytes | None = None, tls: Any = None,
                      expect: int = 0) -> NetClient:
    from twisted.internet import reactor
    from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, connectProtocol

    if tls is None:
        endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    else:
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port, tls)
    client = NetClient(version)
    await connectProtocol(endpoint, client)
    client.send(Connect(client_id, version, clean, 60, username, password, will, props))
    ack = await client.expect(Connack)
    assert ack.reason_code == expect, ack
    client.connack = ack
    return client


def mqtt_config(data_dir: Path, port: int, extra: str = "") -> str:
    return f"""
[server]
data_dir = "{data_dir}"

[mqtt]
sys_interval = 0

[[mqtt.listeners]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[mqtt.auth]
allow_anonymous = true

[[mqtt.acl]]
user = "anonymous"
topic = "#"
access = "readwrite"

[mqtt.bridge]
enabled = false
{extra}
"""


async def start(text: str) -> Any:
    root, core = app.build(config.parse(text, source="test.toml"), reactor)
    root.startService()
    await core.services["mqtt"].started
    return root


def port_of(root: Any, index: int = 0) -> int:
    """The port the broker's ``index``-th listener got (configured as ``tcp:0``)."""
    return int(root.core.services["mqtt"].ports[index].getHost().port)
