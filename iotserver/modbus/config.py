"""The ``[modbus]`` section: the Modbus TCP server's register map and the PLC poller's devices.

``[modbus.server]`` serves tags of the store to Modbus clients (``[[modbus.server.map]]``
entries place a tag at an address of one of the four tables); ``[[modbus.devices]]`` are PLCs
the poller reads (``[[modbus.devices.tags]]`` define the tags it feeds, owned by
``modbus:<device name>``). Addresses are the 0-based PDU addresses of MB AP 4.4 (mbpoll's
``-0``; "40001" in a PLC manual is holding register address 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

from iotserver.confparse import Reader
from iotserver.edge import limits as edge_limits
from iotserver.edge.endpoint import EndpointError, parse_endpoint
from iotserver.security.login import may_write
from iotserver.security.users import Role
from iotserver.modbus.codec import Table
from iotserver.modbus.default_map import DEFAULT_ENDPOINT, DEFAULT_TOML
from iotserver.modbus.encoding import Kind, ModbusType, Order
from iotserver.tags.model import DataType, Scaling, TagDef

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_TOML",
    "Backoff",
    "DeviceConfig",
    "DeviceTag",
    "Identity",
    "MapEntry",
    "ModbusConfig",
    "PollGroup",
    "ServerConfig",
    "parse",
]


TABLES: dict[str, Table] = {
    "coil": Table.COILS,
    "coils": Table.COILS,
    "discrete": Table.DISCRETE_INPUTS,
    "discrete_input": Table.DISCRETE_INPUTS,
    "discrete_inputs": Table.DISCRETE_INPUTS,
    "holding": Table.HOLDING_REGISTERS,
    "holding_register": Table.HOLDING_REGISTERS,
    "holding_registers": Table.HOLDING_REGISTERS,
    "input": Table.INPUT_REGISTERS,
    "input_register": Table.INPUT_REGISTERS,
    "input_registers": Table.INPUT_REGISTERS,
}
BIT_TABLES = (Table.COILS, Table.DISCRETE_INPUTS)
WRITABLE_TABLES = (Table.COILS, Table.HOLDING_REGISTERS)
TABLE_SHORT = {
    Table.COILS: "coil",
    Table.DISCRETE_INPUTS: "discrete",
    Table.HOLDING_REGISTERS: "holding",
    Table.INPUT_REGISTERS: "input",
}
ACCESS_LEVELS = ("none", "read", "readwrite")

# Default role mapping for Modbus/TCP Security: the role names of our user model, with the
# server's one "may write" rule (iotserver.security.login.may_write).
DEFAULT_ROLES: Mapping[str, str] = MappingProxyType(
    {r.value: "readwrite" if may_write(r) else "read" for r in Role}
)


# ------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class MapEntry:
    """One tag placed in the server's register map."""

    key: str  # config key path, for messages ("modbus.server.map[3]")
    path: str
    table: Table
    address: int
    mtype: ModbusType
    order: Order
    scaling: Scaling | None = None
    writable: bool = True  # may Modbus clients write it (the tag must be writable too)
    count: int = 0  # elements of an array tag on consecutive addresses; 0: a scalar tag

    @property
    def element_width(self) -> int:
        return 1 if self.table in BIT_TABLES else self.mtype.width

    @property
    def width(self) -> int:
        return self.element_width * (self.count or 1)

    @property
    def end(self) -> int:
        return self.address + self.width


@dataclass(frozen=True)
class Identity:
    """FC2B/0E device identification objects (MB AP 6.21) and the FC11 server id."""

    vendor_name: str = "iotserver"
    product_code: str = "IOTSERVER"
    revision: str = "0.1"
    vendor_url: str = ""
    product_name: str = "iotserver Modbus TCP server"
    model_name: str = ""
    application_name: str = ""
    server_id: str = "iotserver"

    def objects(self) -> dict[int, bytes]:
        """Object id -> value; empty optional objects are left out."""
        items = [
            (0x00, self.vendor_name), (0x01, self.product_code), (0x02, self.revision),
            (0x03, self.vendor_url), (0x04, self.product_name), (0x05, self.model_name),
            (0x06, self.application_name),
        ]
        return {i: v.encode("utf-8") for i, v in items if v or i <= 0x02}


