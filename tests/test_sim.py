"""The simulated plant on a task.Clock: deterministic dynamics, owner writes, vibration blocks."""

from __future__ import annotations

import numpy as np
import pytest
from twisted.internet.task import Clock

from iotserver.config import SignalConfig, SimulatorConfig
from iotserver.sim.plant import SimulatedPlant
from iotserver.tags.model import Quality
from iotserver.tags.ring import RingRegistry
from iotserver.tags.signals import SignalError, SignalHub
from iotserver.tags.store import MemoryOwner, TagStore


def make_plant(update_hz: float = 10.0) -> tuple[SimulatedPlant, TagStore, Clock, SignalHub]:
    clock = Clock()
    clock.advance(1_700_000_000)
    store = TagStore(clock)
    hub = SignalHub(store, RingRegistry(max_bytes=64 << 20))
    hub.add(SignalConfig("Plant/Vib", 10240.0, 1 << 16, 1024, "g", ""))
    plant = SimulatedPlant(SimulatorConfig(True, "Plant", update_hz, 7), store, clock, hub)
    for tag in plant.tag_defs():
        store.define(tag)
    store.register_owner("memory", MemoryOwner(store))
    return plant, store, clock, hub


def test_a_few_dozen_tags_all_good_after_first_step() -> None:
    plant, store, _clock, _ = make_plant()
    plant.startService()
    try:
        values = store.read_many("Plant/**")
        assert 30 <= len(values) <= 80
        bad = [
            p
            for p, v in values.items()
            if v.quality is not Quality.GOOD and not p.startswith("Plant/Vib")
        ]
        assert bad == []
        writable = [t.path for t in store.tags("Plant/**") if t.writable]
        assert "Plant/Line1/Press1/TemperatureSetpoint" in writable
    finally:
        plant.stopService()
    assert store.read("Plant/Line1/Pump1/Speed").quality is Quality.BAD_OUT_OF_SERVICE


def test_setpoint_drives_the_process_value() -> None:
    plant, store, clock, _ = make_plant()
    plant.startService()
    try:
        store.write("Plant/Line2/Oven/Zone1/Setpoint", 250.0)
        for _ in range(10 * 600):  # ten minutes of plant time at 10 Hz
            clock.advance(0.1)
        assert store.read("Plant/Line2/Oven/Zone1/Temperature").value == pytest.approx(250, abs=3)
    finally:
        plant.stopService()


def test_vibration_blocks_track_wall_time_and_publish_rms() -> None:
    plant, store, clock, hub = make_plant()
    plant.startService()
    try:
        for _ in range(100):  # 10 s, 0.1 s steps: blocks are 0.1 s long
            clock.advance(0.1)
        ch = hub.channels["Plant/Vib"]
        assert ch.stats.samples == pytest.approx(10 * 10240, rel=0.02)
        ts, vals = ch.ring.last_n(ch.stats.samples)
        assert np.all(np.diff(ts) == ch.period_ns)  # contiguous sample clock
        assert abs(ts[-1] - store.now_ns()) < 2 * 1024 * ch.period_ns
        rms = store.read("Plant/Vib/RMS")
        assert rms.quality is Quality.GOOD
        # RMS is stamped with the end of its window: recompute it over that window
        end = int(np.searchsorted(ts, rms.source_ns)) + 1
        window = vals[end - ch.config.window : end].astype(float)
        assert rms.value == pytest.approx(float(np.sqrt(np.mean(window**2))))
        assert store.read("Plant/Vib/Peak").value >= rms.value
        # a late reactor: half a second without ticks is caught up, not lost
        before = ch.stats.samples
        clock.advance(0.5)
        assert ch.stats.samples - before == pytest.approx(0.5 * 10240, abs=1024)
    finally:
        plant.stopService()


def test_pump_run_command_is_owned_by_the_simulator() -> None:
    plant, store, clock, _ = make_plant()
    plant.startService()
    try:
        results: list[Quality] = []
        store.write("Plant/Line1/Pump1/Run", False).addCallback(results.append)
        assert results == [Quality.GOOD]
        for _ in range(200):
            clock.advance(0.1)
        assert store.read("Plant/Line1/Pump1/Speed").value < 5
        assert store.read("Plant/Line1/Pump1/Run").value is False
    finally:
        plant.stopService()


def test_signal_hub_rejects_bad_blocks() -> None:
    _, store, _, hub = make_plant()
    with pytest.raises(SignalError):
        hub.ingest("Plant/Nope", 0, np.zeros(4, np.float32))
    with pytest.raises(SignalError):
        hub.ingest("Plant/Vib", 0, np.zeros((2, 2), np.float32))
    hub.ingest("Plant/Vib", 10**18, np.ones(4096, np.float32))
    with pytest.raises(SignalError):  # time going backwards
        hub.ingest("Plant/Vib", 10**17, np.ones(8, np.float32))
    assert hub.channels["Plant/Vib"].stats.rejected_blocks == 2  # the unknown one has no channel
    assert store.read("Plant/Vib/RMS").value == pytest.approx(1.0)
