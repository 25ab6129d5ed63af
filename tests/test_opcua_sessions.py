"""The session layer without a network: a fake channel, ``task.Clock``, encoded requests.

Requests are encoded as a client would send them (``struct_to_binary`` of the ``...Request``)
and answers decoded from the bytes the dispatcher gives the channel.
"""

from __future__ import annotations

from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from asyncua.common.utils import Buffer
from asyncua.crypto.security_policies import SecurityPolicyNone
from asyncua.ua.ua_binary import nodeid_from_binary, struct_from_binary, struct_to_binary
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from iotserver.opcua.dispatch import Dispatcher
from iotserver.opcua.monitoring import Limits
from iotserver.opcua.security import IotUserManager, TrustList
from iotserver.opcua.session import IotInternalServer
from iotserver.opcua.sessions import SessionLimits, SessionTable
from iotserver.opcua.sessionsvc import NONE_URI, SessionServices
from iotserver.opcua.subscriptions import SubscriptionRegistry
from iotserver.opcua.subsvc import SubscriptionServices
from iotserver.security.login import Logins
from iotserver.security.users import Role, User, UserDB, hash_password, save_users

SECURE_URI = "http://opcfoundation.org/UA/SecurityPolicy#Basic256Sha256"
S = ua.StatusCodes


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never waits (everything here is synchronous underneath)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("the coroutine waited")


class FakeChannel:
    def __init__(self, address: str = "10.0.0.1", policy_uri: str = NONE_URI,
                 cert: bytes | None = None) -> None:
        self.channel_id = id(self)
        self.address = address
        self.peer = f"{address}:50000"
        self.policy_uri = policy_uri
        self.peer_certificate = cert
        self.policy = SecurityPolicyNone()
        self.sockname = ("127.0.0.1", 4840)
        self.is_open = True
        self.sent: list[tuple[int, Any]] = []

    def send(self, request_id: int, body: bytes) -> None:
        type_id = nodeid_from_binary(Buffer(body))
        self.sent.append((request_id, struct_from_binary(
            ua.extension_objects_by_typeid[type_id], Buffer(body))))

    def last(self) -> Any:
        return self.sent[-1][1]


class _InlineUserDB(UserDB):
    """Passwords verified in the calling thread: the layer is driven without a reactor turn
    (the server verifies in a thread, tests/test_login.py shows that)."""

    def verify_deferred(self, name: str, password: str) -> Any:
        return succeed(self.verify(name, password))


class Layer:
    def __init__(self, tmp: Path, **limits: Any) -> None:
        self.clock = Clock()
        save_users(tmp / "users.toml", [User("alice", Role.ENGINEER, hash_password("a", n=2**4)),
                                        User("bob", Role.OPERATOR, hash_password("b", n=2**4))])
        users = _InlineUserDB(tmp / "users.toml")
        manager = IotUserManager(lambda: users, TrustList(tmp), allow_anonymous=True,
                                 logins=Logins(lambda: users, self.clock))
        self.iserver = IotInternalServer(manager, max_items=100)
        self.iserver.certificate_validator = None
        self.registry = SubscriptionRegistry()
        self.table = SessionTable(self.clock, SessionLimits(**limits),
                                  lambda s, d, r: self.subs.session_ended(s, d, r))
        self.subs = SubscriptionServices(self.table, self.registry, self.iserver.aspace,
                                         Limits(100), min_interval_ms=10)
        self.sessions = SessionServices(self.table, self.iserver, max_request_size=1 << 20,
                                        clear_text_passwords=True)
        self.dispatcher = Dispatcher(self.table, self.sessions, self.subs)
        self._rid = 0

    def call(self, channel: FakeChannel, request: Any, token: ua.NodeId | None = None) -> Any:
        self._rid += 1
        request.RequestHeader.RequestHandle = self._rid
        if token is not None:
            request.RequestHeader.AuthenticationToken = token
        before = len(channel.sent)
        run(self.dispatcher.dispatch(channel, self._rid, Buffer(struct_to_binary(request))))
        return channel.last() if len(channel.sent) > before else None

    def open_session(self, channel: FakeChannel, user: str | None = None,
                     password: str = "") -> ua.NodeId:
        req = ua.CreateSessionRequest()
        req.Parameters.RequestedSessionTimeout = 30_000
        req.Parameters.SessionName = user or "anon"
        res = self.call(channel, req)
        assert isinstance(res, ua.CreateSessionResponse), res
        token = res.Parameters.AuthenticationToken
        res = self.activate(channel, token, user, password)
        assert res.ResponseHeader.ServiceResult.is_good(), res
        return token

    def activate(self, channel: FakeChannel, token: ua.NodeId, user: str | None,
                 password: str = "") -> Any:
        act = ua.ActivateSessionRequest()
        if user is not None:
            act.Parameters.UserIdentityToken = ua.UserNameIdentityToken(
                UserName=user, Password=password.encode())
        else:
            act.Parameters.UserIdentityToken = ua.AnonymousIdentityToken()
        return self.call(channel, act, token)

    def subscribe(self, channel: FakeChannel, token: ua.NodeId, interval: float = 100.0,
                  keepalive: int = 5, lifetime: int = 15) -> int:
        req = ua.CreateSubscriptionRequest()
        req.Parameters.RequestedPublishingInterval = interval
        req.Parameters.RequestedMaxKeepAliveCount = keepalive
        req.Parameters.RequestedLifetimeCount = lifetime
        req.Parameters.PublishingEnabled = True
        res = self.call(channel, req, token)
        return int(res.Parameters.SubscriptionId)

    def publish(self, channel: FakeChannel, token: ua.NodeId,
                acks: list[tuple[int, int]] = ()) -> Any:  # type: ignore[assignment]
        req = ua.PublishRequest()
        req.Parameters.SubscriptionAcknowledgements = [
            ua.SubscriptionAcknowledgement(SubscriptionId=s, SequenceNumber=n) for s, n in acks]
        return self.call(channel, req, token)

    def read(self, channel: FakeChannel, token: ua.NodeId, max_age: float = 0) -> Any:
        req = ua.ReadRequest()
        req.Parameters.MaxAge = max_age
        req.Parameters.NodesToRead = [ua.ReadValueId(NodeId=ua.NodeId(ua.ObjectIds.Server),
                                                     AttributeId=ua.AttributeIds.BrowseName)]
        return self.call(channel, req, token)

    def stop(self) -> None:
        self.subs.stop()
        self.iserver.method_service.stop()