@dataclass(frozen=True)
class ServerConfig:
    """``[modbus.server]``."""

    enabled: bool = True
    endpoints: tuple[str, ...] = (DEFAULT_ENDPOINT,)
    unit_ids: frozenset[int] | None = None  # None: every unit id is served
    unknown_unit: str = "exception"  # "exception" (0B) | "ignore" (no answer)
    # Each listener's own connection limits and timeouts (iotserver.edge.limits): every
    # endpoint gets these values for itself, never shared with another endpoint.
    max_connections: int = edge_limits.MODBUS.max_connections
    max_connections_per_peer: int = edge_limits.MODBUS.max_connections_per_peer
    handshake_timeout: float = edge_limits.MODBUS.handshake_timeout
    login_timeout: float = edge_limits.MODBUS.login_timeout
    frame_timeout: float = edge_limits.MODBUS.frame_timeout
    idle_timeout: float = edge_limits.MODBUS.idle_timeout  # 0 = never
    max_requests_in_flight: int = 16
    bad_quality: str = "last"  # "last" | "exception" (04)
    unmapped_reads: str = "exception"  # "exception" (02) | "zero"
    fast_paths: bool = True  # the shortcuts through Twisted's internals (compat_twisted)
    # TLS role (lower case) -> none | read | readwrite
    roles: Mapping[str, str] = field(default_factory=lambda: DEFAULT_ROLES)
    no_role: str = "none"  # access of a TLS client whose certificate carries no known role
    identity: Identity = field(default_factory=Identity)
    map: tuple[MapEntry, ...] = ()

    @property
    def limits(self) -> edge_limits.Limits:
        return edge_limits.Limits(**{f.name: getattr(self, f.name)
                                     for f in fields(edge_limits.Limits)})


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: ``initial`` doubling up to ``max``, each +- ``jitter`` (a fraction)."""

    initial: float = 0.5
    max: float = 30.0
    jitter: float = 0.2


@dataclass(frozen=True)
class PollGroup:
    name: str
    interval: float


@dataclass(frozen=True)
class DeviceTag:
    """A polled tag: its definition and where it lives in the PLC."""

    key: str
    tag: TagDef
    table: Table
    address: int
    mtype: ModbusType
    order: Order
    group: str
    unit: int

    @property
    def width(self) -> int:
        return 1 if self.table in BIT_TABLES else self.mtype.width


@dataclass(frozen=True)
class DeviceConfig:
    """One ``[[modbus.devices]]`` entry: a PLC polled over Modbus TCP."""

    name: str
    host: str
    port: int
    unit: int = 1
    timeout: float = 1.0
    retries: int = 0
    order: Order = Order.ABCD
    backoff: Backoff = field(default_factory=Backoff)
    max_gap: int = 0
    max_registers: int = 125
    max_bits: int = 2000
    bit_write: str = "mask"  # FC16 mask write, or "rmw": read, set bit, FC06
    single_writes: bool = True  # FC05/FC06 for one coil/register (else FC0F/FC10)
    groups: tuple[PollGroup, ...] = ()
    tags: tuple[DeviceTag, ...] = ()

    @property
    def owner(self) -> str:
        return f"modbus:{self.name}"


@dataclass(frozen=True)
class ModbusConfig:
    """Parsed ``[modbus]``."""

    server: ServerConfig | None = None
    devices: tuple[DeviceConfig, ...] = ()

    def tag_defs(self) -> list[TagDef]:
        """The tags the poller feeds (the server's map refers to tags defined elsewhere)."""
        return [t.tag for d in self.devices for t in d.tags]

    def summary(self) -> list[str]:
        lines = []
        s = self.server
        if s is not None and s.enabled:
            for text in s.endpoints:
                ep = parse_endpoint(text)
                kind = "Modbus/TCP Security, client certificates" if ep.is_tls else "plain text"
                lines.append(f"server on {text} ({kind}, {ep.where()}, at most "
                             f"{s.limits.max_connections} connections)")
            counts = {t: 0 for t in Table}
            for e in s.map:
                counts[e.table] += 1
            lines.append("map: " + ", ".join(f"{n} {TABLE_SHORT[t]}" for t, n in counts.items()))
        elif s is not None:
            lines.append("server: disabled")
        for d in self.devices:
            groups = ", ".join(f"{g.name} {g.interval:g} s" for g in d.groups)
            lines.append(f"device {d.name} at {d.host}:{d.port} unit {d.unit}: "
                         f"{len(d.tags)} tags, poll groups {groups}")
        return lines or ["nothing configured"]


# ------------------------------------------------------------------------------- helpers


def _table(r: Reader, name: str = "table", default: Any = None) -> Table:
    text = r.str(name, default)
    try:
        return TABLES[text.lower()]
    except KeyError:
        raise r.error(name, f"expected one of coil, discrete, holding, input, got {text!r}"
                      ) from None


def _order(r: Reader, default: Order) -> Order:
    if not r.has("order"):
        return default
    try:
        return Order.parse(r.str("order"))
    except ValueError as exc:
        raise r.error("order", str(exc)) from None


def _mtype(r: Reader, table: Table, text: str | None) -> ModbusType:
    if text is None:
        if table in BIT_TABLES:
            return ModbusType(Kind.BOOL)
        raise r.error("type", "is required for registers: bool, bit:N, int16, uint16, int32, "
                      "uint32, int64, uint64, float32, float64 or string:N")
    try:
        mtype = ModbusType.parse(text)
    except ValueError as exc:
        raise r.error("type", f"expected a Modbus type (int16, float32, bit:3, string:10...): "
                      f"{exc}") from None
    if table in BIT_TABLES and mtype.kind is not Kind.BOOL:
        raise r.error("type", f"coils and discrete inputs hold bool, not {text!r}")
    return mtype


def _scaling(r: Reader, mtype: ModbusType) -> Scaling | None:
    """``scaling = {raw = [lo, hi], eng = [lo, hi]}`` or ``scale``/``offset``.

    With scale/offset: eng = raw * scale + offset.
    """
    result = None
    if r.has("scaling"):
        s = r.table("scaling")
        raw_lo, raw_hi = s.number_pair("raw")
        eng_lo, eng_hi = s.number_pair("eng")
        s.done()
        result = Scaling(raw_lo, raw_hi, eng_lo, eng_hi)
    if r.has("scale") or r.has("offset"):
        if result is not None:
            raise r.error("scale", "give either scaling = {raw, eng} or scale/offset, not both")
        scale = r.float("scale", 1.0)
        if scale == 0:
            raise r.error("scale", "expected a non-zero number")
        offset = r.float("offset", 0.0)
        result = Scaling(0.0, 1.0, offset, offset + scale)
    if result is not None and mtype.kind in (Kind.BOOL, Kind.BIT, Kind.STRING):
        raise r.error("scaling" if r.has("scaling") else "scale",
                      f"scaling applies to numbers, not {mtype.kind.value}")
    return result


def _check_overlaps(entries: list[tuple[MapEntry, Reader]]) -> None:
    """Per table, no two entries may share an address; bits of one register may, if distinct."""
    by_table: dict[Table, list[tuple[MapEntry, Reader]]] = {}
    for item in entries:
        by_table.setdefault(item[0].table, []).append(item)
    for items in by_table.values():
        items.sort(key=lambda it: (it[0].address, it[0].end))
        bits_at: dict[int, dict[int, MapEntry]] = {}
        last: MapEntry | None = None
        for entry, r in items:
            if entry.mtype.kind is Kind.BIT:
                at = bits_at.setdefault(entry.address, {})
                other = at.get(entry.mtype.bit)
                if other is not None:
                    raise r.error("type", f"bit {entry.mtype.bit} of {TABLE_SHORT[entry.table]} "
                                  f"{entry.address} is already mapped by {other.key} "
                                  f"({other.path})")
                at[entry.mtype.bit] = entry
                shares = last is not None and last.mtype.kind is Kind.BIT
                if shares and last is not None and last.address == entry.address:
                    continue
            if last is not None and entry.address < last.end:
                raise r.error("address", f"{TABLE_SHORT[entry.table]} {entry.address}.."
                              f"{entry.end - 1} overlaps {last.key} ({last.path}, "
                              f"{last.address}..{last.end - 1})")
            last = entry


def _map_entry(r: Reader) -> MapEntry:
    from iotserver.config import check_tag_path

    path = r.str("path")
    problem = check_tag_path(path)
    if problem:
        raise r.error("path", problem)
    table = _table(r)
    mtype = _mtype(r, table, r.str("type", None))
    address = r.int("address", min=0, max=65535)
    entry = MapEntry(
        key=r.prefix,
        path=path,
        table=table,
        address=address,
        mtype=mtype,
        order=_order(r, Order.ABCD),
        scaling=_scaling(r, mtype),
        writable=r.bool("writable", table in WRITABLE_TABLES),
        count=r.int("count", 0, min=1, max=65536) if r.has("count") else 0,
    )
    if entry.count and mtype.kind in (Kind.BIT, Kind.STRING):
        raise r.error("count", f"arrays are of numbers or bool, not {mtype.kind.value}")
    if entry.end > 65536:
        raise r.error("address", f"{mtype.kind.value} at {address} runs past address 65535")
    if entry.writable and table not in WRITABLE_TABLES:
        raise r.error("writable", "discrete inputs and input registers are read-only")
    r.done()
    return entry


def _identity(r: Reader) -> Identity:
    d = Identity()
    ident = Identity(
        vendor_name=r.str("vendor_name", d.vendor_name),
        product_code=r.str("product_code", d.product_code),
        revision=r.str("revision", d.revision),
        vendor_url=r.str("vendor_url", d.vendor_url),
        product_name=r.str("product_name", d.product_name),
        model_name=r.str("model_name", d.model_name),
        application_name=r.str("application_name", d.application_name),
        server_id=r.str("server_id", d.server_id),
    )
    for name, value in vars(ident).items():
        if len(value.encode("utf-8")) > 200:
            raise r.error(name, "expected at most 200 bytes")
    r.done()
    return ident


SERVER_KINDS = ("tcp", "tcp6", "tls", "unix", "systemd")


def _check_server_endpoint(r: Reader, index: int, text: str) -> None:
    key = f"endpoints[{index}]"
    try:
        ep = parse_endpoint(text, SERVER_KINDS, "Modbus/TCP Security needs client certificates, "
                            "which ssl: cannot require: use tls:PORT (e.g. "
                            "'tls:8802:interface=127.0.0.1')")
    except EndpointError as exc:
        raise r.error(key, str(exc)) from None
    if ep.kind == "tls":
        if ep.client_auth not in (None, "required"):
            raise r.error(key, "Modbus/TCP Security requires client certificates: leave out "
                          "clientAuth or set clientAuth=required")
        if ep.cert is not None and ep.ca is None:
            raise r.error(key, "with cert= and key=, give ca= (the CA client certificates "
                          "must chain to)")


def _server(r: Reader) -> ServerConfig:
    d = ServerConfig()
    enabled = r.bool("enabled", True)
    endpoints = r.str_list("endpoints", d.endpoints)
    if enabled and not endpoints:
        raise r.error("endpoints", "expected at least one endpoint (or enabled = false)")
    for i, ep in enumerate(endpoints):
        _check_server_endpoint(r, i, ep)
    unit_ids: frozenset[int] | None = None
    raw_units = r.raw("unit_ids", "all")
    if raw_units != "all":
        if (not isinstance(raw_units, list) or not raw_units
                or not all(isinstance(u, int) and not isinstance(u, bool) and 0 <= u <= 255
                           for u in raw_units)):
            raise r.error("unit_ids", 'expected "all" or an array of unit ids 0..255, e.g. [1]')
        unit_ids = frozenset(raw_units)
    roles = dict(d.roles)
    if r.has("roles"):
        rr = r.table("roles")
        roles = {}
        for name in list(rr.data):
            roles[name.lower()] = rr.str(name, choices=ACCESS_LEVELS)
        rr.done()
    entries: list[tuple[MapEntry, Reader]] = []
    for mr in r.tables("map"):
        entries.append((_map_entry(mr), mr))
    _check_overlaps(entries)
    cfg = ServerConfig(
        enabled=enabled,
        endpoints=tuple(endpoints),
        unit_ids=unit_ids,
        unknown_unit=r.str("unknown_unit", d.unknown_unit, choices=("exception", "ignore")),
        **asdict(edge_limits.read_limits(r, d.limits)),
        max_requests_in_flight=r.int("max_requests_in_flight", d.max_requests_in_flight,
                                     min=1, max=10_000),
        bad_quality=r.str("bad_quality", d.bad_quality, choices=("last", "exception")),
        unmapped_reads=r.str("unmapped_reads", d.unmapped_reads, choices=("exception", "zero")),
        fast_paths=r.bool("fast_paths", d.fast_paths),
        roles=MappingProxyType(roles),
        no_role=r.str("no_role", d.no_role, choices=ACCESS_LEVELS),
        identity=_identity(r.table("identification")),
        map=tuple(e for e, _ in entries),
    )
    r.done()
    return cfg


# ------------------------------------------------------------------------------- devices


def parse_device_endpoint(text: str) -> tuple[str, int]:
    """``host:port``, ``host`` (port 502), ``[v6]:port`` or ``tcp:host=H:port=P``.

    Returns (host, port).
    """
    text = text.strip()
    if text.startswith("tcp:"):
        opts = dict(p.partition("=")[::2] for p in text[4:].split(":") if p)
        host, port_text = opts.get("host", ""), opts.get("port", "502")
    elif text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":") or "502"
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, "502"
    if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"expected host:port (e.g. '192.168.0.10:502'), got {text!r}")
    return host, int(port_text)


