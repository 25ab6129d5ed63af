"""The Modbus section of the built-in default: a loopback server mapping the simulated plant.

Holding registers 0..41 are one contiguous block (a client can read it in one request):
measurements and setpoints as float32 (ABCD), counters as integers; the pump speed once more as
a scaled uint16 at 100 (0.1 rpm per count) and the press state as a string at 110. Coil 0 runs
the pump; discrete inputs 0..3 are status bits; input registers hold power and counters.
"""

from __future__ import annotations

__all__ = ["DEFAULT_ENDPOINT", "DEFAULT_TOML"]

DEFAULT_ENDPOINT = "tcp:5020:interface=127.0.0.1"

def _default_toml() -> str:
    holding = [
        ("Line1/Pump1/Speed", 0, "float32", ""),
        ("Line1/Pump1/SpeedSetpoint", 2, "float32", ""),
        ("Line1/Pump1/Current", 4, "float32", ""),
        ("Line1/Pump1/FlowRate", 6, "float32", ""),
        ("Line1/Press1/Temperature", 8, "float32", ""),
        ("Line1/Press1/Pressure", 10, "float32", ""),
        ("Line1/Press1/TemperatureSetpoint", 12, "float32", ""),
        ("Line1/Press1/StrokeCount", 14, "uint32", ""),
        ("Line1/Conveyor/Mode", 16, "int16", ""),
        ("Line1/Press1/Running", 17, "bool", ""),
        ("Utilities/Heartbeat", 18, "int32", ""),
        ("Line2/Oven/Zone1/Temperature", 20, "float32", ""),
        ("Line2/Oven/Zone2/Temperature", 22, "float32", ""),
        ("Line2/Oven/Zone3/Temperature", 24, "float32", ""),
        ("Line2/Oven/Zone4/Temperature", 26, "float32", ""),
        ("Line2/Oven/Zone1/Setpoint", 28, "float32", ""),
        ("Line2/Oven/Zone2/Setpoint", 30, "float32", ""),
        ("Line2/Oven/Zone3/Setpoint", 32, "float32", ""),
        ("Line2/Oven/Zone4/Setpoint", 34, "float32", ""),
        ("Utilities/Compressor/Pressure", 36, "float32", ""),
        ("Utilities/Power/ActivePower", 38, "float32", ""),
        ("Utilities/Water/TankLevel", 40, "float32", ""),
        ("Line1/Pump1/Speed", 100, "uint16", "scaling = { raw = [0, 36000], eng = [0, 3600] }"),
        ("Line1/Press1/State", 110, "string:8", ""),
    ]
    lines = [
        "# Modbus TCP server on loopback: a register map of the simulated plant.",
        "[modbus.server]",
        f'endpoints = ["{DEFAULT_ENDPOINT}"]',
        "",
    ]

    def add(table: str, path: str, address: int, mtype: str = "", extra: str = "") -> None:
        lines.append("[[modbus.server.map]]")
        lines.append(f'path = "Plant/{path}"')
        lines.append(f'table = "{table}"')
        lines.append(f"address = {address}")
        if mtype:
            lines.append(f'type = "{mtype}"')
        if extra:
            lines.append(extra)
        lines.append("")

    for path, address, mtype, extra in holding:
        add("holding", path, address, mtype, extra)
    add("coil", "Line1/Pump1/Run", 0)
    for i, path in enumerate(["Line1/Press1/Running", "Line1/Conveyor/Jammed",
                              "Line2/Oven/DoorOpen", "Utilities/Compressor/Loaded"]):
        add("discrete", path, i)
    add("input", "Utilities/Power/Frequency", 0, "float32")
    add("input", "Utilities/Power/Energy", 2, "float64")
    add("input", "Line1/Conveyor/PartCount", 6, "uint64")
    return "\n".join(lines)


DEFAULT_TOML = _default_toml()
