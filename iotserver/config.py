"""The server configuration: one TOML file parsed into frozen, typed objects.

With no file the built-in :data:`DEFAULT_CONFIG` is used: a simulated plant, every listener on
loopback, unprivileged ports. Protocol sections (``[mqtt]``, ``[modbus]``, ``[opcua]``,
``[console]``) are parsed by their own packages, listed in :data:`SECTION_PARSERS`.
"""

from __future__ import annotations

import importlib
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from iotserver.confparse import ConfigError, Context, Reader
from iotserver.tags.model import (
    Access,
    CoerceError,
    DataType,
    DeadbandKind,
    Scaling,
    TagDef,
    coerce,
)

# Protocol sections and the function that parses each: "module:function(Reader) -> object".
# An object may offer ``tag_defs() -> list[TagDef]`` to contribute tags (e.g. polled PLC tags),
# and ``summary() -> list[str]`` for check-config.
SECTION_PARSERS: dict[str, str] = {
    "mqtt": "iotserver.mqtt.config:parse",
    "modbus": "iotserver.modbus.config:parse",
    "opcua": "iotserver.opcua.config:parse",
    "console": "iotserver.console.config:parse",
    "login": "iotserver.security.login:parse",
    "audit": "iotserver.security.audit:parse",
}

_DEFAULT_CORE = """\
# Built-in default: a simulated plant, every listener on loopback only.
[server]
name = "iotserver"
hostnames = ["localhost"]
ip_addresses = ["127.0.0.1"]

[simulator]
enabled = true
prefix = "Plant"
update_hz = 5.0

[[signals]]
name = "Plant/Line1/Pump1/Vibration"
sample_rate = 10240
block_size = 1024
capacity = 1048576
window = 4096
hop = 2048
bands = [[10, 100], [100, 1000], [1000, 5000]]
"""


def _default_config() -> str:
    """The core default plus each protocol package's ``DEFAULT_TOML`` (its loopback default)."""
    parts = [_DEFAULT_CORE]
    for target in SECTION_PARSERS.values():
        module = target.partition(":")[0]
        try:
            snippet = getattr(importlib.import_module(module), "DEFAULT_TOML", "")
        except ImportError:
            continue
        if snippet:
            parts.append(snippet.strip() + "\n")
    return "\n".join(parts)


DEFAULT_CONFIG = _default_config()


def default_data_dir() -> Path:
    """``$IOTSERVER_DATA_DIR``, else ``$XDG_STATE_HOME/iotserver``, else
    ``~/.local/state/iotserver``."""
    env = os.environ.get("IOTSERVER_DATA_DIR")
    if env:
        return Path(env).expanduser()
    state = os.environ.get("XDG_STATE_HOME")
    base = Path(state).expanduser() if state else Path.home() / ".local" / "state"
    return base / "iotserver"


@dataclass(frozen=True)
class ServerConfig:
    name: str
    data_dir: Path
    hostnames: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    write_timeout: float
    shutdown_timeout: float
    users_file: Path
    users_file_configured: bool = False  # named in the file (a missing one is then a warning)


@dataclass(frozen=True)
class TlsConfig:
    """Server certificate for every TLS listener; generated in ``<data_dir>/tls`` when unset."""

    cert: Path | None
    key: Path | None
    ca: Path | None

    @property
    def generated(self) -> bool:
        return self.cert is None


@dataclass(frozen=True)
class HistoryConfig:
    max_bytes: int
    default_capacity: int


@dataclass(frozen=True)
class SignalConfig:
    """A high-rate channel: samples in blocks into a ring buffer; window analytics become tags.

    Every ``hop`` samples the last ``window`` samples are analysed (RMS, peak, peak-to-peak,
    crest factor, kurtosis, and the RMS of each frequency band from an FFT).
    """

    name: str
    sample_rate: float
    capacity: int
    block_size: int
    unit: str
    description: str
    window: int = 4096
    hop: int = 4096
    bands: tuple[tuple[float, float], ...] = ()
    history: int = 3600

    def derived_names(self) -> list[str]:
        """Names of the tags under the channel's path, in publication order."""
        return list(SIGNAL_DERIVED) + [band_tag_name(lo, hi) for lo, hi in self.bands]