_DEFAULT_DATA_TYPE = {
    Kind.BOOL: DataType.BOOLEAN, Kind.BIT: DataType.BOOLEAN,
    Kind.INT16: DataType.INT16, Kind.UINT16: DataType.UINT16,
    Kind.INT32: DataType.INT32, Kind.UINT32: DataType.UINT32,
    Kind.INT64: DataType.INT64, Kind.UINT64: DataType.UINT64,
    Kind.FLOAT32: DataType.FLOAT32, Kind.FLOAT64: DataType.FLOAT64,
    Kind.STRING: DataType.STRING,
}


def compatible(mtype: ModbusType, data_type: DataType) -> bool:
    """May a tag of ``data_type`` be carried as ``mtype``? (bool/bit: Boolean, string: String)."""
    if mtype.kind in (Kind.BOOL, Kind.BIT):
        return data_type is DataType.BOOLEAN
    if mtype.kind is Kind.STRING:
        return data_type is DataType.STRING
    return data_type.is_numeric


def _device_tag(r: Reader, dev: str, default_order: Order, unit: int,
                groups: Mapping[str, PollGroup]) -> DeviceTag:
    from iotserver.config import parse_tag

    type_text = r.data.get("type")
    if type_text is not None and not isinstance(type_text, str):
        raise r.error("type", "expected a Modbus type string such as 'float32' or 'bit:3'")
    # The tag's own data type follows from the Modbus type unless given as data_type; the
    # common keys go through config.parse_tag with that substituted for "type".
    data = {k: v for k, v in r.data.items() if k not in ("type", "data_type")}
    table = _table(Reader(data, r.prefix, r.ctx))
    mtype = _mtype(r, table, type_text)
    if "data_type" in r.data:
        data["type"] = r.data["data_type"]
    elif "scaling" in r.data or "scale" in r.data or "offset" in r.data:
        data["type"] = "float64"
    else:
        data["type"] = _DEFAULT_DATA_TYPE[mtype.kind].value
    sub = Reader(data, r.prefix, r.ctx)
    sub.raw("table")
    owner = f"modbus:{dev}"
    tag = parse_tag(sub, owner=owner)
    if tag.owner != owner:
        raise r.error("owner", f"tags of device {dev!r} are owned by {owner!r}")
    if tag.is_array:
        raise r.error("shape", "arrays are not supported for polled tags: one tag per value")
    if not compatible(mtype, tag.data_type):
        raise r.error("data_type", f"a {tag.data_type.value} tag cannot be read as "
                      f"{type_text or 'bool'}")
    scaling = _scaling(sub, mtype)
    if scaling is not None:
        tag = replace(tag, scaling=scaling)
    if tag.scaling is not None and mtype.kind in (Kind.BOOL, Kind.BIT, Kind.STRING):
        raise r.error("scaling", f"scaling applies to numbers, not {mtype.kind.value}")
    if tag.writable and table not in WRITABLE_TABLES:
        raise r.error("access", "discrete inputs and input registers are read-only")
    group = sub.str("group", "default")
    if group not in groups:
        raise r.error("group", f"no poll group {group!r} in this device (groups: "
                      f"{', '.join(groups)})")
    address = sub.int("address", min=0, max=65535)
    dtag = DeviceTag(
        key=r.prefix, tag=tag, table=table, address=address, mtype=mtype,
        order=_order(sub, default_order), group=group,
        unit=sub.int("unit_id", unit, min=0, max=255),
    )
    if address + dtag.width > 65536:
        raise r.error("address", f"{mtype.kind.value} at {address} runs past address 65535")
    sub.done()
    return dtag


