"""Console helpers without SSH: tags, history, signals, services, wait, the exec evaluator."""

from __future__ import annotations

import asyncio
import datetime as dt
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import pytest_twisted
from helpers import wait_for
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferTimeout

from iotserver.console.namespace import (
    ConsoleExit,
    NotFound,
    Series,
    WriteResult,
    display,
    iso,
    make_namespace,
    to_ns,
    with_timeout,
)
from iotserver.console.session import error_line, evaluate
from iotserver.tags.model import Access, DataType, Quality, TagDef, Update
from iotserver.tags.ring import RingRegistry
from iotserver.tags.store import MemoryOwner, TagStore

T0 = 1_700_000_000  # 2023-11-14T22:13:20Z


def make_core(clock: Any = None) -> SimpleNamespace:
    clock = clock or task.Clock()
    if isinstance(clock, task.Clock):
        clock.advance(T0)
    store = TagStore(clock)
    store.define(TagDef("Line1/Temp", DataType.FLOAT64, unit="degC"))
    store.define(TagDef("Line1/Setpoint", DataType.FLOAT32, access=Access.READ_WRITE,
                        low=0, high=100, initial=10.0))
    store.define(TagDef("Line2/Name", DataType.STRING, initial="press"))
    store.register_owner("memory", MemoryOwner(store))
    rings = RingRegistry()
    hist = rings.create("tag:Line1/Temp", 100)
    store.set_history("Line1/Temp", hist)
    sig = rings.create("signal:Line1/Vib", 4096, np.float32)
    sig.append_block(None, np.arange(2000, dtype=np.float32),
                     start_ns=T0 * 10**9, period_ns=1_000_000)  # 1 kHz, 2 s
    return SimpleNamespace(store=store, rings=rings, clock=clock, services={},
                           signals=SimpleNamespace(channels={"Line1/Vib": None}),
                           reload=lambda: ["users.toml: broken"])


def test_read_find_show(capsys: pytest.CaptureFixture[str]) -> None:
    core = make_core()
    core.store.apply([Update("Line1/Temp", 21.25, Quality.GOOD, (T0 - 1) * 10**9)])
    ns = make_namespace(core)
    tags = ns["tags"]
    assert tags.read("Line1/Temp").value == 21.25
    with pytest.raises(NotFound, match="unknown tag 'Nope'"):
        tags.read("Nope")
    assert tags.find("Line1/*") == ["Line1/Setpoint", "Line1/Temp"]
    assert tags.find() == ["Line1/Setpoint", "Line1/Temp", "Line2/Name"]
    assert "3 tags" in repr(tags)
    tags.show("**")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["path", "value", "quality", "source", "time", "server", "time"]
    temp = next(line for line in lines if line.startswith("Line1/Temp"))
    assert "21.25 degC" in temp and "Good" in temp
    assert "2023-11-14T22:13:19.000Z" in temp and "2023-11-14T22:13:20.000Z" in temp
    assert "'press'" in next(line for line in lines if line.startswith("Line2/Name"))
    tags.show("Nothing/**")
    assert capsys.readouterr().out == "no tag matches 'Nothing/**'\n"


def test_write_fires_with_a_printable_result() -> None:
    ns = make_namespace(make_core())
    results: list[WriteResult] = []
    ns["tags"].write("Line1/Setpoint", 55).addCallback(results.append)
    ns["tags"].write("Line1/Setpoint", 500).addCallback(results.append)
    ns["tags"].write("Line1/Temp", 1).addCallback(results.append)
    assert [r.quality for r in results] == [
        Quality.GOOD, Quality.BAD_OUT_OF_RANGE, Quality.BAD_NOT_WRITABLE]
    assert repr(results[0]) == "Line1/Setpoint <- 55: Good" and results[0].ok
    assert repr(results[1]) == "Line1/Setpoint <- 500: BadOutOfRange" and not results[1].ok
    assert ns["store"].read("Line1/Setpoint").value == 55


