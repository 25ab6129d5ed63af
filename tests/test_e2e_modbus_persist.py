"""Modbus writes to persisted memory tags (group-committed on a writer thread) survive kill -9:
pymodbus clients write as fast as the server answers, the server is killed mid-stream, and
after the restart every register holds at least the last value acknowledged to its client."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest
from helpers.server_process import Server

pytestmark = pytest.mark.interop

REGISTERS = 3


class Writer(threading.Thread):
    """Writes 1, 2, 3 ... to one register; ``acked`` is the last value the server answered."""

    def __init__(self, port: int, address: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.address = address
        self.acked = 0
        self.sent = 0
        self.stop = threading.Event()
        self.error = ""

    def run(self) -> None:
        from pymodbus.client import ModbusTcpClient

        client = ModbusTcpClient("127.0.0.1", port=self.port, timeout=2, retries=0)
        if not client.connect():
            self.error = "cannot connect"
            return
        try:
            value = 1
            while not self.stop.is_set() and value < 60000:
                self.sent = value
                rr = client.write_register(self.address, value, device_id=1)
                if rr.isError():
                    self.error = f"exception {rr.exception_code}"
                    return
                self.acked = value
                value += 1
        except Exception as exc:  # the server was killed: the connection breaks
            self.error = type(exc).__name__
        finally:
            client.close()


def read_back(port: int) -> list[int]:
    from pymodbus.client import ModbusTcpClient

    client = ModbusTcpClient("127.0.0.1", port=port, timeout=5, retries=1)
    assert client.connect()
    try:
        rr = client.read_holding_registers(0, count=REGISTERS, device_id=1)
        assert not rr.isError(), rr
        return list(rr.registers)
    finally:
        client.close()


def test_acknowledged_modbus_writes_survive_kill_9(tmp_path: Path) -> None:
    import time

    server = Server(tmp_path)
    tags = "".join(f"""
[[tags]]
path = "Site/R{i}"
type = "uint16"
access = "readwrite"
initial = 0

[[modbus.server.map]]
path = "Site/R{i}"
table = "holding"
address = {i}
type = "uint16"
""" for i in range(REGISTERS))
    server.cfg.write_text(f"""
[server]
data_dir = "{server.data}"

[modbus.server]
endpoints = ["tcp:{server.port}:interface=127.0.0.1"]
{tags}""")
    server.start()
    writers = [Writer(server.port, i) for i in range(REGISTERS)]
    try:
        for w in writers:
            w.start()
        deadline = time.monotonic() + 30
        while min(w.acked for w in writers) < 100:  # a stream of acknowledged writes
            assert time.monotonic() < deadline, [(w.acked, w.error) for w in writers]
            assert not any(w.error for w in writers), [w.error for w in writers]
            time.sleep(0.01)
        server.stop(signal.SIGKILL)  # mid-stream: writes in flight on every connection
        for w in writers:
            w.stop.set()
            w.join(10)
        acked = [w.acked for w in writers]
        sent = [w.sent for w in writers]
        server.start()
        values = read_back(server.port)
        for a, v, s in zip(acked, values, sent, strict=True):
            assert a <= v <= s, (acked, values, sent)
    finally:
        for w in writers:
            w.stop.set()
        server.kill()
