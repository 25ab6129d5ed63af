"""The assembled server in-process: core start, simulator data flow, memory tags, restart."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from helpers import wait_for
from twisted.internet import reactor

from iotserver import app, config
from iotserver.tags.model import Quality


def make_config(tmp_path: Path, extra: str = "") -> config.Config:
    text = f"""
[server]
data_dir = "{tmp_path / "data"}"

[simulator]
enabled = true
update_hz = 50

[[signals]]
name = "Plant/Line1/Pump1/Vibration"
sample_rate = 20480
block_size = 512
capacity = 65536

[[tags]]
path = "Site/Setpoint"
type = "float32"
access = "readwrite"
range = [0, 100]
initial = 10
{extra}
"""
    return config.parse(text, source="test.toml")


@pytest_twisted.ensureDeferred
async def test_server_runs_simulated_plant_and_keeps_memory_tags(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    root, core = app.build(cfg, reactor)
    root.startService()
    try:
        store = core.store
        ring = core.rings.get("signal:Plant/Line1/Pump1/Vibration")
        hist = core.rings.get("tag:Plant/Line1/Pump1/Speed")
        kurt = core.rings.get("tag:Plant/Line1/Pump1/Vibration/Kurtosis")  # derived, historized
        # five signal blocks of 512 samples (about 20 a second), five speed samples, the pump
        # up to speed
        await wait_for(lambda: len(ring) >= 512 * 5 and len(hist) >= 5 and len(kurt) >= 1
                       and (store.read("Plant/Line1/Pump1/Speed").value or 0) > 100,
                       what="simulated data")
        speed = store.read("Plant/Line1/Pump1/Speed")
        assert speed.quality is Quality.GOOD and speed.value > 100
        rms = store.read("Plant/Line1/Pump1/Vibration/RMS")
        assert rms.quality is Quality.GOOD and 0.01 < rms.value < 1.0
        # memory tags: configured and simulator setpoints
        assert await store.write("Site/Setpoint", 42.5) is Quality.GOOD
        assert await store.write("Plant/Line1/Pump1/SpeedSetpoint", 900) is Quality.GOOD
        assert await store.write("Site/Setpoint", 500) is Quality.BAD_OUT_OF_RANGE
        # a simulator-owned tag: the write reaches the simulator, which stops the pump
        before = store.read("Plant/Line1/Pump1/Speed").value
        assert await store.write("Plant/Line1/Pump1/Run", False) is Quality.GOOD
        await wait_for(lambda: store.read("Plant/Line1/Pump1/Speed").value < before - 50,
                       what="the pump running down")
    finally:
        await root.stopService()
    # stop is idempotent
    await root.stopService()
    assert store.read("Plant/Line1/Pump1/Speed").quality is Quality.BAD_OUT_OF_SERVICE

    root2, core2 = app.build(cfg, reactor)
    root2.startService()
    try:
        assert core2.store.read("Site/Setpoint").value == pytest.approx(42.5)
        assert core2.store.read("Plant/Line1/Pump1/SpeedSetpoint").value == 900
        assert core2.store.read("Plant/Line1/Pump1/Run").value is True  # not a memory tag
    finally:
        await root2.stopService()
    assert (tmp_path / "data" / "tls" / "server.pem").exists()


@pytest_twisted.ensureDeferred
async def test_bad_user_file_stops_startup_with_message(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "users.toml").write_text('[users.a]\npassword = "clear"\n')
    stopped: list[bool] = []
    root, _ = app.build(cfg, reactor, stop_reactor=lambda: stopped.append(True))
    root.startService()
    await root.stopService()
    assert stopped == [True]
    assert root.failed is not None and "never a clear-text password" in root.failed
