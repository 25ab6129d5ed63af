"""Window analytics of signal channels against closed-form answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from twisted.internet.task import Clock

from iotserver.config import SignalConfig, band_tag_name
from iotserver.tags.ring import RingRegistry
from iotserver.tags.signals import SignalHub
from iotserver.tags.store import TagStore

RATE = 51200.0


def make(window: int = 4096, hop: int = 4096, capacity: int = 1 << 18,
         bands: tuple[tuple[float, float], ...] = ((10, 500), (500, 2000), (2000, 10000))
         ) -> tuple[SignalHub, TagStore]:
    store = TagStore(Clock())
    hub = SignalHub(store, RingRegistry())
    hub.add(SignalConfig("M/Vib", RATE, capacity, 1024, "g", "", window, hop, bands, 100))
    return hub, store


def sine(n: int, freq: float, amp: float, start: int = 0) -> np.ndarray:
    t = (np.arange(n) + start) / RATE
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_band_tag_names() -> None:
    assert band_tag_name(10, 1000) == "Band_10_1000Hz"
    assert band_tag_name(0.5, 2.5) == "Band_0p5_2p5Hz"


def test_sine_statistics_and_band_energy() -> None:
    hub, store = make()
    # 1 kHz at amplitude 2: exactly 80 periods in a 4096-sample window at 51.2 kS/s... close
    n = hub.ingest("M/Vib", 10**18, sine(4096, 1000.0, 2.0))
    assert n == 1
    v = {k: store.read(f"M/Vib/{k}").value for k in
         ("RMS", "Peak", "PeakToPeak", "CrestFactor", "Kurtosis")}
    assert v["RMS"] == pytest.approx(2 / math.sqrt(2), rel=1e-3)
    assert v["Peak"] == pytest.approx(2.0, rel=1e-3)
    assert v["PeakToPeak"] == pytest.approx(4.0, rel=1e-3)
    assert v["CrestFactor"] == pytest.approx(math.sqrt(2), rel=2e-3)
    assert v["Kurtosis"] == pytest.approx(1.5, rel=1e-2)  # a sine's Pearson kurtosis
    bands = {b: store.read(f"M/Vib/{b}").value for b in
             ("Band_10_500Hz", "Band_500_2000Hz", "Band_2000_10000Hz")}
    assert bands["Band_500_2000Hz"] == pytest.approx(2 / math.sqrt(2), rel=0.02)
    assert bands["Band_10_500Hz"] < 0.05 and bands["Band_2000_10000Hz"] < 0.05


def test_gaussian_noise_kurtosis_and_timestamps() -> None:
    hub, store = make(window=8192, hop=8192)
    rng = np.random.default_rng(3)
    hub.ingest("M/Vib", 10**18, rng.normal(0, 0.5, 8192).astype(np.float32))
    assert store.read("M/Vib/Kurtosis").value == pytest.approx(3.0, abs=0.25)
    assert store.read("M/Vib/RMS").value == pytest.approx(0.5, rel=0.05)
    period = round(1e9 / RATE)
    assert store.read("M/Vib/RMS").source_ns == 10**18 + 8191 * period  # end of its window


def test_overlapping_windows_across_blocks_are_all_analysed() -> None:
    hub, _store = make(window=4096, hop=1024)
    counts = []
    start = 10**18
    period = round(1e9 / RATE)
    for i in range(10):  # blocks of 1000 samples: windows end at 4096, 5120, 6144, ...
        counts.append(hub.ingest("M/Vib", start + i * 1000 * period,
                                 sine(1000, 500.0, 1.0, i * 1000)))
    assert sum(counts) == (10_000 - 4096) // 1024 + 1
    ring = hub._rings.get("tag:M/Vib/RMS") if "tag:M/Vib/RMS" in hub._rings else None
    assert ring is None  # history rings are created by the server core, not the hub
    assert hub.channels["M/Vib"].stats.windows == sum(counts)


def test_windows_lost_to_overwrite_are_skipped_not_misread() -> None:
    hub, store = make(window=2048, hop=2048, capacity=4096)
    hub.ingest("M/Vib", 10**18, np.ones(20_000, np.float32))  # far more than the ring holds
    ch = hub.channels["M/Vib"]
    # the ring keeps samples 15904..19999: of the windows ending at multiples of 2048 only the
    # one ending at 18432 lies wholly inside it
    assert ch.stats.windows == 1
    assert store.read("M/Vib/RMS").value == pytest.approx(1.0)
