"""A simulated plant: a few dozen tags changing at a few Hz and a vibration channel in blocks.

It is a source like the Modbus and OPC UA clients: it defines its tags, applies batches to the
store, owns the tags it can act on (writes to ``.../Pump1/Run`` start and stop the pump), and
reads its setpoints (memory tags, kept across restarts) from the store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from iotserver.config import SimulatorConfig
from iotserver.tags.model import Access, DataType, DeadbandKind, Quality, TagDef, Update
from iotserver.tags.signals import SignalChannel, SignalHub
from iotserver.tags.store import TagStore

log = Logger(namespace="iotserver.sim")

OWNER = "simulator"


@dataclass(frozen=True)
class _Spec:
    rel: str
    dt: DataType
    unit: str = ""
    lo: float | None = None
    hi: float | None = None
    desc: str = ""
    access: Access = Access.READ
    owner: str = OWNER
    initial: Any = None
    history: int = 0
    deadband: float = 0.0


def _specs() -> list[_Spec]:
    f64, rw = DataType.FLOAT64, Access.READ_WRITE
    specs = [
        _Spec(
            "Line1/Press1/Temperature",
            f64,
            "degC",
            0,
            300,
            "Hydraulic oil temperature",
            history=36_000,
        ),
        _Spec(
            "Line1/Press1/Pressure",
            f64,
            "bar",
            0,
            400,
            "Main cylinder pressure",
            history=36_000,
            deadband=0.05,
        ),
        _Spec("Line1/Press1/Force", DataType.FLOAT32, "kN", 0, 2000, "Press force"),
        _Spec("Line1/Press1/Running", DataType.BOOLEAN, "", desc="Press running"),
        _Spec("Line1/Press1/StrokeCount", DataType.UINT32, "", desc="Strokes since start"),
        _Spec("Line1/Press1/State", DataType.STRING, "", desc="Press state text"),
        _Spec(
            "Line1/Press1/TemperatureSetpoint",
            f64,
            "degC",
            20,
            250,
            "Oil temperature setpoint",
            access=rw,
            owner="memory",
            initial=60.0,
        ),
        _Spec(
            "Line1/Pump1/Run",
            DataType.BOOLEAN,
            "",
            desc="Pump run command",
            access=rw,
            initial=True,
        ),
        _Spec("Line1/Pump1/Speed", f64, "rpm", 0, 3600, "Pump speed", history=36_000),
        _Spec("Line1/Pump1/Current", f64, "A", 0, 100, "Motor current"),
        _Spec("Line1/Pump1/FlowRate", f64, "m3/h", 0, 120, "Flow rate"),
        _Spec(
            "Line1/Pump1/SpeedSetpoint",
            f64,
            "rpm",
            0,
            3600,
            "Pump speed setpoint",
            access=rw,
            owner="memory",
            initial=1480.0,
        ),
        _Spec("Line1/Pump1/RunHours", f64, "h", desc="Running hours"),
        _Spec("Line1/Conveyor/Speed", DataType.FLOAT32, "m/s", 0, 5, "Belt speed"),
        _Spec("Line1/Conveyor/PartCount", DataType.UINT64, "", desc="Parts counted"),
        _Spec("Line1/Conveyor/Jammed", DataType.BOOLEAN, "", desc="Jam detected"),
        _Spec(
            "Line1/Conveyor/Mode",
            DataType.INT16,
            "",
            0,
            3,
            "0 off, 1 manual, 2 auto, 3 maintenance",
            access=rw,
            owner="memory",
            initial=2,
        ),
    ]
    for zone in range(1, 5):
        specs += [
            _Spec(
                f"Line2/Oven/Zone{zone}/Temperature",
                f64,
                "degC",
                0,
                400,
                f"Oven zone {zone} temperature",
                history=36_000,
                deadband=0.1,
            ),
            _Spec(
                f"Line2/Oven/Zone{zone}/HeaterOutput",
                DataType.FLOAT32,
                "%",
                0,
                100,
                f"Oven zone {zone} heater output",
            ),
            _Spec(
                f"Line2/Oven/Zone{zone}/Setpoint",
                f64,
                "degC",
                0,
                350,
                f"Oven zone {zone} setpoint",
                access=rw,
                owner="memory",
                initial=180.0 + 10 * zone,
            ),
        ]
    specs += [
        _Spec("Line2/Oven/DoorOpen", DataType.BOOLEAN, "", desc="Oven door open"),
        _Spec("Line2/Oven/ZoneTemperatures", f64, "degC", desc="All zone temperatures"),
        _Spec(
            "Utilities/Compressor/Pressure",
            f64,
            "bar",
            0,
            12,
            "Compressed air header",
            history=36_000,
        ),
        _Spec("Utilities/Compressor/Loaded", DataType.BOOLEAN, "", desc="Compressor loaded"),
        _Spec(
            "Utilities/Power/ActivePower", f64, "kW", 0, 2000, "Plant active power", history=36_000
        ),
        _Spec("Utilities/Power/Energy", f64, "kWh", desc="Energy since start"),
        _Spec("Utilities/Power/Frequency", f64, "Hz", 45, 55, "Grid frequency"),
        _Spec("Utilities/Water/TankLevel", f64, "%", 0, 100, "Cooling water tank level"),
        _Spec("Utilities/Heartbeat", DataType.INT32, "", desc="Counts up every update"),
    ]
    return specs


class SimulatedPlant(Service):
    """Drives the simulated tags with first-order dynamics and noise, reproducible by seed."""

    name = "simulator"

    def __init__(
        self,
        config: SimulatorConfig,
        store: TagStore,
        clock: IReactorTime,
        signals: SignalHub | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.signals = signals
        self.prefix = config.prefix
        self.rng = np.random.default_rng(config.seed)
        self._loop: LoopingCall | None = None
        self._vib_loops: list[tuple[LoopingCall, SignalChannel]] = []
        self._state: dict[str, float] = {}
        self._strokes = 0
        self._parts = 0
        self._heartbeat = 0
        self._energy = 0.0
        self._run_hours = 0.0
        self._pump_on = True
        self._t = 0.0

    def p(self, rel: str) -> str:
        return f"{self.prefix}/{rel}"

    def tag_defs(self) -> list[TagDef]:
        out = []
        for s in _specs():
            shape = (4,) if s.rel == "Line2/Oven/ZoneTemperatures" else ()
            out.append(
                TagDef(
                    path=self.p(s.rel),
                    data_type=s.dt,
                    shape=shape,
                    unit=s.unit,
                    description=s.desc,
                    low=s.lo,
                    high=s.hi,
                    access=s.access,
                    owner=s.owner,
                    initial=s.initial,
                    persist=s.owner == "memory",
                    historize=s.history > 0,
                    history_capacity=s.history,
                    deadband_kind=DeadbandKind.ABSOLUTE if s.deadband else DeadbandKind.NONE,
                    deadband=s.deadband,
                )
            )
        return out

    # -- owner of the simulator's writable tags --------------------------------------------
    def write_tag(self, tag: TagDef, value: Any) -> Quality:
        if tag.path == self.p("Line1/Pump1/Run"):
            self._pump_on = bool(value)
            self.store.apply([Update(tag.path, self._pump_on)])
            log.info("simulator: pump {state}", state="started" if value else "stopped")
            return Quality.GOOD
        return Quality.BAD_NOT_WRITABLE

    # -- lifecycle --------------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self.store.register_owner(OWNER, self)
        run = self.store.read(self.p("Line1/Pump1/Run")).value
        self._pump_on = bool(run) if run is not None else True
        self._loop = LoopingCall(self.step)
        self._loop.clock = self.clock
        self._loop.start(1.0 / self.config.update_hz, now=True)
        if self.signals is not None:
            # Only the channels under our prefix: a real device's channel is not ours to feed.
            for channel in self.signals.channels.values():
                if not channel.config.name.startswith(self.prefix + "/"):
                    continue
                loop = LoopingCall(self._vibration_block, channel)
                loop.clock = self.clock
                channel.next_start_ns = self.store.now_ns()  # first block due one period on
                loop.start(channel.config.block_size / channel.config.sample_rate, now=False)
                self._vib_loops.append((loop, channel))

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for loop, _ in self._vib_loops:
            if loop.running:
                loop.stop()
        self._vib_loops.clear()
        self.store.unregister_owner(OWNER)
        self.store.set_quality(f"{self.prefix}/**", Quality.BAD_OUT_OF_SERVICE)

    # -- dynamics -------------------------------------------------------------------------
    def _setpoint(self, rel: str, default: float) -> float:
        value = self.store.read(self.p(rel)).value
        return float(value) if value is not None else default

    def _lag(self, key: str, target: float, tau_s: float, noise: float, dt: float) -> float:
        """First-order lag toward ``target`` plus Gaussian noise."""
        x = self._state.get(key, target)
        x += (target - x) * min(1.0, dt / tau_s) + float(self.rng.normal(0.0, noise))
        self._state[key] = x
        return x

    def step(self) -> None:
        dt = 1.0 / self.config.update_hz
        self._t += dt
        t = self._t
        p = self.p
        pump = self._pump_on
        speed_sp = self._setpoint("Line1/Pump1/SpeedSetpoint", 1480.0) if pump else 0.0
        speed = max(0.0, self._lag("speed", speed_sp, 2.0, 1.5 if pump else 0.0, dt))
        flow = speed / 3600 * 110
        current = 4.0 + speed / 3600 * 60 + float(self.rng.normal(0, 0.2)) if pump else 0.0
        oil_sp = self._setpoint("Line1/Press1/TemperatureSetpoint", 60.0)
        oil = self._lag("oil", oil_sp, 30.0, 0.05, dt)
        phase = (t % 6.0) / 6.0  # one press cycle every 6 s
        running = pump
        pressure = (180.0 * math.sin(math.pi * phase) ** 2 if running else 0.0) + float(
            self.rng.normal(0, 0.5)
        )
        if running and self._state.get("phase", 0.0) > phase:
            self._strokes += 1
        self._state["phase"] = phase
        mode = self.store.read(p("Line1/Conveyor/Mode")).value
        conveyor = 1.2 if mode == 2 and running else 0.0
        if conveyor:
            self._parts += int(self.rng.poisson(dt * 2))
        if pump:
            self._run_hours += dt / 3600
        zones = []
        heaters = []
        for zone in range(1, 5):
            sp = self._setpoint(f"Line2/Oven/Zone{zone}/Setpoint", 190.0)
            temp = self._lag(f"zone{zone}", sp, 60.0, 0.08, dt)
            zones.append(temp)
            heaters.append(float(np.clip(50 + (sp - temp) * 8, 0, 100)))
        power = 350 + 0.12 * speed + sum(heaters) * 2.5 + float(self.rng.normal(0, 3))
        self._energy += power * dt / 3600
        self._heartbeat = (self._heartbeat + 1) % 2**31
        air = self._lag("air", 7.0 + 0.4 * math.sin(t / 20), 5.0, 0.01, dt)
        state = "Pressing" if running and phase < 0.5 else ("Returning" if running else "Stopped")
        batch = [
            Update(p("Line1/Press1/Temperature"), oil),
            Update(p("Line1/Press1/Pressure"), max(0.0, pressure)),
            Update(p("Line1/Press1/Force"), max(0.0, pressure) * 3.1),
            Update(p("Line1/Press1/Running"), running),
            Update(p("Line1/Press1/StrokeCount"), self._strokes),
            Update(p("Line1/Press1/State"), state),
            Update(p("Line1/Pump1/Speed"), speed),
            Update(p("Line1/Pump1/Current"), current),
            Update(p("Line1/Pump1/FlowRate"), flow),
            Update(p("Line1/Pump1/RunHours"), self._run_hours),
            Update(p("Line1/Conveyor/Speed"), conveyor),
            Update(p("Line1/Conveyor/PartCount"), self._parts),
            Update(p("Line1/Conveyor/Jammed"), False),
            Update(p("Line2/Oven/DoorOpen"), (t % 120) < 5),
            Update(p("Line2/Oven/ZoneTemperatures"), np.array(zones)),
            Update(p("Utilities/Compressor/Pressure"), air),
            Update(p("Utilities/Compressor/Loaded"), air < 7.0),
            Update(p("Utilities/Power/ActivePower"), power),
            Update(p("Utilities/Power/Energy"), self._energy),
            Update(p("Utilities/Power/Frequency"), 50.0 + float(self.rng.normal(0, 0.01))),
            Update(p("Utilities/Water/TankLevel"), 60 + 20 * math.sin(t / 300)),
            Update(p("Utilities/Heartbeat"), self._heartbeat),
        ]
        for zone in range(1, 5):
            batch.append(Update(p(f"Line2/Oven/Zone{zone}/Temperature"), zones[zone - 1]))
            batch.append(Update(p(f"Line2/Oven/Zone{zone}/HeaterOutput"), heaters[zone - 1]))
        self.store.apply(batch)

    def _vibration_block(self, channel: SignalChannel) -> None:
        """Emit the blocks that are due by now, so sample time tracks wall time.

        LoopingCall skips ticks when the loop is late; catching up here keeps the sample clock
        honest. More than a second behind, the channel resynchronises (a gap, logged).
        """
        cfg = channel.config
        block_ns = cfg.block_size * channel.period_ns
        now = self.store.now_ns()
        if now - channel.next_start_ns > 1_000_000_000 + block_ns:
            log.warn("simulator: {name} fell behind, skipping ahead", name=cfg.name)
            channel.next_start_ns = now - block_ns
        while channel.next_start_ns + block_ns <= now:
            self._emit_block(channel)

    def _emit_block(self, channel: SignalChannel) -> None:
        """One block of a pump bearing signal: 1x and 2x running speed, a bearing tone, noise."""
        cfg = channel.config
        n = cfg.block_size
        start = channel.next_start_ns
        t = (start / 1e9) + np.arange(n, dtype=np.float64) / cfg.sample_rate
        f1 = max(self._state.get("speed", 0.0), 0.0) / 60.0
        amp = 0.2 if self._pump_on else 0.0
        block = (
            amp * np.sin(2 * np.pi * f1 * t)
            + amp * 0.4 * np.sin(2 * np.pi * 2 * f1 * t)
            + amp * 0.15 * np.sin(2 * np.pi * 157.3 * t)
            + self.rng.normal(0.0, 0.02, n)
        ).astype(np.float32)
        assert self.signals is not None
        self.signals.ingest(cfg.name, start, block)
