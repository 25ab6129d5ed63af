"""The shared login module: throttle (task.Clock), verification off the loop, the rules."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread

from iotserver.security import pki
from iotserver.security.login import (
    LoginConfig,
    Logins,
    Outcome,
    Throttle,
    certificate_identities,
    may_write,
    user_for_identities,
)
from iotserver.security.users import Role, User, UserDB, hash_password


def cheap(password: str) -> str:
    return hash_password(password, n=16, r=1, p=1)


@pytest.fixture
def users() -> UserDB:
    return UserDB(users={
        "alice": User("alice", Role.ENGINEER, cheap("pw"), ("alice-cert", "alice@plant")),
        "olga": User("olga", Role.OPERATOR, cheap("pw2"), ("urn:plant:olga",)),
    })


class Audit:
    def __init__(self) -> None:
        self.logins: list[tuple[Any, ...]] = []

    def login(self, protocol: str, peer: str, user: str | None, method: str, outcome: str,
              detail: str = "") -> None:
        self.logins.append((protocol, peer, user, method, outcome))


# ----------------------------------------------------------------------------- throttle


def test_throttle_per_address_and_user_with_backoff() -> None:
    clock = task.Clock()
    t = Throttle(clock, LoginConfig(free_failures=3, base_delay=1.0, max_delay=8.0))
    for _ in range(3):
        assert t.delay("10.0.0.1", "alice") == 0
        t.failed("10.0.0.1", "alice")
    assert t.delay("10.0.0.1", "alice") == 0  # the free failures are used up, not exceeded
    delays = []
    for _ in range(6):
        t.failed("10.0.0.1", "alice")
        delays.append(t.delay("10.0.0.1", "alice"))
        clock.advance(delays[-1])
        assert t.delay("10.0.0.1", "alice") == 0
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]  # doubling, capped at max_delay


def test_no_cross_address_lock_out() -> None:
    """An attacker failing for alice from one address does not lock alice out elsewhere."""
    clock = task.Clock()
    t = Throttle(clock, LoginConfig(free_failures=2))
    for _ in range(20):
        t.failed("203.0.113.9", "alice")
    assert t.delay("203.0.113.9", "alice") > 0
    assert t.delay("10.0.0.5", "alice") == 0  # alice at her desk
    assert t.delay("203.0.113.9", "bob") == 0  # below the address-wide allowance
    t.failed("", "alice")  # an unknown address is an address of its own, not "everywhere"
    assert t.delay("10.0.0.5", "alice") == 0


def test_spray_of_names_from_one_address_is_slowed() -> None:
    clock = task.Clock()
    t = Throttle(clock, LoginConfig(free_failures=5, free_failures_per_address=10))
    for i in range(11):
        assert t.delay("198.51.100.7", f"user{i}") == 0
        t.failed("198.51.100.7", f"user{i}")
    assert t.delay("198.51.100.7", "somebody-new") > 0  # the whole address waits
    assert t.delay("198.51.100.8", "somebody-new") == 0


def test_success_clears_pair_and_records_expire_and_are_bounded() -> None:
    clock = task.Clock()
    cfg = LoginConfig(free_failures=1, forget_after=100.0, max_records=100)
    t = Throttle(clock, cfg)
    t.failed("a", "alice")
    t.failed("a", "alice")
    assert t.delay("a", "alice") > 0
    clock.advance(cfg.base_delay)
    t.succeeded("a", "alice")
    assert ("a", "alice") not in t.records and ("a", None) in t.records
    clock.advance(cfg.forget_after + 1)
    t.failed("b", "alice")
    assert list(t.records) == [("b", "alice"), ("b", None)]  # a's record aged out
    for i in range(500):
        t.failed(f"10.0.{i // 250}.{i % 250}", "x")
    assert len(t.records) <= cfg.max_records


# ----------------------------------------------------------------------------- logins


@pytest_twisted.ensureDeferred
async def test_password_outcomes_are_audited(users: UserDB) -> None:
    audit = Audit()
    logins = Logins(lambda: users, task.Clock(), LoginConfig(free_failures=1), audit=audit)
    ok = await logins.check_password("mqtt", "10.0.0.1", "alice", "pw")
    assert ok.ok and ok.user is not None and ok.user.name == "alice"
    assert not (await logins.check_password("opcua", "10.0.0.1", "alice", "no")).ok
    await logins.check_password("opcua", "10.0.0.1", "alice", "no")
    throttled = await logins.check_password("console", "10.0.0.1", "alice", "pw")
    assert throttled.outcome is Outcome.THROTTLED
    denied = await logins.check_password("console", "10.0.0.2", "olga", "pw2",
                                         allow=lambda u: "operators may not")
    assert denied.outcome is Outcome.DENIED and denied.user is None
    assert [(p, o) for p, _, _, _, o in audit.logins] == [
        ("mqtt", "ok"), ("opcua", "failed"), ("opcua", "failed"), ("console", "throttled"),
        ("console", "denied")]


@pytest_twisted.ensureDeferred
async def test_verification_runs_off_the_event_loop(users: UserDB) -> None:
    """While one password check is stuck in its thread, the reactor keeps running."""
    release = threading.Event()
    entered = threading.Event()
    real_verify = users.verify

    def blocking_verify(name: str, password: str) -> Any:
        entered.set()
        release.wait(30)
        return real_verify(name, password)

    users.verify = blocking_verify  # type: ignore[method-assign]
    logins = Logins(lambda: users, reactor)  # type: ignore[arg-type]
    d = logins.check_password("mqtt", "10.0.0.1", "alice", "pw")
    done: list[Any] = []
    d.addCallback(lambda r: (done.append(r), r)[1])
    assert await deferToThread(entered.wait, 30)  # the check has started in its thread
    for _ in range(5):  # the loop keeps serving timers while the check is stuck
        await task.deferLater(reactor, 0.001, lambda: None)
        assert not done
    release.set()
    result = await d
    assert result.ok


@pytest_twisted.ensureDeferred
async def test_busy_when_too_many_checks_wait(users: UserDB) -> None:
    pending: list[defer.Deferred[Any]] = []

    def slow(name: str, pw: str) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        pending.append(d)
        return d

    users.verify_deferred = slow  # type: ignore[method-assign]
    logins = Logins(lambda: users, task.Clock(), LoginConfig(max_concurrent=1, max_queued=1))
    first = logins.check_password("mqtt", "a", "alice", "x")
    second = logins.check_password("mqtt", "b", "alice", "x")
    third = await logins.check_password("mqtt", "c", "alice", "x")
    assert third.outcome is Outcome.BUSY and len(pending) == 1
    pending[0].callback(None)
    pending[1].callback(None)
    assert (await first).outcome is Outcome.FAILED
    assert (await second).outcome is Outcome.FAILED


# ----------------------------------------------------------------------------- rules


def test_may_write_is_one_rule() -> None:
    assert may_write(Role.ENGINEER) and may_write("admin")
    assert not may_write(Role.OPERATOR) and not may_write(None) and not may_write("root")


def test_certificate_rule_cn_then_san(users: UserDB) -> None:
    ca = pki.create_ca("rule CA")
    cert, _ = pki.issue_opcua_app_cert(ca[0], ca[1], "urn:plant:olga",  # type: ignore[arg-type]
                                       common_name="unknown-cn", dns_names=["host1"],
                                       ip_addresses=[])
    ids = certificate_identities(cert)
    assert ids[0] == "unknown-cn" and "host1" in ids and "urn:plant:olga" in ids
    assert ids.index("host1") < ids.index("urn:plant:olga")  # DNS, e-mail, then URI
    user = user_for_identities(users, ids)
    assert user is not None and user.name == "olga"  # the first identity a user lists
    assert isinstance(cert, x509.Certificate)
    logins = Logins(lambda: users, task.Clock())
    assert logins.certificate_user(cert) == user
    assert logins.certificate_user("alice@plant") is not None


def test_login_and_audit_sections_parse_and_errors_name_the_key() -> None:
    import pytest as _pytest

    from iotserver import config
    from iotserver.confparse import ConfigError

    cfg = config.parse("[login]\nfree_failures = 3\nmax_concurrent = 1\n"
                       "[audit]\nmax_bytes = 65536\nmax_files = 2\n", source="t.toml")
    assert cfg.sections["login"].free_failures == 3
    assert cfg.sections["login"].max_concurrent == 1
    assert cfg.sections["audit"].max_files == 2
    with _pytest.raises(ConfigError, match=r"login\.max_delay"):
        config.parse("[login]\nbase_delay = 5\nmax_delay = 1\n", source="t.toml")
    with _pytest.raises(ConfigError, match=r"audit\.max_bytes"):
        config.parse("[audit]\nmax_bytes = 10\n", source="t.toml")
    with _pytest.raises(ConfigError, match=r"login\.free_failure"):
        config.parse("[login]\nfree_failure = 3\n", source="t.toml")