def fault_code(response: Any) -> int:
    return int(response.ResponseHeader.ServiceResult.value)


@pytest.fixture
def layer(tmp_path: Path) -> Any:
    lay = Layer(tmp_path)
    yield lay
    lay.stop()


def queue_value(layer: Layer, sub_id: int, value: float) -> None:
    sub = layer.registry.by_id[sub_id]
    note = ua.MonitoredItemNotification(ClientHandle=1, Value=ua.DataValue(ua.Variant(value)))
    sub.datachanges.setdefault(1, []).append(note)


# -- sessions ---------------------------------------------------------------------------------
def test_tokens_are_random_and_requests_go_to_their_own_session(layer: Layer) -> None:
    ch = FakeChannel()
    a = layer.open_session(ch, "alice", "a")
    b = layer.open_session(ch, "bob", "b")
    assert a != b and len(a.Identifier) == 32 and a.NodeIdType == ua.NodeIdType.ByteString
    sessions = {s.auth_token.Identifier: s for s in layer.table}
    assert sessions[a.Identifier].user.name == "alice"
    assert sessions[b.Identifier].user.name == "bob"
    assert isinstance(layer.read(ch, a), ua.ReadResponse)
    made_up = ua.NodeId(b"\x00" * 32, 0, ua.NodeIdType.ByteString)
    assert fault_code(layer.read(ch, made_up)) == S.BadSessionIdInvalid
    assert fault_code(layer.read(ch, ua.NodeId(1001))) == S.BadSessionIdInvalid
    # closing one session leaves the other working
    assert isinstance(layer.call(ch, ua.CloseSessionRequest(), a), ua.CloseSessionResponse)
    assert fault_code(layer.read(ch, a)) == S.BadSessionIdInvalid
    assert isinstance(layer.read(ch, b), ua.ReadResponse)
    assert layer.table.stats.unknown_token >= 3


def test_not_activated_and_other_channel_requests_are_refused(layer: Layer) -> None:
    ch, other = FakeChannel(), FakeChannel()
    res = layer.call(ch, ua.CreateSessionRequest())
    token = res.Parameters.AuthenticationToken
    assert fault_code(layer.read(ch, token)) == S.BadSessionNotActivated
    # the first activation belongs to the channel of CreateSession (Part 4 5.6.3.1)
    assert fault_code(layer.activate(other, token, None)) == S.BadSecureChannelIdInvalid
    assert layer.activate(ch, token, None).ResponseHeader.ServiceResult.is_good()
    assert fault_code(layer.read(other, token)) == S.BadSecureChannelIdInvalid
    assert fault_code(layer.read(ch, token, max_age=-1)) == S.BadMaxAgeInvalid


