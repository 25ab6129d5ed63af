"""The PLC poller: one pymodbus ``AsyncModbusTcpClient`` and one asyncio task per device.

Each device polls its groups of blocks (see planner) on its own loop, so a dead or slow PLC
never delays another. Failures show in the tags within one poll: a timeout marks every tag of
the device BadCommunicationError, a lost or refused connection BadNotConnected (last values
kept). We reconnect ourselves (pymodbus' own reconnect is off) with exponential backoff and
jitter, also after a connection that was accepted and then lost: the backoff starts over only
once the PLC has answered a request, so a PLC that accepts and closes at once is not hammered.
Tags are Good again on the first successful poll. An exception response marks just that
block's tags Bad. Timing uses the injected clock (``IReactorTime``; ``task.Clock`` in tests).

Only pymodbus' public API is used: each request runs as a task of its own, which the
``trace_connect`` hook cancels when the connection drops, so the request fails at once without
reaching into pymodbus' transaction manager.

The device also owns its writable tags (``modbus:<name>`` in the store): a write is encoded
(scaling, type, order), sent as FC05/FC06/FC0F/FC10 (bits in registers: FC16 mask write, or
read-modify-write), and answered with the PLC's verdict after the tag has been read back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from iotserver.clock import Clock
from iotserver.modbus.codec import Table
from iotserver.modbus.config import TABLE_SHORT, DeviceConfig, DeviceTag
from iotserver.modbus.encoding import INT_LIMITS, Kind, bit_masks, encode_value, set_bit
from iotserver.modbus.planner import Block, bad_updates, plan_blocks
from iotserver.tags.model import Quality, TagDef
from iotserver.tags.store import TagStore

__all__ = ["Device", "DeviceStats", "read_quality", "write_quality"]

log = Logger(namespace="iotserver.modbus")

_READ_QUALITY = {
    0x01: Quality.BAD_CONFIGURATION_ERROR,
    0x02: Quality.BAD_CONFIGURATION_ERROR,
    0x03: Quality.BAD_CONFIGURATION_ERROR,
    0x04: Quality.BAD_DEVICE_FAILURE,
    0x05: Quality.BAD_RESOURCE_UNAVAILABLE,
    0x06: Quality.BAD_RESOURCE_UNAVAILABLE,
    0x0A: Quality.BAD_COMMUNICATION_ERROR,
    0x0B: Quality.BAD_COMMUNICATION_ERROR,
}
_WRITE_QUALITY = {
    0x01: Quality.BAD_NOT_WRITABLE,
    0x02: Quality.BAD_NOT_WRITABLE,
    0x03: Quality.BAD_OUT_OF_RANGE,
    0x04: Quality.BAD_DEVICE_FAILURE,
    0x05: Quality.BAD_RESOURCE_UNAVAILABLE,
    0x06: Quality.BAD_RESOURCE_UNAVAILABLE,
    0x0A: Quality.BAD_COMMUNICATION_ERROR,
    0x0B: Quality.BAD_COMMUNICATION_ERROR,
}


def read_quality(code: int) -> Quality:
    """Exception response to a read -> the quality of the block's tags."""
    return _READ_QUALITY.get(code, Quality.BAD_DEVICE_FAILURE)


def write_quality(code: int) -> Quality:
    """Exception response to a write -> the write's final quality."""
    return _WRITE_QUALITY.get(code, Quality.BAD_DEVICE_FAILURE)


class _Timeout(Exception):
    pass


class _Disconnected(Exception):
    pass


@dataclass
class DeviceStats:
    """Per-device counters (console, metrics)."""

    requests: int = 0
    errors: int = 0  # exception responses
    timeouts: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    connections_lost: int = 0  # connected, then lost (also mid-request)
    polls: int = 0
    values: int = 0
    writes: int = 0
    writes_failed: int = 0
    rtt_last: float = 0.0
    rtt_max: float = 0.0
    rtt_sum: float = 0.0

    @property
    def rtt_avg(self) -> float:
        ok = self.requests - self.timeouts
        return self.rtt_sum / ok if ok > 0 else 0.0


class _Group:
    def __init__(self, name: str, interval: float, blocks: list[Block]) -> None:
        self.name = name
        self.interval = interval
        self.blocks = blocks
        self.next = 0.0


