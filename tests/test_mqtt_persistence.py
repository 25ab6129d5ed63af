"""Durability: the SQLite store's group commit, restart with sessions and retained messages, and
acknowledged QoS 1/2 messages surviving kill -9 of the server process."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest_twisted
from helpers import wait_for
from helpers.mqtt_harness import mqtt_config, net_connect, port_of, props, start
from helpers.server_process import spawn
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from iotserver.mqtt.packets import (
    MQTT_3_1_1,
    MQTT_5,
    Disconnect,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    SubscriptionOptions,
    Will,
)
from iotserver.mqtt.persistence import (
    BrokerStore,
    decode_props,
    decode_will,
    encode_props,
    encode_will,
)
from iotserver.mqtt.session import Delivery, Message, Session, Subscription

SERVER_TIMEOUT = 30.0


# --------------------------------------------------------------------------- the store itself


@pytest_twisted.ensureDeferred
async def test_group_commit_cancels_short_lived_rows_and_reloads(tmp_path: Path) -> None:
    store = BrokerStore(tmp_path / "b.sqlite3", reactor, commit_interval=0.001)
    snap = await Deferred.fromCoroutine(store.open())
    assert snap.sessions == [] and snap.retained == []
    s = Session("c", expiry=100)
    s.store = store
    store.save_session(s)
    store.save_subscription("c", Subscription("t/#", "t/#", SubscriptionOptions(1)))
    fleeting = Delivery(Message("t/a", b"gone"), 1, False, ())
    kept = Delivery(Message("t/b", b"kept", 2, props=props(content_type="x")), 2, False, (7,))
    fleeting.seq, kept.seq = 1, 2
    store.queue_add("c", fleeting)
    store.queue_add("c", kept)
    store.queue_remove("c", fleeting)  # acknowledged before the commit: never written
    store.retain_set(Message("r", b"ret", 1, True))
    fired: list[bool] = []
    store.when_committed(store.token(), fired.append)
    await wait_for(lambda: fired, what="the group commit")
    assert fired == [True]
    assert store.commits == 1 and store.rows_written == 5  # session, sub, message, queue, retained
    await Deferred.fromCoroutine(store.close())
    await Deferred.fromCoroutine(store.close())  # idempotent

    store = BrokerStore(tmp_path / "b.sqlite3", reactor)
    snap = await Deferred.fromCoroutine(store.open())
    try:
        assert [r[0] for r in snap.sessions] == ["c"]
        assert [(r[1], r[2], r[3]) for r in snap.subs] == [("t/#", 1, None)]
        assert [(r[1], r[3], r[5]) for r in snap.queue] == [(2, 2, "7")]
        (msg_row,) = snap.messages.values()
        assert msg_row[1:3] == ("t/b", b"kept") and decode_props(msg_row[4]).content_type == "x"
        assert [(r[0], r[1]) for r in snap.retained] == [("r", b"ret")]
    finally:
        await Deferred.fromCoroutine(store.close())


def test_props_round_trip() -> None:
    p = props(user_properties=(("a", "b"),), correlation_data=b"\x00", message_expiry_interval=5)
    assert decode_props(encode_props(p)) == p
    assert encode_props(props()) is None


# --------------------------------------------------------------------------- restart in-process


@pytest_twisted.ensureDeferred
async def test_restart_restores_sessions_queue_and_retained(tmp_path: Path) -> None:
    text = mqtt_config(tmp_path / "data", 0)  # a new port at each start
    root = await start(text)
    port = port_of(root)
    try:
        sub = await net_connect(port, "durable", MQTT_5, clean=False,
                                props=props(session_expiry_interval=3600))
        sub.send(Subscribe(1, (("t/#", SubscriptionOptions(2)),)))
        await sub.expect(Suback)
        sub.send(Disconnect())
        await sub.closed
        pub = await net_connect(port, "pub", MQTT_3_1_1)
        pub.send(Publish("t/1", b"one", 1, packet_id=1), Publish("t/2", b"two", 2, packet_id=2),
                 Publish("keep", b"retained", 1, retain=True, packet_id=3))
        assert (await pub.expect(Puback)).packet_id == 1
        assert (await pub.expect(Pubrec)).packet_id == 2
        assert (await pub.expect(Puback)).packet_id == 3
        pub.send(Pubrel(2))
        await pub.expect(Pubcomp)
        await pub.close()
    finally:
        await root.stopService()

    root = await start(text)
    port = port_of(root)
    try:
        sub = await net_connect(port, "durable", MQTT_5, clean=False,
                                props=props(session_expiry_interval=3600))
        assert sub.connack is not None and sub.connack.session_present
        a = await sub.expect(Publish)
        b = await sub.expect(Publish)
        assert [(a.topic, a.payload, a.qos), (b.topic, b.payload, b.qos)] == [
            ("t/1", b"one", 1), ("t/2", b"two", 2)]
        sub.send(Puback(a.packet_id), Pubrec(b.packet_id))
        await sub.expect(Pubrel)
        sub.send(Pubcomp(b.packet_id))
        sub.send(Subscribe(2, (("keep", SubscriptionOptions(1)),)))
        await sub.expect(Suback)
        kept = await sub.expect(Publish)
        assert (kept.payload, kept.retain) == (b"retained", True)
        sub.send(Puback(kept.packet_id))
        await sub.close()
    finally:
        await root.stopService()


# --------------------------------------------------------------------------- kill -9


async def _wait_ready(proc: subprocess.Popen[bytes], log_path: Path, count: int) -> None:
    def ready() -> bool:
        return log_path.read_text(errors="replace").count("iotserver ready") >= count

    await wait_for(lambda: ready() or proc.poll() is not None, SERVER_TIMEOUT, "the server")
    assert ready(), f"server did not start:\n{log_path.read_text(errors='replace')}"


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(10)


@pytest_twisted.ensureDeferred
async def test_acknowledged_messages_survive_kill_9(tmp_path: Path, free_port: int) -> None:
    cfg = tmp_path / "server.toml"
    cfg.write_text(mqtt_config(tmp_path / "data", free_port))
    log_path = tmp_path / "server.log"
    proc = spawn(cfg, tmp_path / "data", log_path)
    try:
        await _wait_ready(proc, log_path, 1)
        sub = await net_connect(free_port, "durable", MQTT_3_1_1, clean=False)
        sub.send(Subscribe(1, (("t", SubscriptionOptions(2)),)))
        await sub.expect(Suback)
        await sub.close()
        pub = await net_connect(free_port, "pub", MQTT_5)
        n = 200
        for i in range(1, n + 1):
            qos = 1 if i % 2 else 2
            pub.send(Publish("t", b"%d" % i, qos, packet_id=i))
        acked = set()
        while len(acked) < n:
            p = await pub.next()
            assert isinstance(p, Puback | Pubrec) and p.reason_code == 0, p
            acked.add(p.packet_id)
        _kill(proc)  # right after the last acknowledgement: no chance for a clean shutdown
        await pub.closed
    finally:
        _kill(proc)
    proc = spawn(cfg, tmp_path / "data", log_path)
    try:
        await _wait_ready(proc, log_path, 2)
        sub = await net_connect(free_port, "durable", MQTT_3_1_1, clean=False)
        assert sub.connack is not None and sub.connack.session_present
        got = []
        while len(got) < n:
            p = await sub.next()
            if isinstance(p, Pubrel):
                sub.send(Pubcomp(p.packet_id))
                continue
            assert isinstance(p, Publish), p
            got.append(int(p.payload))
            sub.send(Puback(p.packet_id) if p.qos == 1 else Pubrec(p.packet_id))
        assert got == list(range(1, n + 1))
        await sub.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(SERVER_TIMEOUT)
    finally:
        _kill(proc)
    log_text = log_path.read_text(errors="replace")
    assert "Traceback" not in log_text, log_text


@pytest_twisted.ensureDeferred
async def test_failed_commit_is_reported_once_and_recovers(tmp_path: Path) -> None:
    from twisted.logger import globalLogPublisher

    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    store = BrokerStore(tmp_path / "b.sqlite3", reactor, commit_interval=0.001)
    await Deferred.fromCoroutine(store.open())
    real_write = store._write
    try:
        def broken(batch: list[tuple[str, object]]) -> int:
            raise OSError("disk full")

        store._write = broken  # type: ignore[method-assign]
        results: list[bool] = []
        for i in range(3):
            store.retain_set(Message(f"r{i}", b"x", 1, True))
            store.when_committed(store.token(), results.append)
            await wait_for(lambda: len(results) > i, what="a failed commit")  # noqa: B023
        assert results == [False, False, False] and store.failures == 3
        store._write = real_write  # type: ignore[method-assign]
        store.retain_set(Message("ok", b"x", 1, True))
        store.when_committed(store.token(), results.append)
        await wait_for(lambda: len(results) == 4, what="the commit after recovery")
        assert results[-1] is True and not store.failed
    finally:
        globalLogPublisher.removeObserver(events.append)
        await Deferred.fromCoroutine(store.close())
    assert sum(1 for e in events if e.get("log_failure") is not None) == 1


@pytest_twisted.ensureDeferred
async def test_restore_drops_expired_sessions_and_messages(tmp_path: Path) -> None:
    from iotserver.mqtt.broker import Broker
    from iotserver.mqtt.config import MqttConfig
    from iotserver.mqtt.persistence import restore

    path = tmp_path / "b.sqlite3"
    store = BrokerStore(path, reactor)
    await Deferred.fromCoroutine(store.open())
    old = Session("old", expiry=10)
    old.disconnected_at = time.time() - 20  # expired while the server was down
    kept = Session("kept", expiry=3600)
    kept.disconnected_at = time.time() - 20
    for s in (old, kept):
        store.save_session(s)
        store.save_subscription(s.client_id, Subscription("$share/g/t", "t",
                                                          SubscriptionOptions(1), None, "g"))
    live = Delivery(Message("t", b"live", 1), 1, False, (), seq=1)
    dead = Delivery(Message("t", b"dead", 1, expiry_at=reactor.seconds() + 1), 1, False, (),
                    seq=2)
    store.queue_add("kept", live)
    store.queue_add("kept", dead)
    # expired while the server was down
    store.retain_set(Message("gone", b"x", 0, True, expiry_at=reactor.seconds() - 1))
    store.retain_set(Message("here", b"y", 0, True))
    await store.settled()
    await Deferred.fromCoroutine(store.close())

    store = BrokerStore(path, reactor)
    snap = await Deferred.fromCoroutine(store.open())
    broker = Broker(MqttConfig(), reactor, store=store)
    try:
        assert restore(broker, snap) == (1, 2, 1)
        assert set(broker.sessions) == {"kept"} and broker.subscription_count == 1
        session = broker.sessions["kept"]
        assert [d.msg.payload for d in session.queue] == [b"live", b"dead"]
        assert broker.retained.get("here") is not None and broker.retained.get("gone") is None
        session.expiry_timer.cancel()
    finally:
        await Deferred.fromCoroutine(store.close())
    store = BrokerStore(path, reactor)
    snap = await Deferred.fromCoroutine(store.open())
    await Deferred.fromCoroutine(store.close())
    assert [r[0] for r in snap.sessions] == ["kept"] and [r[0] for r in snap.retained] == ["here"]


# --------------------------------------------------------------------------- wills


def test_will_round_trip() -> None:
    will = Will("status/x", b"offline", 1, True, props(will_delay_interval=30,
                                                           content_type="text/plain",
                                                           user_properties=(("k", "v"),)))
    assert decode_will(encode_will(will)) == will
    plain = Will("a", b"", 0, False)
    assert decode_will(encode_will(plain)) == plain


async def _retained(port: int, topic_filter: str, n: int) -> dict[str, bytes]:
    c = await net_connect(port, "reader", MQTT_3_1_1)
    c.send(Subscribe(1, ((topic_filter, SubscriptionOptions(0)),)))
    await c.expect(Suback)
    got = {}
    for _ in range(n):
        p = await c.expect(Publish)
        assert p.retain
        got[p.topic] = p.payload
    await c.close()
    return got


def _will_rows(data_dir: Path) -> list[str]:
    """The client ids with a will in the broker database (read-only, from outside)."""
    path = data_dir / "mqtt" / "broker.sqlite3"
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        try:
            return sorted(r[0] for r in db.execute("SELECT client_id FROM wills"))
        except sqlite3.OperationalError:  # not created yet
            return []


async def _online(port: int, cid: str, version: int, will: Will) -> Any:
    c = await net_connect(port, cid, version, will=will)
    c.send(Publish(will.topic, b"online", 1, retain=True, packet_id=1))
    await c.expect(Puback)
    return c


@pytest_twisted.ensureDeferred
async def test_wills_survive_kill_9(tmp_path: Path, free_port: int) -> None:
    """The server dies with clients connected: at the next start their wills are published
    (MQTT-3.1.2-8), except for a client back within its Will Delay (MQTT-3.1.3-9)."""
    cfg = tmp_path / "server.toml"
    cfg.write_text(mqtt_config(tmp_path / "data", free_port))
    log_path = tmp_path / "server.log"
    proc = spawn(cfg, tmp_path / "data", log_path)
    gone = Will("status/dev", b"offline", 1, True)
    back = Will("status/back", b"offline", 1, True, props(will_delay_interval=30))
    try:
        await _wait_ready(proc, log_path, 1)
        dev = await _online(free_port, "dev", MQTT_3_1_1, gone)
        ret = await _online(free_port, "back", MQTT_5, back)
        # the will rows are written lazily (LAZY_INTERVAL): wait until both are on disk
        await wait_for(lambda: _will_rows(tmp_path / "data") == ["back", "dev"], what="will rows")
        _kill(proc)
        await dev.closed
        await ret.closed
    finally:
        _kill(proc)
    proc = spawn(cfg, tmp_path / "data", log_path)
    try:
        await _wait_ready(proc, log_path, 2)
        again = await net_connect(free_port, "back", MQTT_5, will=back)
        got = await _retained(free_port, "status/#", 2)
        assert got == {"status/dev": b"offline", "status/back": b"online"}
        await again.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(SERVER_TIMEOUT)
    finally:
        _kill(proc)
    assert "Traceback" not in log_path.read_text(errors="replace")


@pytest_twisted.ensureDeferred
async def test_wills_are_kept_across_a_clean_restart(tmp_path: Path) -> None:
    """SIGTERM does not publish wills (clients come back) but keeps them: a client that
    does not come back gets its will published at the next start. A client that said
    DISCONNECT has no will left."""
    text = mqtt_config(tmp_path / "data", 0)  # a new port at each start
    root = await start(text)
    port = port_of(root)
    try:
        dev = await _online(port, "dev", MQTT_3_1_1, Will("status/dev", b"offline", 1, True))
        polite = await _online(port, "polite", MQTT_3_1_1,
                               Will("status/polite", b"offline", 1, True))
        polite.send(Disconnect())
        await polite.closed
        await root.core.services["mqtt"].store.settled()
    finally:
        await root.stopService()
    await dev.closed
    root = await start(text)
    port = port_of(root)
    try:
        broker = root.core.services["mqtt"].broker

        def published() -> bool:
            will = broker.retained.get("status/dev")
            return will is not None and will.payload == b"offline"

        await wait_for(published, what="the orphan will of dev")
        got = await _retained(port, "status/#", 2)
        assert got == {"status/dev": b"offline", "status/polite": b"online"}
        assert broker.orphan_wills == {}
    finally:
        await root.stopService()
