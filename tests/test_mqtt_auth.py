"""Authenticator: certificates, passwords (scrypt in a thread), anonymous, backoff, reason codes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task

from iotserver.mqtt.auth import AuthResult, Authenticator
from iotserver.mqtt.packets import ReasonCode
from iotserver.security.users import Role, User, UserDB, hash_password

RC = ReasonCode


def cheap_hash(password: str) -> str:
    return hash_password(password, n=16, r=1, p=1)  # fast for tests, same code path


@pytest.fixture
def users() -> UserDB:
    return UserDB(
        users={
            "alice": User("alice", Role.ENGINEER, cheap_hash("s3cret"), ("alice-cert",)),
            "olga": User("olga", Role.OPERATOR, cheap_hash("pw")),
            "nopw": User("nopw", Role.OPERATOR, None, ("nopw-cert",)),
        }
    )


def make(users: UserDB, *, anonymous: bool = False, clock: Any = None) -> Authenticator:
    core = SimpleNamespace(users=users, clock=clock or task.Clock())
    cfg = SimpleNamespace(auth=SimpleNamespace(allow_anonymous=anonymous))
    return Authenticator(core, cfg)


@pytest_twisted.ensureDeferred
async def test_password_ok(users: UserDB) -> None:
    auth = make(users)
    result = await auth.authenticate("c1", "alice", b"s3cret", None)
    assert result == AuthResult(True, "alice", RC.SUCCESS, "password")


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("username", "password"),
    [("alice", b"wrong"), ("mallory", b"s3cret"), ("nopw", b""), ("alice", b"\xff\xfe")],
)
async def test_password_bad(users: UserDB, username: str, password: bytes) -> None:
    result = await make(users).authenticate("c1", username, password, None)
    assert not result.ok
    assert result.user is None
    assert result.reason == RC.BAD_USER_NAME_OR_PASSWORD


@pytest_twisted.ensureDeferred
async def test_username_without_password_and_password_without_username(users: UserDB) -> None:
    auth = make(users, anonymous=True)
    bad = RC.BAD_USER_NAME_OR_PASSWORD
    assert (await auth.authenticate("c", "alice", None, None)).reason == bad
    assert (await auth.authenticate("c", None, b"x", None)).reason == bad


@pytest_twisted.ensureDeferred
async def test_anonymous(users: UserDB) -> None:
    refused = await make(users).authenticate("c", None, None, None)
    assert refused == AuthResult(False, None, RC.NOT_AUTHORIZED)
    allowed = await make(users, anonymous=True).authenticate("c", None, None, None)
    assert allowed.ok and allowed.user is None and allowed.method == "anonymous"


@pytest_twisted.ensureDeferred
async def test_certificate_wins(users: UserDB) -> None:
    auth = make(users)
    # mapped certificate: logged in as its user, even with a wrong password given
    result = await auth.authenticate("c", "olga", b"wrong", "alice-cert")
    assert result == AuthResult(True, "alice", RC.SUCCESS, "certificate")
    # a user without a password can log in only by certificate
    assert (await auth.authenticate("c", None, None, "nopw-cert")).user == "nopw"
    # unmapped certificate: falls back to the password, then anonymous rules
    assert (await auth.authenticate("c", "olga", b"pw", "unknown-cert")).user == "olga"
    assert (await auth.authenticate("c", None, None, "unknown-cert")).reason == RC.NOT_AUTHORIZED


@pytest_twisted.ensureDeferred
async def test_enhanced_auth_method_refused(users: UserDB) -> None:
    result = await make(users).authenticate("c", "alice", b"s3cret", None, auth_method="SCRAM")
    assert result.reason == RC.BAD_AUTHENTICATION_METHOD and not result.ok


@pytest_twisted.ensureDeferred
async def test_backoff_per_peer(users: UserDB) -> None:
    """The shared throttle as MQTT sees it (the throttle itself: tests/test_login.py)."""
    clock = task.Clock()
    auth = make(users, clock=clock)
    free = auth.logins.cfg.free_failures
    calls = 0
    real = users.verify_deferred

    def counting(name: str, pw: str) -> Any:
        nonlocal calls
        calls += 1
        return real(name, pw)

    users.verify_deferred = counting  # type: ignore[method-assign]
    for _ in range(free + 1):
        r = await auth.authenticate("c", "alice", b"bad", None, peer="10.0.0.9")
        assert r.reason == RC.BAD_USER_NAME_OR_PASSWORD
    assert calls == free + 1
    # during the backoff even the right password is refused, without hashing, with 0x86
    r = await auth.authenticate("c", "alice", b"s3cret", None, peer="10.0.0.9")
    assert r.reason == RC.BAD_USER_NAME_OR_PASSWORD
    assert calls == free + 1
    assert auth.stats["throttled"] == 1
    # another address is not affected, nor another user from the same address
    assert (await auth.authenticate("c", "alice", b"s3cret", None, peer="10.0.0.8")).ok
    assert (await auth.authenticate("c", "olga", b"pw", None, peer="10.0.0.9")).ok
    clock.advance(auth.logins.cfg.base_delay + 0.01)
    assert (await auth.authenticate("c", "alice", b"s3cret", None, peer="10.0.0.9")).ok


@pytest_twisted.ensureDeferred
async def test_no_address_is_not_a_lock_for_everyone(users: UserDB) -> None:
    """Failures from clients whose address is unknown never lock the user out elsewhere."""
    auth = make(users)
    users.verify_deferred = lambda n, p: defer.succeed(None)  # type: ignore[method-assign]
    for _ in range(auth.logins.cfg.free_failures + 3):
        await auth.authenticate("c", "alice", b"bad", None)
    del users.verify_deferred
    assert (await auth.authenticate("c", "alice", b"s3cret", None, peer="10.1.1.1")).ok


@pytest_twisted.ensureDeferred
async def test_concurrency_is_bounded(users: UserDB) -> None:
    auth = make(users)
    cfg = auth.logins.cfg
    pending: list[defer.Deferred[Any]] = []

    def slow(name: str, pw: str) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        pending.append(d)
        return d

    users.verify_deferred = slow  # type: ignore[method-assign]
    # distinct addresses: the throttle stays out of the way
    results = [auth.authenticate("c", "alice", b"x", None, peer=f"10.0.0.{i}")
               for i in range(cfg.max_concurrent)]
    assert len(pending) == cfg.max_concurrent
    queued = [auth.authenticate("c", "alice", b"x", None, peer=f"10.1.{i // 250}.{i % 250}")
              for i in range(cfg.max_queued)]
    busy = await auth.authenticate("c", "alice", b"x", None, peer="10.9.9.9")
    assert busy.reason == RC.SERVER_BUSY
    released = 0
    while released < len(pending):
        pending[released].callback(None)
        released += 1
    assert released == cfg.max_concurrent + cfg.max_queued
    done = await defer.gatherResults(results + queued)
    assert all(r.reason == RC.BAD_USER_NAME_OR_PASSWORD for r in done)


@pytest_twisted.ensureDeferred
async def test_verifier_crash_is_not_a_login(users: UserDB) -> None:
    auth = make(users)
    users.verify_deferred = lambda n, p: defer.fail(RuntimeError("boom"))  # type: ignore[method-assign]
    result = await auth.authenticate("c", "alice", b"s3cret", None)
    assert not result.ok and result.reason == RC.UNSPECIFIED_ERROR


def test_defaults_without_auth_config(users: UserDB) -> None:
    auth = Authenticator(SimpleNamespace(users=users, clock=task.Clock()), object())
    assert auth.allow_anonymous is False
    d = auth.authenticate("c", None, None, None)
    assert d.result.reason == RC.NOT_AUTHORIZED  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_listener_override_and_certificate_login_off(users: UserDB) -> None:
    auth = make(users)
    assert (await auth.authenticate("c", None, None, None, allow_anonymous=True)).ok
    open_auth = make(users, anonymous=True)
    assert not (await open_auth.authenticate("c", None, None, None, allow_anonymous=False)).ok
    core = SimpleNamespace(users=users, clock=task.Clock())
    cfg = SimpleNamespace(auth=SimpleNamespace(allow_anonymous=False, certificate_login=False))
    no_certs = Authenticator(core, cfg)
    result = await no_certs.authenticate("c", None, None, "alice-cert")
    assert result.reason == RC.NOT_AUTHORIZED
