"""Real clients on the unhappy paths of sessions, wills and ACLs: another user bringing a
client id (paho 3.1.1 and 5.0, mosquitto_sub), wills of dropped connections on tag topics,
wills stored across a restart, and wildcard subscriptions next to a deny rule (paho, mosquitto_sub).

The broker runs in the test's reactor; paho in its own threads, mosquitto clients in
subprocesses (see tests/helpers/paho.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from helpers import free_port, wait_for
from helpers.mqtt_harness import start
from helpers.paho import MOSQUITTO, V5, V311, Paho
from twisted.internet import utils

from iotserver.security.users import Role, User, hash_password, save_users

pytestmark = pytest.mark.interop
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "erik": "erik-pw", "ada": "ada-pw"}
ROLES = {"alice": Role.ENGINEER, "bob": Role.ENGINEER, "erik": Role.ENGINEER, "ada": Role.ADMIN}
SETPOINT = "iotserver/tags/Site/Setpoint"


def config(data_dir: Path, port: int) -> str:
    return f"""
[server]
data_dir = "{data_dir}"

[[tags]]
path = "Site/Setpoint"
type = "float64"
access = "readwrite"
range = [0, 100]
initial = 10

[mqtt]
sys_interval = 0

[[mqtt.listeners]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[[mqtt.acl]]
topic = "test/nosubscribe"
access = "deny"

[[mqtt.acl]]
topic = "%u/#"
access = "readwrite"

[[mqtt.acl]]
topic = "test/#"
access = "readwrite"
"""


class Env:
    def __init__(self, root: Any, port: int, data_dir: Path) -> None:
        self.root = root
        self.port = port
        self.data_dir = data_dir
        self.broker = root.core.services["mqtt"].broker
        self.store = root.core.store


async def start_env(data_dir: Path, port: int) -> Env:
    return Env(await start(config(data_dir, port)), port, data_dir)


@pytest_twisted.async_yield_fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    save_users(data_dir / "users.toml", [User(n, ROLES[n], hash_password(p, n=2**10))
                                         for n, p in PASSWORDS.items()])
    e = await start_env(data_dir, free_port())
    try:
        yield e
    finally:
        await e.root.stopService()


def client(env: Env, client_id: str, user: str, protocol: int = V311, **kw: Any) -> Paho:
    return Paho(env.port, client_id, protocol, login=(user, PASSWORDS[user]), **kw)


async def connected(env: Env, client_id: str, user: str, protocol: int = V311,
                    **kw: Any) -> Paho:
    return await client(env, client_id, user, protocol, **kw).ready()


async def publish(env: Env, user: str, topic: str, payloads: list[bytes], qos: int = 1) -> None:
    pub = await connected(env, f"pub-{user}", user)
    try:
        for payload in payloads:  # the broker shares this thread's reactor: never block it
            info = pub.c.publish(topic, payload, qos=qos)
            await wait_for(info.is_published, what=f"PUBACK on {topic}")
    finally:
        pub.stop()


async def queue_for_alice(env: Env) -> None:
    """alice's persistent session "dev7" with a subscription and 3 queued messages."""
    alice = await connected(env, "dev7", "alice", V311, clean=False)
    await alice.subscribe("alice/#", 1)
    alice.stop()
    await wait_for(lambda: "dev7" not in env.broker.clients)
    await publish(env, "alice", "alice/private", [b"a1", b"a2", b"a3"])
    await wait_for(lambda: len(env.broker.sessions["dev7"].queue) == 3)


# --------------------------------------------------------------------------- ownership


@pytest.mark.parametrize("protocol", [V311, V5])
@pytest_twisted.ensureDeferred
async def test_paho_user_b_with_user_a_client_id_gets_a_fresh_session(env: Env,
                                                                      protocol: int) -> None:
    await queue_for_alice(env)
    bob = await connected(env, "dev7", "bob", protocol, clean=False, session_expiry=600)
    try:
        assert bob.flags[0].session_present is False
        await bob.subscribe("bob/#", 1)
        await publish(env, "bob", "bob/marker", [b"m"])
        await wait_for(lambda: bob.payloads() == [b"m"], what="bob's own message")
        assert env.broker.sessions["dev7"].user == "bob"
        assert env.broker.stats.sessions_reassigned == 1
    finally:
        bob.stop()
    # alice is back: her session is gone (ended when bob took the id), she is told so
    alice = await connected(env, "dev7", "alice", V311, clean=False)
    try:
        assert alice.flags[0].session_present is False
    finally:
        alice.stop()


@pytest.mark.skipif(not MOSQUITTO, reason="mosquitto-clients not installed")
@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
@pytest_twisted.ensureDeferred
async def test_mosquitto_sub_as_user_b_does_not_inherit_user_a_session(env: Env,
                                                                       version: str) -> None:
    await queue_for_alice(env)
    extra = ["-x", "600"] if version == "mqttv5" else []
    sub = utils.getProcessOutputAndValue(
        "mosquitto_sub",
        ["-h", "127.0.0.1", "-p", str(env.port), "-V", version, "-i", "dev7", "-c", *extra,
         "-u", "bob", "-P", PASSWORDS["bob"], "-q", "1", "-t", "bob/#", "-C", "1", "-W", "10",
         "-v"])
    await wait_for(lambda: "dev7" in env.broker.clients
                   and env.broker.sessions["dev7"].user == "bob"
                   and env.broker.sessions["dev7"].subs, timeout=10)
    await publish(env, "bob", "bob/marker", [b"m"])
    out, err, code = await sub
    assert code == 0, err
    # had bob inherited alice's session, her queued messages would have come first
    assert out.decode().splitlines() == ["bob/marker m"]


# --------------------------------------------------------------------------- wills


@pytest.mark.parametrize("protocol", [V311, V5])
@pytest_twisted.ensureDeferred
async def test_wills_of_dropped_paho_clients_meet_the_tag_bridge(env: Env,
                                                                 protocol: int) -> None:
    watcher = await connected(env, "watcher", "erik", V5)
    await watcher.subscribe("iotserver/tags/Site/#", 1)
    await wait_for(lambda: len(watcher.messages) == 1, what="the retained tag value")
    faker = await connected(env, "faker", "ada", protocol,
                            will=(SETPOINT, b'{"v": 99, "q": "Good"}'))
    writer = await connected(env, "writer", "erik", protocol, will=(SETPOINT + "/set", b"42"))
    faker.kill()  # no DISCONNECT: the will goes
    await wait_for(lambda: "faker" not in env.broker.clients)
    writer.kill()
    await wait_for(lambda: any(m.topic.endswith("/set/result") for m in watcher.messages),
                   what="the write's result")
    await wait_for(lambda: env.store.read("Site/Setpoint").value == 42.0)
    topics = [m.topic for m in watcher.messages]
    assert SETPOINT + "/set" not in topics  # handled as a write, not passed on
    values = [json.loads(m.payload)["v"] for m in watcher.messages if m.topic == SETPOINT]
    assert 99 not in values  # the admin's will never became a tag value
    result = [m for m in watcher.messages if m.topic == SETPOINT + "/set/result"]
    assert json.loads(result[0].payload) == {"ok": True}
    watcher.stop()


@pytest_twisted.ensureDeferred
async def test_a_stored_will_after_a_restart_is_a_write_too(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    save_users(data_dir / "users.toml", [User("erik", Role.ENGINEER,
                                              hash_password(PASSWORDS["erik"], n=2**10))])
    port = free_port()
    env = await start_env(data_dir, port)
    try:
        dev = await connected(env, "dev", "erik", V5, will=(SETPOINT + "/set", b"37"))
        await wait_for(lambda: env.broker.store.commits > 0 and not env.broker.store._ops,
                       what="the will on disk")
    finally:
        await env.root.stopService()  # a planned stop keeps the will for the next start
    dev.kill()
    env = await start_env(data_dir, port)
    try:
        # published on the first reactor turns after the restart: the bridge was there first
        await wait_for(lambda: env.store.read("Site/Setpoint").value == 37.0,
                       what="the will's write")
    finally:
        await env.root.stopService()


# --------------------------------------------------------------------------- wildcards


@pytest.mark.parametrize("protocol", [V311, V5])
@pytest_twisted.ensureDeferred
async def test_paho_wildcards_next_to_a_deny_rule(env: Env, protocol: int) -> None:
    sub = await connected(env, "wild", "alice", protocol)
    try:
        await sub.subscribe("#", 1)
        await sub.subscribe("+/+", 1)
        await sub.subscribe("test/nosubscribe", 1)
        granted = [list(codes) for codes in sub.subscribed]
        refused = 0x87 if protocol == V5 else 0x80
        assert [[int(getattr(c, "value", c)) for c in codes] for codes in granted] == [
            [1], [1], [refused]]
        await publish(env, "alice", "test/nosubscribe", [b"hidden"])
        await publish(env, "alice", "test/ok", [b"seen"])
        await wait_for(lambda: b"seen" in sub.payloads(), what="the readable message")
        with sub.lock:  # (besides the retained tag values the engineer role reads)
            got = [m.payload for m in sub.messages if not m.topic.startswith("iotserver/")]
        assert got == [b"seen"]  # once, although both filters match
    finally:
        sub.stop()


@pytest.mark.skipif(not MOSQUITTO, reason="mosquitto-clients not installed")
@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
@pytest_twisted.ensureDeferred
async def test_mosquitto_sub_wildcards_next_to_a_deny_rule(env: Env, version: str) -> None:
    login = ["-h", "127.0.0.1", "-p", str(env.port), "-V", version, "-u", "alice",
             "-P", PASSWORDS["alice"]]
    sub = utils.getProcessOutputAndValue(
        "mosquitto_sub", [*login, "-i", "wild-m", "-t", "#", "-t", "+/+", "-q", "1", "-C", "3",
                          "-W", "10", "-v"])
    await wait_for(lambda: "wild-m" in env.broker.clients
                   and len(env.broker.sessions["wild-m"].subs) == 2, timeout=10)
    await publish(env, "alice", "test/nosubscribe", [b"hidden"])
    await publish(env, "alice", "test/ok", [b"seen"])
    await publish(env, "alice", "alice/x", [b"mine"])
    out, err, code = await sub
    assert code == 0, err
    lines = [x for x in out.decode().splitlines() if not x.startswith("iotserver/")]
    assert lines == ["test/ok seen", "alice/x mine"]
    out, err, code = await utils.getProcessOutputAndValue(
        "mosquitto_sub", [*login, "-t", "test/nosubscribe", "-C", "1", "-W", "5"])
    assert b"All subscription requests were denied" in err and out == b"", (out, err, code)