def band_tag_name(lo: float, hi: float) -> str:
    """``Band_10_1000Hz`` for the band 10..1000 Hz (integers print without a decimal point)."""

    def fmt(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else str(x).replace(".", "p")

    return f"Band_{fmt(lo)}_{fmt(hi)}Hz"


@dataclass(frozen=True)
class SimulatorConfig:
    enabled: bool
    prefix: str
    update_hz: float
    seed: int


@dataclass(frozen=True)
class Config:
    source: str
    server: ServerConfig
    tls: TlsConfig
    history: HistoryConfig
    tags: tuple[TagDef, ...]
    signals: tuple[SignalConfig, ...]
    simulator: SimulatorConfig
    sections: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def section(self, name: str) -> Any:
        return self.sections.get(name)


_PATH_SEGMENT = re.compile(r"^[A-Za-z0-9_\-. ]+$")


def check_tag_path(path: str) -> str | None:
    """Why ``path`` cannot name a tag, or None. Paths double as MQTT topics and OPC UA NodeIds."""
    if not path:
        return "expected a non-empty path like 'Line1/Press/Temperature'"
    segments = path.split("/")
    for seg in segments:
        if not seg or seg != seg.strip():
            return f"expected segments separated by single '/', got {path!r}"
        if not _PATH_SEGMENT.match(seg):
            return (
                f"expected letters, digits, '_', '-', '.' or spaces in each segment, got {seg!r}"
                " (wildcards and '$' are reserved)"
            )
    return None


def parse_tag(r: Reader, *, owner: str = "memory", history_default: int = 10_000) -> TagDef:
    """One ``[[tags]]`` entry (also used by the Modbus and OPC UA source sections).

    Reads only the common tag keys; the caller adds its own and then calls ``r.done()``.
    """
    path = r.str("path")
    problem = check_tag_path(path)
    if problem:
        raise r.error("path", problem)
    type_text = r.str("type", "float64")
    try:
        data_type = DataType.parse(type_text)
    except ValueError:
        names = ", ".join(m.value.lower() for m in DataType)
        raise r.error("type", f"expected one of {names}, got {type_text!r}") from None
    shape: tuple[int, ...] = ()
    if r.has("shape"):
        raw_shape = r.raw("shape")
        if isinstance(raw_shape, int) and not isinstance(raw_shape, bool):
            raw_shape = [raw_shape]
        if (
            not isinstance(raw_shape, list)
            or not raw_shape
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in raw_shape)
        ):
            raise r.error("shape", "expected a positive integer or an array of them, e.g. [8]")
        if data_type is DataType.STRING:
            raise r.error("shape", "arrays of strings are not supported")
        shape = tuple(raw_shape)
    rng = r.number_pair("range", None)
    access_text = r.str("access", "read", choices=("read", "readwrite"))
    db_kind_text = r.str("deadband_type", "absolute", choices=("absolute", "percent"))
    deadband = r.float("deadband", 0.0, min=0.0)
    db_kind = DeadbandKind.NONE if deadband == 0 else DeadbandKind(db_kind_text)
    if db_kind is DeadbandKind.PERCENT and rng is None:
        raise r.error("deadband_type", "a percent deadband needs a 'range' = [low, high]")
    scaling = None
    if r.has("scaling"):
        s = r.table("scaling")
        raw_lo, raw_hi = s.number_pair("raw")
        eng_lo, eng_hi = s.number_pair("eng")
        s.done()
        scaling = Scaling(raw_lo, raw_hi, eng_lo, eng_hi)
    history_raw = r.raw("history", 0)
    if isinstance(history_raw, bool):
        history = history_default if history_raw else 0
    elif isinstance(history_raw, int) and history_raw >= 0:
        history = history_raw
    else:
        raise r.error("history", "expected true/false or a capacity in samples (integer >= 0)")
    if history and ((not data_type.is_numeric and data_type is not DataType.BOOLEAN) or shape):
        raise r.error("history", f"only numeric and boolean scalars are historized, not {path}")
    tag_owner = r.str("owner", owner)
    persist = r.bool("persist", tag_owner == "memory" and access_text == "readwrite")
    initial = r.raw("initial", None)
    tag = TagDef(
        path=path,
        data_type=data_type,
        shape=shape,
        unit=r.str("unit", ""),
        description=r.str("description", ""),
        low=rng[0] if rng else None,
        high=rng[1] if rng else None,
        access=Access.READ_WRITE if access_text == "readwrite" else Access.READ,
        deadband_kind=db_kind,
        deadband=deadband,
        scaling=scaling,
        owner=tag_owner,
        historize=history > 0,
        history_capacity=history,
        persist=persist,
        initial=None,
    )
    if initial is not None:
        try:
            coerce(tag, initial)
        except CoerceError as exc:
            raise r.error("initial", f"not a valid value for this tag: {exc}") from None
        tag = replace(tag, initial=initial)
    return tag


def _parse_signal(r: Reader) -> SignalConfig:
    name = r.str("name")
    problem = check_tag_path(name)
    if problem:
        raise r.error("name", problem)
    rate = r.float("sample_rate", positive=True, max=10_000_000)
    capacity = r.int("capacity", 1_048_576, min=1024, max=1 << 31)
    window = r.int("window", 4096, min=16, max=1 << 20)
    if window > capacity:
        raise r.error("window", f"expected at most capacity ({capacity}) samples, got {window}")
    hop = r.int("hop", window, min=1, max=window)
    bands = []
    if r.has("bands"):
        raw = r.raw("bands")
        if not isinstance(raw, list):
            raise r.error("bands", "expected an array of [low_hz, high_hz] pairs")
        for i, pair in enumerate(raw):
            ok = (
                isinstance(pair, list)
                and len(pair) == 2
                and all(isinstance(x, int | float) and not isinstance(x, bool) for x in pair)
            )
            if not ok or not 0 <= pair[0] < pair[1] <= rate / 2:
                raise r.error(
                    "bands",
                    f"entry {i}: expected [low_hz, high_hz] with 0 <= low < high <= "
                    f"sample_rate/2 ({rate / 2:g}), got {pair!r}",
                )
            bands.append((float(pair[0]), float(pair[1])))
    sig = SignalConfig(
        name=name,
        sample_rate=rate,
        capacity=capacity,
        block_size=r.int("block_size", 1024, min=1, max=1 << 20),
        unit=r.str("unit", "g"),
        description=r.str("description", ""),
        window=window,
        hop=hop,
        bands=tuple(bands),
        history=r.int("history", 3600, min=0, max=1 << 24),
    )
    r.done()
    return sig


