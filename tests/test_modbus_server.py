"""The Modbus TCP server in the assembled app: raw frames, pymodbus and mbpoll as clients."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from helpers import aio, wait_for
from helpers.modbus import TIMEOUT, Raw, adu, exc, f32, mbpoll, raw, read_hr, write_hr
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from iotserver import app, config
from iotserver.modbus.codec import Table
from iotserver.modbus.encoding import from_wire
from iotserver.tags.model import Quality, TagDef, Update


@pytest.fixture(scope="module", autouse=True)
def _listener_reservation() -> None:
    """Twisted keeps one /dev/null fd reserved once any port listens: not a test's leak."""
    from twisted.internet.tcp import _reservedFD

    _reservedFD.reserve()

CONFIG = """
[server]
data_dir = "{data}"

[[tags]]
path = "T/Setpoint"
type = "float32"
access = "readwrite"
range = [0, 100]
initial = 10

[[tags]]
path = "T/Count"
type = "int32"
access = "readwrite"
initial = 7

[[tags]]
path = "T/Measured"
type = "float64"
initial = 1.5

[[tags]]
path = "T/Run"
type = "boolean"
access = "readwrite"
initial = false

[[tags]]
path = "T/Alarm"
type = "boolean"
initial = true

[[tags]]
path = "T/Flag0"
type = "boolean"
access = "readwrite"
initial = false

[[tags]]
path = "T/Flag3"
type = "boolean"
access = "readwrite"
initial = true

[[tags]]
path = "T/Name"
type = "string"
access = "readwrite"
initial = "abc"

[[tags]]
path = "T/Scaled"
type = "float64"
access = "readwrite"
range = [0, 100]
initial = 50

[[tags]]
path = "T/Slow"
type = "float64"
access = "readwrite"
owner = "slow"
initial = 0

[modbus.server]
endpoints = {endpoints}
unit_ids = [1, 255]
max_requests_in_flight = 4
max_connections = 4
{extra}

[[modbus.server.map]]
path = "T/Setpoint"
table = "holding"
address = 0
type = "float32"

[[modbus.server.map]]
path = "T/Count"
table = "holding"
address = 2
type = "int32"
order = "CDAB"

[[modbus.server.map]]
path = "T/Measured"
table = "holding"
address = 4
type = "float64"

[[modbus.server.map]]
path = "T/Scaled"
table = "holding"
address = 8
type = "uint16"
scaling = {{ raw = [0, 1000], eng = [0, 100] }}

[[modbus.server.map]]
path = "T/Flag0"
table = "holding"
address = 9
type = "bit:0"

[[modbus.server.map]]
path = "T/Flag3"
table = "holding"
address = 9
type = "bit:3"

[[modbus.server.map]]
path = "T/Name"
table = "holding"
address = 10
type = "string:4"

[[modbus.server.map]]
path = "T/Slow"
table = "holding"
address = 20
type = "float32"

[[modbus.server.map]]
path = "T/Run"
table = "coil"
address = 0

[[modbus.server.map]]
path = "T/Alarm"
table = "discrete"
address = 0

[[modbus.server.map]]
path = "T/Measured"
table = "input"
address = 0
type = "float64"
"""