def test_take_over_needs_the_same_user_and_certificate(layer: Layer) -> None:
    ch = FakeChannel()
    token = layer.open_session(ch, "alice", "a")
    sub_id = layer.subscribe(ch, token)
    # another channel, anonymous: refused, the session stays alice's on its channel
    thief = FakeChannel("10.0.0.66")
    assert fault_code(layer.activate(thief, token, None)) == S.BadIdentityChangeNotSupported
    assert fault_code(layer.activate(thief, token, "bob", "b")) == S.BadIdentityChangeNotSupported
    session = layer.table.get(token)
    assert session is not None and session.user.name == "alice" and session.channel is ch
    assert layer.table.stats.takeover_refused == 2
    # the same user from a new channel (a reconnect) moves the session
    back = FakeChannel()
    assert layer.activate(back, token, "alice", "a").ResponseHeader.ServiceResult.is_good()
    assert session.channel is back and sub_id in session.subscriptions


def test_secure_take_over_needs_the_same_client_certificate(layer: Layer) -> None:
    ch = FakeChannel(policy_uri=SECURE_URI, cert=b"client-a")
    req = ua.CreateSessionRequest()
    req.Parameters.ClientCertificate = b"client-a"
    token = layer.call(ch, req).Parameters.AuthenticationToken
    assert layer.activate(ch, token, "alice", "a").ResponseHeader.ServiceResult.is_good()
    other_cert = FakeChannel(policy_uri=SECURE_URI, cert=b"client-b")
    assert fault_code(layer.activate(other_cert, token, "alice", "a")) == \
        S.BadSecurityChecksFailed
    none_channel = FakeChannel()
    assert fault_code(layer.activate(none_channel, token, "alice", "a")) == \
        S.BadSecurityChecksFailed
    same = FakeChannel(policy_uri=SECURE_URI, cert=b"client-a")
    assert layer.activate(same, token, "alice", "a").ResponseHeader.ServiceResult.is_good()


def test_none_policy_ignores_the_client_certificate(layer: Layer) -> None:
    def refuse(*_: Any) -> Any:
        raise AssertionError("validated a certificate on SecurityPolicy None")

    layer.iserver.certificate_validator = refuse
    ch = FakeChannel(cert=b"junk that is no certificate")
    req = ua.CreateSessionRequest()
    req.Parameters.ClientCertificate = b"junk that is no certificate"
    res = layer.call(ch, req)
    assert isinstance(res, ua.CreateSessionResponse)
    session = layer.table.get(res.Parameters.AuthenticationToken)
    assert session is not None and session.client_certificate is None


def test_session_limits_total_and_per_address(tmp_path: Path) -> None:
    lay = Layer(tmp_path, max_sessions=3, max_per_address=2)
    try:
        a, b = FakeChannel("10.0.0.1"), FakeChannel("10.0.0.2")
        lay.open_session(a)
        lay.open_session(a)
        assert fault_code(lay.call(a, ua.CreateSessionRequest())) == S.BadTooManySessions
        lay.open_session(b)
        assert fault_code(lay.call(b, ua.CreateSessionRequest())) == S.BadTooManySessions
        assert lay.table.stats.refused_per_address == 1
        assert lay.table.stats.refused_total == 1
    finally:
        lay.stop()


def test_unactivated_idle_and_abandoned_sessions_end(tmp_path: Path) -> None:
    lay = Layer(tmp_path, activation_timeout_s=10)
    try:
        ch = FakeChannel()
        lay.table.start()
        lay.call(ch, ua.CreateSessionRequest())
        assert len(lay.table) == 1
        lay.clock.advance(11)
        lay.clock.advance(1)
        assert len(lay.table) == 0 and lay.table.stats.never_activated == 1
        token = lay.open_session(ch)  # 30 s timeout (the minimum is 5 s)
        for _ in range(29):
            lay.clock.advance(1)
        assert lay.table.get(token) is not None
        for _ in range(3):
            lay.clock.advance(1)
        assert lay.table.get(token) is None and lay.table.stats.timed_out == 1
        # a lost channel ends its sessions without subscriptions, keeps the others
        plain = lay.open_session(ch)
        kept = lay.open_session(ch)
        lay.subscribe(ch, kept)
        ch.is_open = False
        lay.table.channel_lost(ch)
        assert lay.table.get(plain) is None
        session = lay.table.get(kept)
        assert session is not None and session.channel is None
        lay.table.stop()
    finally:
        lay.stop()