def test_history_bounds() -> None:
    core = make_core()
    ring = core.rings.get("tag:Line1/Temp")
    for i in range(10):  # one sample per second, the last at T0
        ring.append((T0 - 9 + i) * 10**9, float(i))
    history = make_namespace(core)["history"]
    assert list(history("Line1/Temp").values) == list(range(10))
    assert list(history("Line1/Temp", -3).values) == [6, 7, 8, 9]  # start included
    assert list(history("Line1/Temp", T0 - 2, T0).values) == [7, 8]  # end excluded
    assert list(history("Line1/Temp", (T0 - 2) * 10**9).values) == [7, 8, 9]
    iso_start = "2023-11-14T22:13:18Z"
    assert list(history("Line1/Temp", iso_start).values) == [7, 8, 9]
    start = dt.datetime(2023, 11, 14, 22, 13, 18, tzinfo=dt.UTC)
    series = history("Line1/Temp", start)
    assert isinstance(series, Series)
    ts, values = series
    assert ts.dtype == np.int64 and list(values) == [7, 8, 9]
    assert "3 samples" in repr(series) and "max 9" in repr(series)
    assert repr(history("Line1/Temp", -100, -50)) == "Series(0 samples)"
    with pytest.raises(NotFound, match="no history for 'Line2/Name'"):
        history("Line2/Name")


def test_to_ns_rules() -> None:
    now = T0 * 10**9
    assert to_ns(None, now) is None
    assert to_ns(-1.5, now) == now - 1_500_000_000
    assert to_ns(T0, now) == now
    assert to_ns(now, now) == now
    assert to_ns("2023-11-14T22:13:20+00:00", now) == now
    assert to_ns(dt.datetime(2023, 11, 14, 22, 13, 20), now) == now  # naive means UTC
    with pytest.raises(TypeError):
        to_ns([1], now)
    assert iso(now + 123_456_789) == "2023-11-14T22:13:20.123Z"


def test_signal_newest_seconds() -> None:
    signal = make_namespace(make_core())["signal"]
    ts, samples = signal("Line1/Vib", 0.5)
    assert len(samples) == 500 and samples[-1] == 1999 and samples.dtype == np.float32
    assert np.all(np.diff(ts) == 1_000_000)
    with pytest.raises(NotFound, match="channels: Line1/Vib"):
        signal("Nope")


class FakeService:
    running = True
    failure = None
    sessions = {"c1": object(), "c2": object()}
    stats = {"rx": 5}

    @property
    def devices(self) -> list[Any]:
        raise RuntimeError("not started")


def test_services_are_described_defensively() -> None:
    core = make_core()
    services = make_namespace(core)["services"]
    assert repr(services) == "no protocol services configured"
    core.services["mqtt"] = FakeService()
    core.services["modbus"] = SimpleNamespace(running=False, failure="boom", devices=[1, 2, 3])
    text = repr(services)
    assert "modbus: stopped, FAILED to start, devices=3" in text
    assert "mqtt: running, sessions=2, stats={'rx': 5}" in text
    assert services.mqtt is core.services["mqtt"]
    assert services["modbus"] is core.services["modbus"]
    assert "mqtt" in dir(services)
    with pytest.raises(AttributeError, match="running: \\['modbus', 'mqtt'\\]"):
        _ = services.opcua


def test_wait_times_out_and_cancels() -> None:
    clock = task.Clock()
    never: Deferred[Any] = Deferred()
    failures: list[Any] = []
    d = with_timeout(never, 2.0, clock)
    d.addErrback(failures.append)
    clock.advance(2.5)
    assert failures and failures[0].check(DeferTimeout)
    assert never.called  # cancelled
    done: list[Any] = []
    with_timeout(Deferred(), 5, clock).addBoth(done.append).cancel()
    assert done  # cancelling the outer Deferred needs no timer
    assert clock.getDelayedCalls() == []
    ready: list[Any] = []
    with_timeout(7, 1, clock).addCallback(ready.append)
    assert ready == [7]