class SlowOwner:
    """Answers writes after ``delay`` seconds with ``quality`` (a PLC behind the gateway)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.delay = 0.2
        self.quality = Quality.GOOD
        self.calls = 0

    def write_tag(self, tag: TagDef, value: Any) -> Deferred[Quality]:
        self.calls += 1

        def done() -> Quality:
            if self.quality is Quality.GOOD:
                self.store.apply([Update(tag.path, value)])
            return self.quality

        return task.deferLater(reactor, self.delay, done)


@dataclass
class Server:
    port: int
    core: Any
    service: Any
    slow: SlowOwner
    data: Path


async def start_server(tmp_path: Path, port: int, extra: str = "",
                       endpoints: list[str] | None = None) -> tuple[Any, Server]:
    eps = endpoints or [f"tcp:{port}:interface=127.0.0.1"]
    text = CONFIG.format(data=tmp_path / "data", endpoints=str(eps).replace("'", '"'),
                         extra=extra)
    cfg = config.parse(text, source="test.toml")
    root, core = app.build(cfg, reactor)
    root.startService()
    service = core.services["modbus"]
    await service.started
    if port == 0:  # listening on port 0: the port the system chose
        port = service.ports[0].getHost().port
    slow = SlowOwner(core.store)
    core.store.register_owner("slow", slow)
    return root, Server(port, core, service, slow, tmp_path / "data")


@pytest_twisted.async_yield_fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    root, srv = await start_server(tmp_path, 0)
    try:
        yield srv
    finally:
        await root.stopService()


# ------------------------------------------------------------------------------- raw frames


@pytest_twisted.ensureDeferred
async def test_reads_writes_and_refusals_raw(server: Server) -> None:
    c = await raw(server.port)
    store = server.core.store
    try:
        c.send(read_hr(1, 0, 4))
        rsp = await c.read(9 + 8)
        assert rsp[:9] == adu(1, bytes((3, 8)) + bytes(8))[:9]
        regs = from_wire(rsp[9:])
        assert struct.unpack(">f", rsp[9:13])[0] == 10.0
        assert list(regs[2:4]) == [7, 0]  # int32 7 in CDAB: low word first
        # write the setpoint (FC10): echoed, and the store has it
        c.send(write_hr(2, 0, f32(42.5)))
        assert await c.read(12) == adu(2, struct.pack(">BHH", 0x10, 0, 2))
        assert store.read("T/Setpoint").value == 42.5
        # out of the tag's range -> 03, nothing written
        c.send(write_hr(3, 0, f32(500)))
        assert await c.read(9) == exc(3, 0x10, 3)
        assert store.read("T/Setpoint").value == 42.5
        # read-only tag -> 02
        c.send(write_hr(4, 4, [0, 0, 0, 0]))
        assert await c.read(9) == exc(4, 0x10, 2)
        # half of a float32 -> 02
        c.send(write_hr(5, 1, [0]))
        assert await c.read(9) == exc(5, 0x10, 2)
        # unmapped addresses -> 02 for reads and writes
        c.send(read_hr(6, 12, 10))
        assert await c.read(9) == exc(6, 3, 2)
        c.send(write_hr(7, 300, [1]))
        assert await c.read(9) == exc(7, 0x10, 2)
        # one bad value among several targets: nothing is written (validated first)
        c.send(write_hr(8, 0, [*f32(20), 9, 0, 0, 0, 0, 0]))
        assert await c.read(9) == exc(8, 0x10, 2)
        assert store.read("T/Setpoint").value == 42.5 and store.read("T/Count").value == 7
        # scaled register: raw 1000 = 100 eng; raw 1001 is out of range -> 03
        c.send(adu(9, struct.pack(">BHH", 6, 8, 250)))
        assert await c.read(12) == adu(9, struct.pack(">BHH", 6, 8, 250))
        assert store.read("T/Scaled").value == 25.0
        c.send(adu(10, struct.pack(">BHH", 6, 8, 1001)))
        assert await c.read(9) == exc(10, 6, 3)
        # bits in a register: FC16 mask write sets bit 0 only
        c.send(adu(11, struct.pack(">BHHH", 0x16, 9, 0xFFFE, 0x0001)))
        assert await c.read(14) == adu(11, struct.pack(">BHHH", 0x16, 9, 0xFFFE, 0x0001))
        assert store.read("T/Flag0").value is True and store.read("T/Flag3").value is True
        c.send(read_hr(12, 9, 1))
        assert await c.read(11) == adu(12, bytes((3, 2, 0, 0x09)))
        # FC17: write the string, then read it back in the same transaction
        body = struct.pack(">BHHHHB", 0x17, 10, 4, 10, 4, 8) + b"hey!\x00\x00\x00\x00"
        c.send(adu(13, body))
        assert await c.read(9 + 8) == adu(13, bytes((0x17, 8)) + b"hey!\x00\x00\x00\x00")
        assert store.read("T/Name").value == "hey!"
        # coils and discrete inputs
        c.send(adu(14, struct.pack(">BHH", 5, 0, 0xFF00)))
        assert await c.read(12) == adu(14, struct.pack(">BHH", 5, 0, 0xFF00))
        assert store.read("T/Run").value is True
        c.send(adu(15, struct.pack(">BHH", 2, 0, 1)))
        assert await c.read(10) == adu(15, bytes((2, 1, 1)))
        c.send(adu(16, struct.pack(">BHH", 5, 1, 0xFF00)))  # unmapped coil
        assert await c.read(9) == exc(16, 5, 2)
        # input registers are read-only by function: FC04 reads the float64
        c.send(adu(17, struct.pack(">BHH", 4, 0, 4)))
        rsp = await c.read(9 + 8)
        assert struct.unpack(">d", rsp[9:])[0] == 1.5
        # unknown function -> 01; bad quantity -> 03 (codec order)
        c.send(adu(18, b"\x41\x00"))
        assert await c.read(9) == exc(18, 0x41, 1)
        c.send(read_hr(19, 0, 126))
        assert await c.read(9) == exc(19, 3, 3)
    finally:
        await c.close()
    stats = server.service.server.stats
    assert stats.requests[0x10] >= 6 and stats.exceptions[(0x10, 2)] >= 3


@pytest_twisted.ensureDeferred
async def test_pipelined_and_split_frames_in_order(server: Server) -> None:
    c = await raw(server.port)
    try:
        # a slow write followed by reads: answered in request order, reads see the write
        frames = write_hr(1, 20, f32(3.25)) + read_hr(2, 20, 2) + read_hr(3, 0, 2)
        c.send(frames)
        first = await c.read(12)
        assert first == adu(1, struct.pack(">BHH", 0x10, 20, 2))
        second = await c.read(13)
        assert second[:2] == b"\x00\x02" and struct.unpack(">f", second[9:])[0] == 3.25
        third = await c.read(13)
        assert third[:2] == b"\x00\x03"
        # ten reads in one segment, then one frame split into single bytes
        c.send(b"".join(read_hr(100 + i, 0, 1) for i in range(10)))
        got = await c.read(11 * 10)
        tids = [struct.unpack(">H", got[i * 11:i * 11 + 2])[0] for i in range(10)]
        assert tids == list(range(100, 110))
        (proto,) = server.service.server.connections
        frame = read_hr(200, 2, 2)
        for i, b in enumerate(frame[:-1]):
            c.send(bytes([b]))  # one byte per segment: the server holds the partial frame
            await wait_for(lambda: proto.decoder.buffered == i + 1,  # noqa: B023
                           what=f"byte {i} at the server")
        c.send(frame[-1:])
        assert (await c.read(13))[:2] == struct.pack(">H", 200)
    finally:
        await c.close()


@pytest_twisted.ensureDeferred
async def test_backpressure_many_slow_writes(server: Server) -> None:
    """More pipelined writes than max_requests_in_flight: all answered, in order."""
    server.slow.delay = 0.01
    c = await raw(server.port)
    try:
        c.send(b"".join(write_hr(i, 20, f32(float(i))) for i in range(12)))
        got = await c.read(12 * 12)
        tids = [struct.unpack(">H", got[i * 12:i * 12 + 2])[0] for i in range(12)]
        assert tids == list(range(12))
        assert server.slow.calls == 12
        assert server.core.store.read("T/Slow").value == 11.0
    finally:
        await c.close()


def _loop_reader(fd: int) -> Any:
    """What the asyncio loop calls when ``fd`` is readable (None: not watched for reading)."""
    loop = reactor._asyncioEventloop  # type: ignore[attr-defined]
    try:
        handle = loop._selector.get_key(fd).data[0]
    except KeyError:
        return None
    return None if handle is None or handle.cancelled() else handle._callback


@pytest_twisted.ensureDeferred
async def test_plain_tcp_connections_are_read_by_the_protocol_itself(server: Server) -> None:
    """The loop calls the protocol directly; pause/resume, errors and EOF work as usual."""
    server.slow.delay = 0.01
    c = await raw(server.port)
    c.send(read_hr(1, 0, 2))
    assert len(await c.read(13)) == 13
    (proto,) = server.service.server.connections
    t = proto.transport
    fd = t.fileno()
    assert _loop_reader(fd) == proto._readable
    # more pipelined slow writes than max_requests_in_flight (4): reading pauses and resumes
    resumed: list[bool] = []
    resume = t.resumeProducing

    def spy() -> None:
        resumed.append(True)
        resume()

    t.resumeProducing = spy
    c.send(b"".join(write_hr(i, 20, f32(float(i))) for i in range(12)))
    got = await c.read(12 * 12)
    assert [struct.unpack(">H", got[i * 12:i * 12 + 2])[0] for i in range(12)] == list(range(12))
    assert resumed and _loop_reader(fd) == proto._readable
    # the client closes: the server's connection is lost and unregistered
    await c.close()
    await wait_for(lambda: not server.service.server.connections, what="the connection closed")
    assert proto._lost
    assert _loop_reader(fd) is None or _loop_reader(fd) != proto._readable


@pytest_twisted.ensureDeferred
async def test_error_in_data_received_drops_only_that_connection(server: Server) -> None:
    other = await raw(server.port)
    c = await raw(server.port)
    try:
        c.send(read_hr(1, 0, 2))
        assert len(await c.read(13)) == 13
        (proto,) = [p for p in server.service.server.connections
                    if p.transport.getPeer().port == c.transport.getHost().port]  # type: ignore[union-attr]

        def boom(data: bytes) -> None:
            raise RuntimeError("boom")

        proto.dataReceived = boom  # type: ignore[method-assign]
        c.send(read_hr(2, 0, 2))
        await c.lost.addTimeout(TIMEOUT, reactor)
        assert proto._lost
        other.send(read_hr(3, 0, 2))
        assert (await other.read(13))[:2] == b"\x00\x03"
    finally:
        await other.close()


@pytest_twisted.ensureDeferred
async def test_owner_failures_map_to_exceptions(server: Server) -> None:
    c = await raw(server.port)
    try:
        for quality, code in [(Quality.BAD_TIMEOUT, 0x0B), (Quality.BAD_OUT_OF_RANGE, 3),
                              (Quality.BAD_DEVICE_FAILURE, 4), (Quality.BAD_NOT_WRITABLE, 2)]:
            server.slow.quality = quality
            c.send(write_hr(1, 20, f32(1.0)))
            assert await c.read(9) == exc(1, 0x10, code), quality
    finally:
        await c.close()


@pytest_twisted.ensureDeferred
async def test_malformed_mbap_closes_only_that_connection(server: Server) -> None:
    good = await raw(server.port)
    bad = await raw(server.port)
    try:
        # a valid request, then a header with protocol id 1: the first is answered, then close
        bad.send(read_hr(1, 0, 2) + struct.pack(">HHHB", 2, 1, 6, 1) + b"\x03\x00\x00\x00\x01")
        assert (await bad.read(13))[:2] == b"\x00\x01"
        await bad.lost.addTimeout(TIMEOUT, reactor)
        good.send(read_hr(5, 0, 2))
        assert (await good.read(13))[:2] == b"\x00\x05"
        assert server.service.server.stats.framing_errors == 1
    finally:
        await good.close()


@pytest_twisted.ensureDeferred
async def test_unit_ids(server: Server) -> None:
    c = await raw(server.port)
    try:
        c.send(read_hr(1, 0, 2, unit=255))
        assert len(await c.read(13)) == 13
        c.send(read_hr(2, 0, 2, unit=7))
        assert await c.read(9) == exc(2, 3, 0x0B, unit=7)
    finally:
        await c.close()


@pytest_twisted.ensureDeferred
async def test_unknown_unit_ignored_and_bad_quality_exception(tmp_path: Path) -> None:
    root, srv = await start_server(tmp_path, 0,
                                   'unknown_unit = "ignore"\nbad_quality = "exception"')
    c = await raw(srv.port)
    try:
        c.send(read_hr(1, 0, 2, unit=9) + read_hr(2, 0, 2))
        assert (await c.read(13))[:2] == b"\x00\x02"  # the first got no answer
        srv.core.store.set_quality("T/Setpoint", Quality.BAD_NOT_CONNECTED)
        image = srv.service.server.image
        await wait_for(lambda: not isinstance(image.read_registers(Table.HOLDING_REGISTERS, 0, 4),
                                              bytes), what="the image to show the Bad quality")
        c.send(read_hr(3, 0, 4))
        assert await c.read(9) == exc(3, 3, 4)
        c.send(read_hr(4, 2, 2))  # Count is still good
        assert len(await c.read(13)) == 13
    finally:
        await c.close()
        await root.stopService()


@pytest_twisted.ensureDeferred
async def test_connection_limit_and_idle_timeout(tmp_path: Path) -> None:
    root, srv = await start_server(tmp_path, 0, "idle_timeout = 0.3")
    conns = [await raw(srv.port) for _ in range(5)]
    try:
        await conns[4].lost.addTimeout(TIMEOUT, reactor)  # the fifth is refused
        stats = srv.service.listeners.listeners[0].stats
        assert stats.refused_listener_full == 1
        conns[0].send(read_hr(1, 0, 2))
        assert len(await conns[0].read(13)) == 13
        for c in conns[:4]:
            await c.lost.addTimeout(TIMEOUT, reactor)  # idle for 0.3 s: closed
        assert stats.idle_timeouts == 4
    finally:
        for c in conns:
            if c.transport is not None and c.transport.connected:  # type: ignore[attr-defined]
                await c.close()
        await root.stopService()


# ------------------------------------------------------------------------------- third parties


@pytest.mark.interop
@pytest_twisted.ensureDeferred
async def test_pymodbus_client(server: Server) -> None:
    from pymodbus.client import AsyncModbusTcpClient

    async def run() -> None:
        client = AsyncModbusTcpClient("127.0.0.1", port=server.port, timeout=2, retries=0,
                                      reconnect_delay=0)
        await client.connect()
        try:
            rr = await client.read_holding_registers(0, count=2, device_id=1)
            value = client.convert_from_registers(rr.registers, client.DATATYPE.FLOAT32)
            assert value == 10.0
            rr = await client.write_registers(
                0, client.convert_to_registers(55.5, client.DATATYPE.FLOAT32), device_id=1)
            assert not rr.isError()
            rr = await client.write_register(8, 2000, device_id=1)  # 200.0 eng > range 100
            assert rr.isError() and rr.exception_code == 3
            rr = await client.write_coil(0, True, device_id=1)
            assert not rr.isError()
            rr = await client.read_coils(0, count=1, device_id=1)
            assert rr.bits[0] is True
            rr = await client.read_discrete_inputs(0, count=1, device_id=1)
            assert rr.bits[0] is True
            rr = await client.read_device_information(device_id=1)
            assert rr.information[0] == b"iotserver"
            rr = await client.read_holding_registers(300, count=1, device_id=1)
            assert rr.isError() and rr.exception_code == 2
        finally:
            client.close()

    await aio(run())
    assert server.core.store.read("T/Setpoint").value == 55.5
    assert server.core.store.read("T/Run").value is True


@pytest.mark.interop
@pytest_twisted.ensureDeferred
async def test_mbpoll_reads_and_writes(server: Server) -> None:
    port = str(server.port)
    text, code = await mbpoll("-m", "tcp", "-a", "1", "-r", "1", "-c", "1", "-t", "4:float", "-B",
                              "-1", "-p", port, "127.0.0.1")
    assert code == 0 and "[1]: \t10" in text, text
    text, code = await mbpoll("-m", "tcp", "-a", "1", "-r", "1", "-t", "4:float", "-B", "-1",
                              "-p", port, "127.0.0.1", "33.5")
    assert code == 0, text
    assert server.core.store.read("T/Setpoint").value == 33.5
    # zero-based addressing, 16-bit registers: the scaled register holds 500 for 50.0
    text, code = await mbpoll("-m", "tcp", "-a", "1", "-0", "-r", "8", "-c", "1", "-t", "4",
                              "-1", "-p", port, "127.0.0.1")
    assert code == 0 and "[8]: \t500" in text, text
    # a refused write: mbpoll reports the exception
    text, code = await mbpoll("-m", "tcp", "-a", "1", "-0", "-r", "8", "-t", "4", "-1",
                              "-p", port, "127.0.0.1", "5000")
    assert code != 0 and "Illegal data value" in text, text
    text, code = await mbpoll("-m", "tcp", "-a", "1", "-r", "1", "-c", "1", "-t", "1", "-1",
                              "-p", port, "127.0.0.1")
    assert code == 0 and "[1]: \t1" in text, text


# ---------------------------------------------------------------------------- Modbus/TCP Security


@pytest_twisted.ensureDeferred
async def test_tls_client_certificate_roles(tmp_path: Path) -> None:
    """tls: listener with the server's own certificate: role -> access; no role -> closed."""
    from twisted.internet.endpoints import wrapClientTLS

    from iotserver.security import pki
    from iotserver.security.tls import client_context_factory, peer_certificate

    root, srv = await start_server(tmp_path, 0, endpoints=[
        "tcp:0:interface=127.0.0.1", "tls:0:interface=127.0.0.1"])
    tls_port = srv.service.ports[1].getHost().port
    tls_dir = srv.data / "tls"
    ca_cert, ca_key = pki.load_cert(tls_dir / "ca.pem"), pki.load_key(tls_dir / "ca.key")

    def client(name: str, role: str | None) -> Any:
        cert, key = pki.issue_client_cert(ca_cert, ca_key, name, role=role)  # type: ignore[arg-type]
        pki.write_cert_pem(cert, tmp_path / f"{name}.pem")
        pki.write_key_pem(key, tmp_path / f"{name}.key")
        ctx = client_context_factory("localhost", ca_path=tls_dir / "ca.pem",
                                     cert_path=tmp_path / f"{name}.pem",
                                     key_path=tmp_path / f"{name}.key")
        return wrapClientTLS(ctx, TCP4ClientEndpoint(reactor, "127.0.0.1", tls_port))

    try:
        op = await connectProtocol(client("op", "Operator"), Raw())
        op.send(read_hr(1, 0, 2))
        assert len(await op.read(13)) == 13
        op.send(write_hr(2, 0, f32(1.0)))
        assert await op.read(9) == exc(2, 0x10, 1)  # read-only role: Illegal Function
        await op.close()
        eng = await connectProtocol(client("eng", "Engineer"), Raw())
        eng.send(write_hr(3, 0, f32(2.0)))
        assert await eng.read(12) == adu(3, struct.pack(">BHH", 0x10, 0, 2))
        # TLS connections are read the normal way (through the TLS layer)
        secure = [p for p in srv.service.server.connections if p.secure]
        assert secure and all(p._recv is None for p in secure)
        assert srv.core.store.read("T/Setpoint").value == 2.0
        await eng.close()
        # both writes are in the audit trail, with the certificate's name as the principal
        await srv.core.audit.sync()
        import json

        records = [json.loads(x) for x in (srv.data / "audit.jsonl").read_text().splitlines()]
        writes = [(r["principal"], r["protocol"], r["tag"], r["result"]) for r in records
                  if r["event"] == "write"]
        assert ("op", "modbus", "T/Setpoint", "BadUserAccessDenied") in writes
        assert ("eng", "modbus", "T/Setpoint", "Good") in writes
        nobody = await connectProtocol(client("nobody", None), Raw())
        await nobody.lost.addTimeout(TIMEOUT, reactor)
        assert srv.service.server.stats.denied == 1
        # SIGHUP re-reads the server certificate: a broken renewal is reported, the old one
        # stays in use; a good one reaches new connections
        (tls_dir / "server.key").write_bytes((tmp_path / "op.key").read_bytes())
        problems = srv.core.reload()
        assert len(problems) == 1 and "Modbus TLS certificate" in problems[0]
        renewed, renewed_key = pki.issue_server_cert(ca_cert, ca_key, "iotserver",  # type: ignore[arg-type]
                                                     dns_names=["localhost"],
                                                     ip_addresses=["127.0.0.1"])
        pki.write_cert_pem(renewed, tls_dir / "server.pem", force=True)
        pki.write_key_pem(renewed_key, tls_dir / "server.key", force=True)
        assert srv.core.reload() == []
        again = await connectProtocol(client("eng2", "Engineer"), Raw())
        again.send(read_hr(4, 0, 2))
        assert len(await again.read(13)) == 13
        shown = peer_certificate(again.transport)
        assert shown is not None and shown.serial_number == renewed.serial_number
        await again.close()
    finally:
        await root.stopService()