# -- Publish and Republish --------------------------------------------------------------------
def test_publish_republish_and_acknowledge(layer: Layer) -> None:
    ch = FakeChannel()
    token = layer.open_session(ch)
    sub_id = layer.subscribe(ch, token)
    assert layer.publish(ch, token) is None  # queued
    queue_value(layer, sub_id, 1.0)
    layer.clock.advance(0.1)
    res = ch.last()
    assert isinstance(res, ua.PublishResponse)
    msg = res.Parameters.NotificationMessage
    assert res.Parameters.SubscriptionId == sub_id and msg.SequenceNumber == 1
    assert msg.NotificationData[0].MonitoredItems[0].Value.Value.Value == 1.0
    assert res.Parameters.AvailableSequenceNumbers == [1]
    # Republish answers from the retransmission queue, the message stays there
    for _ in range(2):
        rep = layer.call(ch, ua.RepublishRequest(
            Parameters=ua.RepublishParameters(SubscriptionId=sub_id,
                                              RetransmitSequenceNumber=1)), token)
        assert isinstance(rep, ua.RepublishResponse)
        assert rep.NotificationMessage.SequenceNumber == 1
    rep = layer.call(ch, ua.RepublishRequest(Parameters=ua.RepublishParameters(
        SubscriptionId=sub_id, RetransmitSequenceNumber=7)), token)
    assert fault_code(rep) == S.BadMessageNotAvailable
    rep = layer.call(ch, ua.RepublishRequest(Parameters=ua.RepublishParameters(
        SubscriptionId=sub_id ^ 1, RetransmitSequenceNumber=1)), token)
    assert fault_code(rep) == S.BadSubscriptionIdInvalid
    # acknowledged: gone; an unknown ack is reported per item
    assert layer.publish(ch, token, [(sub_id, 1), (sub_id, 99), (sub_id ^ 1, 1)]) is None
    queue_value(layer, sub_id, 2.0)
    layer.clock.advance(0.1)
    res = ch.last()
    assert [r.value for r in res.Parameters.Results] == [
        0, S.BadSequenceNumberUnknown, S.BadSubscriptionIdInvalid]
    assert res.Parameters.AvailableSequenceNumbers == [2]
    rep = layer.call(ch, ua.RepublishRequest(Parameters=ua.RepublishParameters(
        SubscriptionId=sub_id, RetransmitSequenceNumber=1)), token)
    assert fault_code(rep) == S.BadMessageNotAvailable


def test_retransmission_queue_is_bounded(tmp_path: Path) -> None:
    lay = Layer(tmp_path, max_retransmission_queue=3)
    try:
        ch = FakeChannel()
        token = lay.open_session(ch)
        sub_id = lay.subscribe(ch, token)
        for i in range(5):
            lay.publish(ch, token)
            queue_value(lay, sub_id, float(i))
            lay.clock.advance(0.1)
        assert ch.last().Parameters.AvailableSequenceNumbers == [3, 4, 5]
        assert lay.table.stats.retransmission_dropped == 2
    finally:
        lay.stop()


def test_keep_alive_late_publish_and_lifetime_expiry(layer: Layer) -> None:
    ch = FakeChannel()
    token = layer.open_session(ch)
    sub_id = layer.subscribe(ch, token, interval=100, keepalive=2, lifetime=6)
    layer.publish(ch, token)
    layer.clock.advance(0.1)  # the first cycle sends a keep-alive
    keep = ch.last()
    assert keep.Parameters.NotificationMessage.NotificationData == []
    assert keep.Parameters.NotificationMessage.SequenceNumber == 1  # the next one, unused
    # no Publish request: late; the next request is answered at once
    queue_value(layer, sub_id, 5.0)
    layer.clock.advance(0.1)
    count = len(ch.sent)
    layer.publish(ch, token)
    assert len(ch.sent) == count + 1
    assert ch.last().Parameters.NotificationMessage.SequenceNumber == 1
    # no requests for the lifetime: the subscription expires and says so on the next Publish
    for _ in range(7):
        layer.clock.advance(0.1)
    assert sub_id not in layer.registry.by_id
    res = layer.publish(ch, token)
    note = res.Parameters.NotificationMessage.NotificationData[0]
    assert isinstance(note, ua.StatusChangeNotification)
    assert note.Status.value == S.BadTimeout
    assert fault_code(layer.publish(ch, token)) == S.BadNoSubscription


def test_too_many_publish_requests_and_cancel(tmp_path: Path) -> None:
    lay = Layer(tmp_path, max_publish_requests=2)
    try:
        ch = FakeChannel()
        token = lay.open_session(ch)
        lay.subscribe(ch, token, interval=1000)
        for _ in range(2):
            assert lay.publish(ch, token) is None
        handle_of_third = lay._rid + 1
        assert fault_code(lay.publish(ch, token)) == S.BadTooManyPublishRequests
        res = lay.call(ch, ua.CancelRequest(Parameters=ua.CancelParameters(
            RequestHandle=handle_of_third)), token)
        assert fault_code(ch.sent[-2][1]) == S.BadRequestCancelledByClient
        assert res.Parameters.CancelCount == 1
    finally:
        lay.stop()