class Device:
    """One polled PLC."""

    def __init__(self, cfg: DeviceConfig, store: TagStore, *,
                 rng: random.Random | None = None, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.store = store
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        assert clock is not None
        self._clock: Clock = clock
        self.stats = DeviceStats()
        self.state = "stopped"
        self.last_error = ""
        self._rng = rng or random.Random()
        self._by_path: dict[str, DeviceTag] = {t.tag.path: t for t in cfg.tags}
        self.paths = list(self._by_path)
        self.groups: list[_Group] = []
        for g in cfg.groups:
            tags = [t for t in cfg.tags if t.group == g.name]
            if tags:
                blocks = plan_blocks(tags, max_gap=cfg.max_gap, max_registers=cfg.max_registers,
                                     max_bits=cfg.max_bits)
                self.groups.append(_Group(g.name, g.interval, blocks))
        self._single: dict[str, Block] = {}
        self._client: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False  # set by stop(): the poll loop ends
        self._wake: asyncio.Future[None] | None = None
        self._attempt = 0
        self._consecutive_timeouts = 0
        self._marked: Quality | None = None
        self._refusals: set[tuple[Any, ...]] = set()  # blocks refused, warned once each
        self._bit_write = cfg.bit_write
        self._ever_connected = False
        self._generation = 0  # of the client; a closed client's late hook calls are ignored
        self._up = False  # the link as pymodbus' trace_connect hook last reported it
        self._requests: set[asyncio.Task[Any]] = set()  # pymodbus calls in flight

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def connected(self) -> bool:
        # pymodbus 3.16's ``connected`` stays True when the peer closed before ``connect()``
        # returned (it keeps the dead transport): the trace_connect hook is the truth
        return self._client is not None and self._up and bool(self._client.connected)

    @property
    def blocks(self) -> list[Block]:
        return [b for g in self.groups for b in g.blocks]

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Register as the tags' owner and start polling (asyncio task on the reactor's loop)."""
        # pymodbus logs every timeout as an error with a frame dump; we log state changes
        # ourselves, once, with the device name.
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        self.store.register_owner(self.cfg.owner, self)
        if self._task is None:
            self._stopping = False
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop polling, close the connection, mark the tags BadOutOfService. Idempotent."""
        task, self._task = self._task, None
        # Python 3.11's asyncio.wait_for (inside pymodbus' connect) can drop a cancellation
        # that arrives as the connection completes; the loop also checks this flag.
        self._stopping = True
        self._close()
        if task is not None:
            task.cancel()
            # A request cancelled inside pymodbus can leave the task waiting on a future that
            # nothing resolves; do not let that hold up shutdown.
            await asyncio.wait([task], timeout=1.0)
            if not task.done():
                log.warn("modbus {dev}: poll task did not stop within 1 s", dev=self.name)
        self.store.unregister_owner(self.cfg.owner)
        if self.state != "stopped":
            self._mark(Quality.BAD_OUT_OF_SERVICE)
        self.state = "stopped"

    def reconnect(self) -> None:
        """Drop the connection and reconnect now (backoff reset), e.g. from the console."""
        log.info("modbus {dev}: reconnect requested", dev=self.name)
        self._close()
        self._attempt = 0
        self._wakeup()

    # -- the loop ---------------------------------------------------------------------------
    async def _sleep(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._wake = fut
        handle: Any = self._clock.callLater(max(seconds, 0.0), self._wakeup)
        try:
            await fut
        finally:
            if handle.active():
                handle.cancel()
            self._wake = None

    def _wakeup(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _backoff(self) -> float:
        b = self.cfg.backoff
        delay = min(b.max, b.initial * (2 ** min(self._attempt, 30)))
        self._attempt += 1
        return max(0.0, float(delay * (1 + self._rng.uniform(-b.jitter, b.jitter))))

    async def _run(self) -> None:
        clock = self._clock
        self.state = "connecting"
        while not self._stopping:
            try:
                if not self.connected and not await self._connect():
                    self._mark(Quality.BAD_NOT_CONNECTED)
                    self.state = "backoff"
                    await self._sleep(self._backoff())
                    continue
                now = clock.seconds()
                for g in self.groups:
                    if g.next <= now and self.connected:
                        await self._poll(g)
                        g.next = max(g.next + g.interval, now)
                if not self.connected:
                    # lost (or dropped after timeouts): back off before connecting again
                    self.state = "backoff"
                    await self._sleep(self._backoff())
                    continue
                if self.groups:
                    await self._sleep(min(g.next for g in self.groups) - clock.seconds())
                else:
                    await self._sleep(3600)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.failure("modbus {dev}: poll loop error", dev=self.name)
                self._close()
                await self._sleep(self._backoff())

    async def _connect(self) -> bool:
        from pymodbus.client import AsyncModbusTcpClient

        self._close()
        self.state = "connecting"
        self._generation += 1
        generation = self._generation
        self._up = False
        client = AsyncModbusTcpClient(
            self.cfg.host, port=self.cfg.port, timeout=self.cfg.timeout,
            retries=self.cfg.retries, reconnect_delay=0,
            trace_connect=lambda up: self._on_connection_change(up, generation),
        )
        # Our own timeout handling decides when to give up on a connection.
        client.set_max_no_responses(1_000_000)
        self._client = client
        try:
            ok = await client.connect()
        except Exception as exc:  # pymodbus raises a variety on odd hosts
            ok = False
            self.last_error = str(exc)
        if ok and client.connected and not self._up:  # accepted, and closed at once
            self.stats.connections_lost += 1
            self._failed(Quality.BAD_NOT_CONNECTED, "connection lost", [])
            self._close()
            return False
        if not ok or not client.connected:
            self.stats.connect_failures += 1
            if self._attempt == 0 or self._attempt % 10 == 0:
                log.warn("modbus {dev}: cannot connect to {host}:{port}", dev=self.name,
                         host=self.cfg.host, port=self.cfg.port)
            self.last_error = self.last_error or "connection failed"
            self._close()
            return False
        if self._ever_connected:
            self.stats.reconnects += 1
        self._ever_connected = True
        # the backoff starts over once the PLC has answered (_poll), not on connect: a PLC
        # that accepts and closes at once would otherwise be reconnected every poll
        self._consecutive_timeouts = 0
        self.state = "connected"
        self.last_error = ""
        log.info("modbus {dev}: connected to {host}:{port}", dev=self.name, host=self.cfg.host,
                 port=self.cfg.port)
        return True

    def _on_connection_change(self, connected: bool, generation: int) -> None:
        """pymodbus trace hook: fail the requests in flight at once when the connection drops
        (their tasks are cancelled; :meth:`_request` turns that into _Disconnected)."""
        if generation != self._generation:
            return
        self._up = connected
        if not connected:
            self._fail_requests()

    def _fail_requests(self) -> None:
        for request in list(self._requests):
            request.cancel()  # its caller (_request) raises _Disconnected

    def _close(self) -> None:
        client, self._client = self._client, None
        self._up = False
        if client is not None:
            # pymodbus does not report a connection we close ourselves: fail what waits on it
            self._fail_requests()
            with contextlib.suppress(Exception):  # closing must not fail the caller
                client.close()

    # -- requests -------------------------------------------------------------------------
    async def _request(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """One request; raises _Timeout or _Disconnected; counts and times it."""
        client = self._client
        if client is None or not client.connected:
            raise _Disconnected("not connected")
        from pymodbus.exceptions import ConnectionException, ModbusIOException

        self.stats.requests += 1
        clock = self._clock
        t0 = clock.seconds()
        task = asyncio.current_task()
        assert task is not None
        # the pymodbus call in a task of its own, which a lost connection cancels
        request = asyncio.ensure_future(getattr(client, call)(*args, **kwargs))
        request.add_done_callback(_retrieved)
        self._requests.add(request)
        try:
            rr = await request
        except asyncio.CancelledError:
            if task.cancelling():  # we are cancelled ourselves (stop()): pass it on
                raise
            raise _Disconnected("connection lost") from None  # only the request was
        except ConnectionException as exc:
            raise _Disconnected(str(exc)) from None
        except (TimeoutError, ModbusIOException) as exc:
            if client.connected:
                self.stats.timeouts += 1
                raise _Timeout(str(exc)) from None
            raise _Disconnected(str(exc)) from None
        finally:
            self._requests.discard(request)
        rtt = clock.seconds() - t0
        st = self.stats
        st.rtt_last = rtt
        st.rtt_sum += rtt
        if rtt > st.rtt_max:
            st.rtt_max = rtt
        if rr.isError():
            st.errors += 1
        return rr

    async def _read(self, block: Block) -> Any:
        kw = {"count": block.count, "device_id": block.unit}
        call = {
            Table.COILS: "read_coils",
            Table.DISCRETE_INPUTS: "read_discrete_inputs",
            Table.HOLDING_REGISTERS: "read_holding_registers",
            Table.INPUT_REGISTERS: "read_input_registers",
        }[block.table]
        return await self._request(call, block.address, **kw)

    @staticmethod
    def _array(block: Block, rr: Any) -> np.ndarray[Any, Any]:
        if block.bits:
            return np.array(rr.bits[: block.count], dtype=np.bool_)
        return np.array(rr.registers, dtype=np.uint16)

    async def _poll(self, group: _Group) -> None:
        """Read every block of the group; one store.apply for the whole poll."""
        updates: list[tuple[Any, ...]] = []
        self.stats.polls += 1
        now = self.store.now_ns()
        for block in list(group.blocks):
            try:
                rr = await self._read(block)
            except _Timeout:
                self._failed(Quality.BAD_COMMUNICATION_ERROR, "timeout", updates)
                self._consecutive_timeouts += 1
                if self._consecutive_timeouts >= 2:
                    self._close()
                return
            except _Disconnected:
                self.stats.connections_lost += 1
                self._failed(Quality.BAD_NOT_CONNECTED, "connection lost", updates)
                self._close()
                return
            self._consecutive_timeouts = 0
            self._attempt = 0  # the PLC answers: the next reconnect waits `initial` again
            if rr.isError():
                code = int(rr.exception_code)
                if code == 0x02 and block.has_gaps:
                    # MB AP 6.3: the device refuses the unused addresses we spanned
                    log.warn("modbus {dev}: {table} {a}+{n} refused (02); reading it in "
                             "gap-free blocks", dev=self.name, table=block.table.value,
                             a=block.address, n=block.count)
                    i = group.blocks.index(block)
                    group.blocks[i:i + 1] = block.split()
                else:
                    self._refused(block, code)
                paths = block.paths
                updates += bad_updates(paths, self._last(paths), read_quality(code), now)
                continue
            try:
                updates += block.decode(self._array(block, rr), now)
            except ValueError as exc:  # short answer
                log.warn("modbus {dev}: bad answer for {table} {a}: {exc}", dev=self.name,
                         table=block.table.value, a=block.address, exc=str(exc))
                paths = block.paths
                updates += bad_updates(paths, self._last(paths), Quality.BAD_COMMUNICATION_ERROR,
                                       now)
        self._marked = None
        self.stats.values += len(updates)
        self.store.apply(updates)  # type: ignore[arg-type]

    def _refused(self, block: Block, code: int) -> None:
        """Warn once per block and exception code: a wrong address in the configuration (02)
        otherwise shows only as the tags' Bad quality."""
        key = (block.unit, block.table, block.address, block.count, code)
        if key in self._refusals:
            return
        self._refusals.add(key)
        table = TABLE_SHORT[block.table]  # as the configuration spells it
        where = ", ".join(f"{t.tag.path} at {table} {t.address}" for t in block.tags)
        log.warn("modbus {dev}: unit {unit} refused reading {table} {a}+{n} with exception "
                 "{code:02X}{hint}; tags {where} are {q}", dev=self.name, unit=block.unit,
                 table=table, a=block.address, n=block.count, code=code,
                 hint=" (illegal data address: check the tags' addresses)" if code == 2 else "",
                 where=where, q=read_quality(code).text)

    def _failed(self, quality: Quality, why: str, updates: list[tuple[Any, ...]]) -> None:
        if self.last_error != why:
            log.warn("modbus {dev}: {why}; tags {q}", dev=self.name, why=why, q=quality.text)
        self.last_error = why
        if updates:
            self.store.apply(updates)  # type: ignore[arg-type]
        self._mark(quality)

    def _last(self, paths: list[str]) -> list[Any]:
        read = self.store.read
        return [read(p).value for p in paths]

    def _mark(self, quality: Quality) -> None:
        """All tags of the device Bad with ``quality``, keeping their last values (once)."""
        if self._marked is quality:
            return
        self._marked = quality
        paths = [p for p in self.paths if p in self.store]
        self.store.apply(bad_updates(paths, self._last(paths), quality))  # type: ignore[arg-type]

    # -- writes (TagOwner) ------------------------------------------------------------------
    def write_tag(self, tag: TagDef, value: Any) -> Deferred[Quality]:
        dtag = self._by_path.get(tag.path)
        if dtag is None:
            return Deferred.fromFuture(_done(Quality.BAD_NODE_ID_UNKNOWN))
        # shielded: the store's write timeout cancels its Deferred, but a request cancelled
        # half-way inside pymodbus could wedge the connection; the write finishes on its own.
        return Deferred.fromFuture(asyncio.ensure_future(
            asyncio.shield(asyncio.ensure_future(self._write(dtag, value)))))

    async def _write(self, t: DeviceTag, value: Any) -> Quality:
        self.stats.writes += 1
        quality = await self._write_inner(t, value)
        if quality.is_bad:
            self.stats.writes_failed += 1
        return quality

    async def _write_inner(self, t: DeviceTag, value: Any) -> Quality:
        try:
            regs = self._encode(t, value)
        except (ValueError, TypeError, OverflowError):
            return Quality.BAD_OUT_OF_RANGE
        if not self.connected:
            return Quality.BAD_NOT_CONNECTED
        unit = t.unit
        try:
            if t.table is Table.COILS:
                if self.cfg.single_writes:
                    rr = await self._request("write_coil", t.address, bool(value), device_id=unit)
                else:
                    rr = await self._request("write_coils", t.address, [bool(value)],
                                             device_id=unit)
            elif t.mtype.kind is Kind.BIT:
                rr = await self._write_bit(t, bool(value))
            elif len(regs) == 1 and self.cfg.single_writes:
                rr = await self._request("write_register", t.address, int(regs[0]),
                                         device_id=unit)
            else:
                rr = await self._request("write_registers", t.address,
                                         [int(r) for r in regs], device_id=unit)
        except _Timeout:
            return Quality.BAD_TIMEOUT
        except _Disconnected:
            return Quality.BAD_NOT_CONNECTED
        if rr.isError():
            return write_quality(int(rr.exception_code))
        await self._reread(t)
        return Quality.GOOD

    async def _write_bit(self, t: DeviceTag, value: bool) -> Any:
        if self._bit_write == "mask":
            and_mask, or_mask = bit_masks(t.mtype, t.order, value)
            rr = await self._request("mask_write_register", address=t.address,
                                     and_mask=and_mask, or_mask=or_mask, device_id=t.unit)
            if not (rr.isError() and int(rr.exception_code) == 0x01):
                return rr
            log.info("modbus {dev}: no FC16 mask write; using read-modify-write", dev=self.name)
            self._bit_write = "rmw"
        # read-modify-write: another writer between the two requests would be overwritten
        rr = await self._request("read_holding_registers", t.address, count=1, device_id=t.unit)
        if rr.isError():
            return rr
        new = set_bit(int(rr.registers[0]), t.mtype, t.order, value)
        return await self._request("write_register", t.address, new, device_id=t.unit)

    @staticmethod
    def _encode(t: DeviceTag, value: Any) -> list[int]:
        """Engineering value -> registers; out of the register type's range raises ValueError."""
        kind = t.mtype.kind
        if t.table is Table.COILS or kind in (Kind.BOOL, Kind.BIT):
            return [1 if value else 0]
        raw = value
        scaling = t.tag.scaling
        if scaling is not None:
            raw = scaling.to_raw(float(value))
        limits = INT_LIMITS.get(kind)
        if limits is not None:
            raw = round(raw)
            if not limits[0] <= raw <= limits[1]:
                raise ValueError(f"{raw} outside {kind.value}")
        return [int(r) for r in encode_value(t.mtype, t.order, raw)]

    async def _reread(self, t: DeviceTag) -> None:
        """Read a written tag back so the store shows what the PLC now holds."""
        block = self._single.get(t.tag.path)
        if block is None:
            block = plan_blocks([t])[0]
            self._single[t.tag.path] = block
        try:
            rr = await self._read(block)
        except (_Timeout, _Disconnected):
            return
        if not rr.isError():
            self.store.apply(block.decode(self._array(block, rr), self.store.now_ns()))  # type: ignore[arg-type]


def _retrieved(request: asyncio.Task[Any]) -> None:
    """Mark a request's outcome seen: one finished while its caller was being stopped
    must not be logged as "exception was never retrieved"."""
    if not request.cancelled():
        request.exception()


def _done(value: Any) -> asyncio.Future[Any]:
    fut: asyncio.Future[Any] = asyncio.get_event_loop().create_future()
    fut.set_result(value)
    return fut
