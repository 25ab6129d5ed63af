"""Logins with real clients: an asyncua ActivateSession is verified off the event loop; MQTT
(paho) failures from one address do not lock the user out of another."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from helpers import aio, free_port
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread

from iotserver import app, config
from iotserver.security.users import Role, User, hash_password, save_users

pytestmark = pytest.mark.interop

ENGINEER = ("eng", "engineer-pw")


async def start(tmp: Path, text: str) -> tuple[Any, Any]:
    cfg = config.parse(f'[server]\ndata_dir = "{tmp / "data"}"\n' + text, source="t.toml")
    cfg.server.data_dir.mkdir(parents=True, exist_ok=True)
    save_users(cfg.server.users_file,
               [User(ENGINEER[0], Role.ENGINEER, hash_password(ENGINEER[1], n=2**10))])
    root, core = app.build(cfg, reactor)
    root.startService()
    for service in core.services.values():
        await service.started
    return root, core


@pytest_twisted.ensureDeferred
async def test_opcua_password_is_verified_off_the_event_loop(tmp_path: Path) -> None:
    from asyncua import Client

    port = free_port()
    root, core = await start(tmp_path, f"""
[opcua]
endpoint = "opc.tcp://127.0.0.1:{port}/iotserver"
security_policies = ["None"]
""")
    entered, release = threading.Event(), threading.Event()
    users = core.users
    real_verify = users.verify

    def blocking_verify(name: str, password: str) -> Any:
        entered.set()
        release.wait(30)
        return real_verify(name, password)

    users.verify = blocking_verify
    client = Client(f"opc.tcp://127.0.0.1:{port}/iotserver", timeout=30)
    client.set_user(ENGINEER[0])
    client.set_password(ENGINEER[1])
    try:
        connecting = aio(client.connect())
        assert await deferToThread(entered.wait, 30)
        for _ in range(5):  # the reactor keeps turning while the check is stuck
            await task.deferLater(reactor, 0.001, lambda: None)
        assert not connecting.called
        release.set()
        await connecting
        session = next(iter(core.services["opcua"].layer.table))
        assert session.user.name == "eng" and session.user.via == "password"
        await aio(client.disconnect())
    finally:
        release.set()
        await root.stopService()


def paho_login(port: int, user: str, password: str, bind: str) -> Any:
    import queue

    from paho.mqtt import client as paho

    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"t-{bind}",
                    protocol=paho.MQTTv5)
    c.username_pw_set(user, password)
    got: queue.Queue[Any] = queue.Queue()
    c.on_connect = lambda _c, _u, _f, rc, _p: got.put(rc)
    c.connect("127.0.0.1", port, bind_address=bind)
    c.loop_start()
    try:
        return got.get(timeout=10)
    finally:
        c.disconnect()
        c.loop_stop()
        c._reset_sockets()


@pytest_twisted.ensureDeferred
async def test_mqtt_failures_from_one_address_do_not_lock_out_another(tmp_path: Path) -> None:
    port = free_port()
    root, core = await start(tmp_path, f"""
[login]
base_delay = 300    # longer than the test: the backoff cannot run out between attempts
max_delay = 600

[mqtt]
[[mqtt.listeners]]
endpoint = "tcp:{port}:interface=127.0.0.1"
""")
    try:
        free = core.logins.cfg.free_failures
        for _ in range(free + 2):  # the attacker on 127.0.0.2 guesses eng's password
            rc = await deferToThread(paho_login, port, "eng", "guess", "127.0.0.2")
            assert rc.is_failure
        # now even the right password is refused from there, without hashing ...
        rc = await deferToThread(paho_login, port, *ENGINEER, "127.0.0.2")
        assert rc.is_failure and core.logins.stats["throttled"] >= 1
        # ... while eng logs in from 127.0.0.3 at once
        rc = await deferToThread(paho_login, port, *ENGINEER, "127.0.0.3")
        assert not rc.is_failure
    finally:
        await root.stopService()
