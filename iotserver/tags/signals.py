"""High-rate signal channels: sample blocks into ring buffers, derived values into tags.

A block is a float32 numpy array with a start timestamp; the channel's sample rate gives every
sample's time. Each block updates the ``<channel>/RMS`` and ``<channel>/Peak`` tags, so the
derived values reach every protocol like any other tag.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from twisted.logger import Logger

from iotserver.config import SIGNAL_DERIVED, SignalConfig
from iotserver.tags.model import Access, DataType, Quality, TagDef, Update
from iotserver.tags.ring import RingBuffer, RingRegistry
from iotserver.tags.store import TagStore

log = Logger(namespace="iotserver.signals")


class SignalError(ValueError):
    """A block that cannot be ingested (unknown channel, wrong dtype, time going backwards)."""


@dataclass
class ChannelStats:
    blocks: int = 0
    samples: int = 0
    rejected_blocks: int = 0


class SignalChannel:
    def __init__(self, config: SignalConfig, ring: RingBuffer) -> None:
        self.config = config
        self.ring = ring
        self.period_ns = round(1e9 / config.sample_rate)
        self.stats = ChannelStats()
        self.next_start_ns = 0  # where the next contiguous block would start

    def derived_tags(self) -> list[TagDef]:
        c = self.config
        return [
            TagDef(
                path=f"{c.name}/{name}",
                data_type=DataType.FLOAT64,
                unit=c.unit,
                description=f"{name} of {c.description or c.name} per block",
                access=Access.READ,
                owner="signals",
            )
            for name in SIGNAL_DERIVED
        ]


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

    def ingest(self, name: str, start_ns: int, samples: np.ndarray) -> None:
        """Append one block and publish its RMS and peak. Raises SignalError on a bad block."""
        channel = self.channels.get(name)
        if channel is None:
            raise SignalError(f"unknown signal channel {name!r}")
        if samples.ndim != 1 or samples.size == 0:
            channel.stats.rejected_blocks += 1
            raise SignalError(f"{name}: expected a non-empty 1-D block")
        block = samples if samples.dtype == np.float32 else samples.astype(np.float32)
        try:
            channel.ring.append_block(None, block, start_ns=start_ns, period_ns=channel.period_ns)
        except ValueError as exc:
            channel.stats.rejected_blocks += 1
            raise SignalError(f"{name}: {exc}") from None
        channel.stats.blocks += 1
        channel.stats.samples += block.size
        channel.next_start_ns = start_ns + block.size * channel.period_ns
        # float64 accumulation: float32 sums of 10^5 squares lose digits.
        rms = float(np.sqrt(np.mean(np.square(block, dtype=np.float64))))
        peak = float(np.max(np.abs(block)))
        ts = start_ns + (block.size - 1) * channel.period_ns
        self._store.apply(
            [
                Update(f"{name}/RMS", rms, Quality.GOOD, ts),
                Update(f"{name}/Peak", peak, Quality.GOOD, ts),
            ]
        )