@pytest_twisted.ensureDeferred
async def test_default_map_serves_the_simulated_plant(tmp_path: Path) -> None:
    from iotserver.modbus.config import DEFAULT_TOML

    text = (f'[server]\ndata_dir = "{tmp_path / "data"}"\n[simulator]\nenabled = true\n'
            + DEFAULT_TOML.replace("tcp:5020:", "tcp:0:"))
    cfg = config.parse(text)
    root, core = app.build(cfg, reactor)
    root.startService()
    try:
        await core.services["modbus"].started
        image = core.services["modbus"].server.image
        assert [b.entry.key for b in image.bindings if not b.usable] == []

        def served_speed() -> float:  # register 0: the pump's speed, float32
            raw = image.read_registers(Table.HOLDING_REGISTERS, 0, 2)
            return struct.unpack(">f", raw)[0] if isinstance(raw, bytes) else 0.0

        await wait_for(lambda: served_speed() > 0, what="a simulator step")
        c = await raw(core.services["modbus"].ports[0].getHost().port)
        c.send(read_hr(1, 0, 42))
        rsp = await c.read(9 + 84)
        speed, setpoint = struct.unpack(">ff", rsp[9:17])
        assert speed > 0 and setpoint == 1480.0
        c.send(adu(2, struct.pack(">BHH", 1, 0, 1)))  # the pump's run coil
        assert await c.read(10) == adu(2, bytes((1, 1, 1)))
        await c.close()
    finally:
        await root.stopService()