def _device(r: Reader) -> DeviceConfig:
    from iotserver.config import check_tag_path

    name = r.str("name")
    if check_tag_path(name) or "/" in name or " " in name:
        raise r.error("name", "expected a short name of letters, digits, '_', '-', '.', "
                      f"got {name!r}")
    try:
        host, port = parse_device_endpoint(r.str("endpoint"))
    except ValueError as exc:
        raise r.error("endpoint", str(exc)) from None
    unit = r.int("unit_id", 1, min=0, max=255)
    order = _order(r, Order.ABCD)
    interval = r.float("interval", 1.0, positive=True, max=86_400)
    b = r.table("backoff")
    backoff = Backoff(
        initial=b.float("initial", 0.5, positive=True, max=3600),
        max=b.float("max", 30.0, positive=True, max=86_400),
        jitter=b.float("jitter", 0.2, min=0, max=1),
    )
    if backoff.max < backoff.initial:
        raise b.error("max", f"expected max >= initial ({backoff.initial:g})")
    b.done()
    groups: dict[str, PollGroup] = {"default": PollGroup("default", interval)}
    for gr in r.tables("groups"):
        gname = gr.str("name")
        if gname in groups and gname != "default":
            raise gr.error("name", f"poll group {gname!r} defined twice")
        groups[gname] = PollGroup(gname, gr.float("interval", positive=True, max=86_400))
        gr.done()
    tags = tuple(_device_tag(tr, name, order, unit, groups) for tr in r.tables("tags"))
    dev = DeviceConfig(
        name=name, host=host, port=port, unit=unit,
        timeout=r.float("timeout", 1.0, positive=True, max=600),
        retries=r.int("retries", 0, min=0, max=10),
        order=order, backoff=backoff,
        max_gap=r.int("max_gap", 0, min=0, max=124),
        max_registers=r.int("max_registers", 125, min=1, max=125),
        max_bits=r.int("max_bits", 2000, min=1, max=2000),
        bit_write=r.str("bit_write", "mask", choices=("mask", "rmw")),
        single_writes=r.bool("single_writes", True),
        groups=tuple(groups.values()),
        tags=tags,
    )
    for t in tags:
        limit = dev.max_bits if t.table in BIT_TABLES else dev.max_registers
        if t.width > limit:
            raise r.error("max_registers", f"{t.key} needs {t.width} registers in one read")
    r.done()
    return dev


def parse(r: Reader) -> ModbusConfig:
    """Read ``[modbus]``; every error names the key and what was expected."""
    server = _server(r.table("server")) if r.has("server") else None
    devices = []
    seen: dict[str, str] = {}
    for dr in r.tables("devices"):
        dev = _device(dr)
        if dev.name in seen:
            raise dr.error("name", f"device {dev.name!r} already defined at {seen[dev.name]}")
        seen[dev.name] = dr.prefix
        devices.append(dev)
    r.done()
    return ModbusConfig(server=server, devices=tuple(devices))