def parse(text: str, *, source: str = "<default>", base_dir: Path | None = None) -> Config:
    """Parse configuration text. Raises :class:`ConfigError` naming the key and the problem."""
    ctx = Context(source, text, base_dir or Path.cwd())
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(
            "", f"not valid TOML: {exc}", source=source, line=int(m.group(1)) if m else None
        ) from None
    root = Reader(data, "", ctx)

    s = root.table("server")
    data_dir = s.path("data_dir", None) or default_data_dir()
    server = ServerConfig(
        name=s.str("name", "iotserver"),
        data_dir=data_dir,
        hostnames=s.str_list("hostnames", ("localhost",)),
        ip_addresses=s.str_list("ip_addresses", ("127.0.0.1",)),
        write_timeout=s.float("write_timeout", 10.0, positive=True, max=3600),
        shutdown_timeout=s.float("shutdown_timeout", 4.0, positive=True, max=60),
        users_file=s.path("users_file", None) or data_dir / "users.toml",
        users_file_configured=s.has("users_file"),
    )
    s.done()

    t = root.table("tls")
    tls = TlsConfig(cert=t.path("cert", None), key=t.path("key", None), ca=t.path("ca", None))
    if (tls.cert is None) != (tls.key is None):
        raise t.error("cert" if tls.cert is None else "key", "cert and key must be given together")
    t.done()

    h = root.table("history")
    history = HistoryConfig(
        max_bytes=h.int("max_bytes", 512 * 1024 * 1024, min=1024 * 1024),
        default_capacity=h.int("default_capacity", 10_000, min=16, max=1 << 30),
    )
    h.done()

    tag_list = []
    for tr in root.tables("tags"):
        tag_list.append(parse_tag(tr, history_default=history.default_capacity))
        tr.done()
    tags = tuple(tag_list)
    signals = tuple(_parse_signal(sr) for sr in root.tables("signals"))

    sim = root.table("simulator")
    simulator = SimulatorConfig(
        enabled=sim.bool("enabled", False),
        prefix=sim.str("prefix", "Plant"),
        update_hz=sim.float("update_hz", 5.0, positive=True, max=1000),
        seed=sim.int("seed", 1),
    )
    if simulator.enabled:
        problem = check_tag_path(simulator.prefix)
        if problem:
            raise sim.error("prefix", problem)
    sim.done()

    sections: dict[str, Any] = {}
    for name, target in SECTION_PARSERS.items():
        if name in data:
            sections[name] = _load_parser(target)(root.table(name))
    root.done()

    config = Config(
        source=source,
        server=server,
        tls=tls,
        history=history,
        tags=tags,
        signals=signals,
        simulator=simulator,
        sections=MappingProxyType(sections),
    )
    _check_unique_paths(config, ctx)
    return config


def _load_parser(target: str) -> Callable[[Reader], Any]:
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)  # type: ignore[no-any-return]


def all_tag_paths(config: Config) -> list[tuple[str, str]]:
    """(path, where) for every tag the configuration defines, in definition order."""
    out = [(t.path, f"tags[{i}].path") for i, t in enumerate(config.tags)]
    for i, sig in enumerate(config.signals):
        out += [(f"{sig.name}/{d}", f"signals[{i}].name") for d in sig.derived_names()]
    for name, section in config.sections.items():
        defs = getattr(section, "tag_defs", None)
        if defs is not None:
            out += [(t.path, f"{name} ({t.owner})") for t in defs()]
    return out


# Tags each signal channel publishes (computed on every window), before its band tags.
SIGNAL_DERIVED = ("RMS", "Peak", "PeakToPeak", "CrestFactor", "Kurtosis")


def _check_unique_paths(config: Config, ctx: Context) -> None:
    seen: dict[str, str] = {}
    for path, where in all_tag_paths(config):
        if path in seen:
            raise ctx.error(where, f"duplicate tag path {path!r} (first defined at {seen[path]})")
        seen[path] = where


def load(path: str | os.PathLike[str] | None) -> Config:
    """Load the file at ``path``, or the built-in default when ``path`` is None."""
    if path is None:
        return parse(DEFAULT_CONFIG)
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("", "file not found", source=str(p)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot read: {exc}", source=str(p)) from None
    return parse(text, source=str(p), base_dir=p.resolve().parent)
