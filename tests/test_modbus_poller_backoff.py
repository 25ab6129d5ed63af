"""The poller against a PLC that accepts connections and closes them at once: exponential
backoff on the injected clock (task.Clock), shown as a lost connection, no asyncio noise."""

from __future__ import annotations

import asyncio
import gc
import logging
import random
from dataclasses import replace

import pytest_twisted
from helpers import aio, wait_for
from helpers.modbus import device_config
from twisted.internet import reactor, task
from twisted.internet.protocol import Factory, Protocol

from iotserver.modbus.config import Backoff
from iotserver.modbus.poller import Device
from iotserver.tags.model import Quality
from iotserver.tags.store import TagStore

TAG = """
[[modbus.devices.tags]]
path = "P/H0"
table = "holding"
address = 0
type = "uint16"
"""


class AcceptAndClose(Protocol):
    def connectionMade(self) -> None:
        self.factory.accepts += 1  # type: ignore[union-attr]
        assert self.transport is not None
        self.transport.loseConnection()


class AcceptFactory(Factory):
    protocol = AcceptAndClose
    accepts = 0


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def pending_delays(clock: task.Clock) -> list[float]:
    """What is scheduled on the clock, after running what is due now (the store's flush)."""
    clock.advance(0)
    return sorted(c.getTime() - clock.seconds() for c in clock.getDelayedCalls() if c.active())


@pytest_twisted.ensureDeferred
async def test_accept_and_close_is_retried_with_exponential_backoff() -> None:
    factory = AcceptFactory()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    records = Records()
    logging.getLogger("asyncio").addHandler(records)
    # device_config's backoff is fast; this test wants 1 s doubling up to 8 s, no jitter
    dev_cfg = replace(device_config(port.getHost().port, TAG),
                      backoff=Backoff(initial=1.0, max=8.0, jitter=0.0))
    clock = task.Clock()
    store = TagStore(clock)
    for t in dev_cfg.tags:
        store.define(t.tag)
    device = Device(dev_cfg, store, rng=random.Random(0), clock=clock)

    def accepts() -> int:
        return factory.accepts

    try:
        device.start()
        delays = []
        for n in range(1, 6):
            # connected, the connection lost at once, now sleeping on the injected clock
            await wait_for(lambda n=n: (accepts() == n and device.state == "backoff"  # type: ignore[misc]
                                        and len(pending_delays(clock)) == 1))
            (delay,) = pending_delays(clock)
            delays.append(delay)
            clock.advance(delay * 0.999)
            assert accepts() == n and pending_delays(clock)  # still waiting: no reconnect
            clock.advance(delay * 0.001 + 1e-9)
        assert delays == [1.0, 2.0, 4.0, 8.0, 8.0]
        # a lost connection, not a timeout, in the device's state and in the tag's quality
        assert device.last_error == "connection lost"
        assert device.stats.timeouts == 0 and device.stats.connections_lost >= 4
        clock.advance(0)  # the store's flush
        assert store.read("P/H0").quality is Quality.BAD_NOT_CONNECTED
    finally:
        await aio(device.stop())
        await port.stopListening()
        gc.collect()  # an exception set on a future nobody awaits is logged when it is freed
        logging.getLogger("asyncio").removeHandler(records)
    assert not [m for m in records.messages if "never retrieved" in m], records.messages


@pytest_twisted.ensureDeferred
async def test_stop_during_a_request_stops_the_poll_loop() -> None:
    """A request in flight is failed when we close the connection ourselves, but a stop()
    at the same moment still ends the poll task (its cancel is not taken for a lost link)."""
    from iotserver.sim.plc import SimPLC

    plc = SimPLC(0, interval=0.02, registers=10)
    plc_port = await plc.start()
    store = TagStore(reactor)
    dev_cfg = device_config(plc_port, TAG)
    for t in dev_cfg.tags:
        store.define(t.tag)
    device = Device(dev_cfg, store)
    try:
        device.start()
        await wait_for(lambda: store.read("P/H0").quality is Quality.GOOD)
        plc.delay = 5.0  # the next poll waits for an answer
        await wait_for(lambda: bool(device._requests))
        task_ = device._task
        assert task_ is not None
        await aio(device.stop())
        assert task_.done() and device.state == "stopped"
    finally:
        plc.delay = 0.0
        await plc.stop()


@pytest_twisted.ensureDeferred
async def test_stop_ends_the_loop_even_when_a_connect_swallows_the_cancel() -> None:
    """Python 3.11's asyncio.wait_for (in pymodbus' connect) can lose a cancellation that
    arrives as the connection completes; stop() must end the poll loop all the same."""
    store = TagStore(reactor)
    dev_cfg = device_config(1, TAG)  # nothing listens: every connect fails
    for t in dev_cfg.tags:
        store.define(t.tag)
    device = Device(dev_cfg, store)
    attempts = 0

    async def connect_ignoring_cancel() -> bool:
        nonlocal attempts
        attempts += 1
        fut = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.05, fut.set_result, None)
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:  # what the wait_for race amounts to
            await fut
        return False

    device._connect = connect_ignoring_cancel  # type: ignore[method-assign]
    device._backoff = lambda: 0.0  # type: ignore[method-assign]
    device.start()
    task_ = device._task
    assert task_ is not None
    await wait_for(lambda: attempts >= 1, what="a connect attempt")
    await aio(device.stop())
    assert task_.done() and device.state == "stopped"