def test_subscription_ids_are_random_and_private_to_their_session(layer: Layer) -> None:
    ch = FakeChannel()
    a = layer.open_session(ch, "alice", "a")
    b = layer.open_session(ch, "bob", "b")
    ids = {layer.subscribe(ch, a) for _ in range(5)}
    assert len(ids) == 5 and not ids & set(range(1, 1000))
    req = ua.DeleteSubscriptionsRequest()
    req.Parameters.SubscriptionIds = list(ids)[:1]
    res = layer.call(ch, req, b)
    assert [r.value for r in res.Results] == [S.BadSubscriptionIdInvalid]


# -- TransferSubscriptions --------------------------------------------------------------------
def transfer(layer: Layer, ch: FakeChannel, token: ua.NodeId, sub_id: int,
             initial: bool = False) -> Any:
    req = ua.TransferSubscriptionsRequest()
    req.Parameters.SubscriptionIds = [sub_id]
    req.Parameters.SendInitialValues = initial
    return layer.call(ch, req, token)


def test_transfer_checks_the_user_and_tells_the_old_session(layer: Layer) -> None:
    old_ch, new_ch = FakeChannel(), FakeChannel()
    old = layer.open_session(old_ch, "alice", "a")
    sub_id = layer.subscribe(old_ch, old)
    layer.publish(old_ch, old)
    layer.clock.advance(0.1)  # keep-alive answers it
    layer.publish(old_ch, old)  # waits in the old session
    bob = layer.open_session(new_ch, "bob", "b")
    res = transfer(layer, new_ch, bob, sub_id)
    assert res.Parameters.Results[0].StatusCode.value == S.BadUserAccessDenied
    new = layer.open_session(new_ch, "alice", "a")
    res = transfer(layer, new_ch, new, sub_id)
    assert res.Parameters.Results[0].StatusCode.is_good()
    told = old_ch.last()
    assert told.Parameters.SubscriptionId == sub_id
    note = told.Parameters.NotificationMessage.NotificationData[0]
    assert note.Status.value == S.GoodSubscriptionTransferred
    # data now goes to the new session's Publish requests on the new channel
    layer.publish(new_ch, new)
    queue_value(layer, sub_id, 3.0)
    layer.clock.advance(0.1)
    res = new_ch.last()
    assert isinstance(res, ua.PublishResponse) and res.Parameters.SubscriptionId == sub_id
    assert res.Parameters.NotificationMessage.NotificationData[0].MonitoredItems
    assert fault_code(layer.publish(old_ch, old)) == S.BadNoSubscription
    res = transfer(layer, new_ch, new, sub_id ^ 1)
    assert res.Parameters.Results[0].StatusCode.value == S.BadSubscriptionIdInvalid


def test_certificate_comparison_uses_the_leaf_of_a_chain() -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    from iotserver.opcua.security import _self_signed_app_cert
    from iotserver.opcua.sessionsvc import leaf

    one = _self_signed_app_cert("urn:a", "a", ["localhost"], [])[0].public_bytes(Encoding.DER)
    two = _self_signed_app_cert("urn:b", "b", ["localhost"], [])[0].public_bytes(Encoding.DER)
    assert leaf(one + two) == one and leaf(one) == one and leaf(two + one) == two
    assert leaf(None) == b"" and leaf(b"junk") == b"junk"


def test_a_user_manager_may_answer_asynchronously(layer: Layer) -> None:
    manager = layer.iserver.user_manager
    calls: list[str | None] = []

    class Later:
        def get_user(self, iserver: Any, username: str | None = None,
                     password: str | None = None, certificate: Any = None) -> Any:
            calls.append(username)

            async def answer() -> Any:
                return manager.get_user(iserver, username=username, password=password,
                                        certificate=certificate)
            return answer()

    layer.iserver.user_manager = Later()
    ch = FakeChannel()
    token = layer.open_session(ch, "alice", "a")
    session = layer.table.get(token)
    assert session is not None and session.user.name == "alice" and calls == ["alice"]
    res = layer.call(ch, ua.CreateSessionRequest())
    bad = layer.activate(ch, res.Parameters.AuthenticationToken, "alice", "wrong")
    assert fault_code(bad) == S.BadUserAccessDenied
