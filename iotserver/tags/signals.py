"""High-rate signal channels: sample blocks into ring buffers, window analytics into tags.

A block is a float32 numpy array with a start timestamp; the channel's sample rate gives every
sample's time. Every ``hop`` samples, the last ``window`` samples are analysed with numpy (all
windows that a block completes at once, no Python loop over samples) and published as tags
under the channel's path: RMS, Peak, PeakToPeak, CrestFactor, Kurtosis and one ``Band_<lo>_<hi>Hz``
tag per configured frequency band (band RMS from a Hann-windowed FFT). The derived tags are
ordinary tags, so they reach OPC UA, MQTT and Modbus, and they are historized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from twisted.logger import Logger

from iotserver.config import SignalConfig, band_tag_name
from iotserver.tags.model import Access, DataType, Quality, TagDef, Update
from iotserver.tags.ring import RingBuffer, RingRegistry
from iotserver.tags.store import TagStore

log = Logger(namespace="iotserver.signals")

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


class SignalError(ValueError):
    """A block that cannot be ingested (unknown channel, wrong shape, time going backwards)."""


@dataclass
class ChannelStats:
    blocks: int = 0
    samples: int = 0
    rejected_blocks: int = 0
    windows: int = 0


class WindowAnalyser:
    """Vectorised statistics over a stack of windows (shape ``(n_windows, window)``).

    Band RMS uses Parseval's theorem on a Hann-windowed real FFT, corrected for the window's
    power loss, so a sine of amplitude A inside a band reads A/sqrt(2) in that band.
    """

    def __init__(self, config: SignalConfig) -> None:
        self.window = config.window
        self.bands = config.bands
        self._hann = np.hanning(config.window).astype(np.float64)
        self._power_gain = float(np.mean(self._hann**2))
        freqs = np.fft.rfftfreq(config.window, d=1.0 / config.sample_rate)
        self._band_masks = [(freqs >= lo) & (freqs < hi) for lo, hi in config.bands]
        # one-sided spectrum: every bin but DC (and Nyquist for even N) counts twice
        self._weights = np.full(freqs.size, 2.0)
        self._weights[0] = 1.0
        if config.window % 2 == 0:
            self._weights[-1] = 1.0

    def analyse(self, windows: F32) -> dict[str, F64]:
        x = windows.astype(np.float64)
        n = self.window
        mean = x.mean(axis=1)
        hi = x.max(axis=1)
        lo = x.min(axis=1)
        centred = x - mean[:, None]
        c2 = centred * centred  # not centred**4: numpy's pow is ~30x slower than a multiply
        m2 = c2.sum(axis=1) / n
        m4 = np.einsum("ij,ij->i", c2, c2) / n
        rms = np.sqrt(m2 + mean * mean)
        peak = np.maximum(np.abs(hi), np.abs(lo))
        with np.errstate(divide="ignore", invalid="ignore"):
            crest = np.where(rms > 0, peak / rms, 0.0)
            kurt = np.where(m2 > 0, m4 / (m2 * m2), 0.0)  # Pearson: 3.0 for a Gaussian
        out = {
            "RMS": rms,
            "Peak": peak,
            "PeakToPeak": hi - lo,
            "CrestFactor": crest,
            "Kurtosis": kurt,
        }
        if self.bands:
            spec = np.fft.rfft(centred * self._hann, axis=1)
            power = (spec.real**2 + spec.imag**2) * self._weights
            scale = 1.0 / (self.window * self.window * self._power_gain)
            for (lo, hi), mask in zip(self.bands, self._band_masks, strict=True):
                out[band_tag_name(lo, hi)] = np.sqrt(power[:, mask].sum(axis=1) * scale)
        return out


class SignalChannel:
    def __init__(self, config: SignalConfig, ring: RingBuffer) -> None:
        self.config = config
        self.ring = ring
        self.period_ns = round(1e9 / config.sample_rate)
        self.stats = ChannelStats()
        self.next_start_ns = 0  # where the next contiguous block would start
        self.analyser = WindowAnalyser(config)
        # Sample count (over the channel's life) at which the next window ends.
        self._next_window_end = config.window

    def derived_tags(self) -> list[TagDef]:
        c = self.config
        units = {"CrestFactor": "", "Kurtosis": ""}
        return [
            TagDef(
                path=f"{c.name}/{name}",
                data_type=DataType.FLOAT64,
                unit=units.get(name, c.unit),
                description=f"{name} of {c.description or c.name} over {c.window} samples",
                access=Access.READ,
                owner="signals",
                historize=c.history > 0,
                history_capacity=c.history,
            )
            for name in c.derived_names()
        ]

    def due_windows(self) -> tuple[F32, npt.NDArray[np.int64]] | None:
        """Windows completed since the last call: an (n, window) view and each window's end time.

        Sample positions count every sample the channel ever received; a window whose samples
        the ring has already overwritten is skipped (the ring is the bound on lag).
        """
        total = self.ring.total_appended
        window, hop = self.config.window, self.config.hop
        available_from = total - len(self.ring)
        if self._next_window_end - window < available_from:
            behind = available_from + window - self._next_window_end
            self._next_window_end += -(-behind // hop) * hop  # ceil to a whole hop
        if self._next_window_end > total:
            return None
        n = (total - self._next_window_end) // hop + 1
        last_end = self._next_window_end + (n - 1) * hop
        first_start = self._next_window_end - window
        ts, values = self.ring.last_n(total - first_start)
        keep = last_end - first_start
        stack = np.lib.stride_tricks.sliding_window_view(values[:keep], window)[::hop]
        ends = ts[window - 1 : keep : hop]
        self._next_window_end = last_end + hop
        return stack, ends


class SignalHub:
    """All signal channels of the server, backed by rings from a bounded registry."""

    def __init__(self, store: TagStore, rings: RingRegistry) -> None:
        self._store = store
        self._rings = rings
        self.channels: dict[str, SignalChannel] = {}

    def add(self, config: SignalConfig) -> SignalChannel:
        ring = self._rings.create(f"signal:{config.name}", config.capacity, np.float32)
        channel = SignalChannel(config, ring)
        self.channels[config.name] = channel
        for tag in channel.derived_tags():
            self._store.define(tag)
        return channel

    def ingest(self, name: str, start_ns: int, samples: Any) -> int:
        """Append one block and publish the analytics of every window it completes.

        Returns the number of windows analysed. Raises SignalError on a bad block (nothing is
        stored then).
        """
        channel = self.channels.get(name)
        if channel is None:
            raise SignalError(f"unknown signal channel {name!r}")
        if not isinstance(samples, np.ndarray) or samples.ndim != 1 or samples.size == 0:
            channel.stats.rejected_blocks += 1
            raise SignalError(f"{name}: expected a non-empty 1-D block")
        block = samples if samples.dtype == np.float32 else samples.astype(np.float32)
        try:
            channel.ring.append_block(None, block, start_ns=start_ns, period_ns=channel.period_ns)
        except (ValueError, TypeError) as exc:
            channel.stats.rejected_blocks += 1
            raise SignalError(f"{name}: {exc}") from None
        channel.stats.blocks += 1
        channel.stats.samples += block.size
        channel.next_start_ns = start_ns + block.size * channel.period_ns
        due = channel.due_windows()
        if due is None:
            return 0
        stack, ends = due
        results = channel.analyser.analyse(stack)
        channel.stats.windows += len(ends)
        prefix = name + "/"
        ends_list = ends.tolist()
        # One Update per window and tag: history keeps each window, subscribers get the latest.
        self._store.apply(
            [
                Update(prefix + key, float(v), Quality.GOOD, t)
                for key, arr in results.items()
                for v, t in zip(arr.tolist(), ends_list, strict=True)
            ]
        )
        return len(ends_list)