@pytest_twisted.ensureDeferred
async def test_wait_runs_asyncio_coroutines() -> None:
    clock = task.Clock()  # the console's clock: wait()'s timeout runs on it
    ns = make_namespace(make_core(clock))
    assert await ns["wait"](asyncio.sleep(0, "done")) == "done"
    started: list[bool] = []
    cancelled: list[bool] = []

    async def forever() -> None:
        started.append(True)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    d = ns["wait"](forever(), timeout=5)
    await wait_for(lambda: started, what="the coroutine to start")
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.1)
    with pytest.raises(DeferTimeout):
        await d
    await wait_for(lambda: cancelled, what="the timed-out coroutine cancelled")


def test_reload_help_exit_input(capsys: pytest.CaptureFixture[str]) -> None:
    ns = make_namespace(make_core())
    assert ns["reload"]() == ["users.toml: broken"]
    assert "previous settings kept" in capsys.readouterr().out
    ns["help"]()
    out = capsys.readouterr().out
    for name in ("tags.read", "tags.write", "tags.show", "history", "signal", "services",
                 "reload", "wait", "exit"):
        assert name in out
    ns["help"](ns["tags"].write)
    assert "Write through the tag's owner" in capsys.readouterr().out
    with pytest.raises(ConsoleExit) as info:
        ns["exit"](4)
    assert info.value.code == 4
    with pytest.raises(RuntimeError, match="block"):
        ns["input"]("? ")
    assert display(Quality.BAD_TIMEOUT) == "BadTimeout"


def test_evaluate_and_error_line() -> None:
    ns: dict[str, Any] = {}
    assert evaluate("x = 2\ny = x * 3\ny + 1", ns) == 7
    assert evaluate("z = 1", ns) is None and ns["z"] == 1
    assert evaluate("", ns) is None
    with pytest.raises(SyntaxError) as info:
        evaluate("1 +", ns)
    assert "SyntaxError" in error_line(info.value)
    assert error_line(ZeroDivisionError("division by zero")) == (
        "ZeroDivisionError: division by zero")
    assert error_line(NotFound("unknown tag 'x'")) == "NotFound: unknown tag 'x'"
    assert error_line(KeyboardInterrupt()) == "KeyboardInterrupt"


def test_envelope_and_aggregate() -> None:
    core = make_core()
    ns = make_namespace(core)
    starts, mins, maxs = ns["envelope"]("Line1/Vib", 2.0, 4)  # samples 0..1999 over 2 s
    assert list(mins) == [0, 500, 1000, 1500] and list(maxs) == [499, 999, 1499, 1999]
    assert starts[0] == T0 * 10**9 + 1999 * 1_000_000 + 1 - 2 * 10**9  # newest sample + 1 ns - 2 s
    ring = core.rings.get("tag:Line1/Temp")
    for i in range(10):
        ring.append((T0 - 9 + i) * 10**9, float(i))
    agg = ns["aggregate"]("Line1/Temp", T0 - 10, T0 + 1, 5.0)
    assert list(agg["count"]) == [4, 5, 1] and list(agg["max"]) == [3.0, 8.0, 9.0]
    with pytest.raises(NotFound):
        ns["envelope"]("Nope")


def test_services_show_each_listeners_edge_counters() -> None:
    core = make_core()
    services = make_namespace(core)["services"]
    counters = {"accepted": 5, "open": 2, "refused_listener_full": 3, "idle_timeouts": 0}
    core.services["modbus"] = SimpleNamespace(
        running=True, edge_stats=lambda: {"Modbus TCP tcp:502": counters})
    lines = repr(services).splitlines()
    assert lines[0] == "modbus: running"
    assert lines[1] == "  Modbus TCP tcp:502: accepted=5, open=2, refused_listener_full=3"
