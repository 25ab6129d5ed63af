"""Load generator for broker benchmarks: raw-socket MQTT 3.1.1 publishers and subscribers.

One process per client (``multiprocessing``, fork), blocking sockets with TCP_NODELAY, a minimal
hand-rolled MQTT 3.1.1 client (paho is far too slow to load a broker). The hot paths build and
parse frames with ``struct`` on whole socket reads; PUBACKs of a read are sent in one write.

Payload (64 bytes, little-endian): uint16 publisher index, uint64 sequence number, int64
``time.monotonic_ns()`` at send (CLOCK_MONOTONIC is system-wide, so latency is comparable across
processes), zero padding.

Flow control ("windowing"): subscribers publish how many messages they have received from each
publisher in a shared array; publisher i never has more than ``window`` messages that some
subscriber has not received yet. The broker's queues stay bounded, so a saturation run measures
throughput without overrunning anybody's limits (no loss is expected, and losses are counted).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

PAYLOAD = struct.Struct("<HQq")
PAYLOAD_SIZE = 64
PAD = b"\x00" * (PAYLOAD_SIZE - PAYLOAD.size)
PUBACK_FRAME = struct.Struct(">BBH")  # 0x40 0x02 packet id


# --------------------------------------------------------------------------- wire helpers


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n % 128
        n //= 128
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">H", len(raw)) + raw


def connect_frame(client_id: str, keepalive: int = 0) -> bytes:
    body = _utf8("MQTT") + bytes([4, 0x02]) + struct.pack(">H", keepalive) + _utf8(client_id)
    return b"\x10" + _varint(len(body)) + body


def subscribe_frame(packet_id: int, topic_filter: str, qos: int) -> bytes:
    body = struct.pack(">H", packet_id) + _utf8(topic_filter) + bytes([qos])
    return b"\x82" + _varint(len(body)) + body


def publish_prefix(topic: str, qos: int) -> bytes:
    """Fixed header + topic of a PUBLISH with a 64-byte payload (packet id follows for QoS 1)."""
    topic_raw = _utf8(topic)
    remaining = len(topic_raw) + (2 if qos else 0) + PAYLOAD_SIZE
    return bytes([0x30 | (qos << 1)]) + _varint(remaining) + topic_raw


DISCONNECT = b"\xe0\x00"


def read_packet(sock: socket.socket, buf: bytearray) -> tuple[int, bytes]:
    """Blocking read of one whole packet (setup only): (first byte, body)."""
    while True:
        if len(buf) >= 2:
            mult, value, i = 1, 0, 1
            while i < len(buf):
                b = buf[i]
                value += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    break
            else:
                i = -1
            if i > 0 and len(buf) >= i + value:
                first, body = buf[0], bytes(buf[i : i + value])
                del buf[: i + value]
                return first, body
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("broker closed the connection")
        buf += data


def open_client(
    port: int, client_id: str, timeout: float = 10.0
) -> tuple[socket.socket, bytearray]:
    """Connect, CONNECT, and wait for a successful CONNACK."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.sendall(connect_frame(client_id))
    buf = bytearray()
    first, body = read_packet(sock, buf)
    if first != 0x20 or len(body) < 2 or body[1] != 0:
        raise ConnectionError(f"CONNACK refused: {first:#x} {body!r}")
    return sock, buf


def probe(port: int, timeout: float = 1.0) -> bool:
    """True when a broker answers CONNECT with a successful CONNACK."""
    try:
        sock, _ = open_client(port, f"probe-{os.getpid()}-{time.monotonic_ns()}", timeout)
    except OSError:
        return False
    try:
        sock.sendall(DISCONNECT)
    finally:
        sock.close()
    return True


# --------------------------------------------------------------------------- scenario


@dataclass
class Scenario:
    name: str
    qos: int
    pubs: int
    subs: int
    seconds: float
    rate: float = 0.0  # total publishes per second; 0 = saturation (windowed)
    window: int = 1000  # per publisher, messages not yet received by every subscriber
    batch: int = 50  # messages per socket write at saturation
    drain: float = 5.0  # seconds subscribers wait for stragglers after publishers stop
    tag: str = field(default_factory=lambda: f"{os.getpid()}-{time.monotonic_ns() % 10**9}")


@dataclass
class Shared:
    """Counters in shared memory (8-byte aligned writes are atomic on the platforms we run on)."""

    received: Any  # RawArray('q', subs * pubs): highest sequence sub s saw from pub p
    sent: Any  # RawArray('q', pubs): final count per publisher, -1 while running
    start: Any  # RawValue('d'): monotonic time when publishers start


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _min_received(shared: Shared, p: int, pubs: int, subs: int) -> int:
    rec = shared.received
    return int(min(rec[s * pubs + p] for s in range(subs)))


def publisher(sc: Scenario, port: int, index: int, shared: Shared, barrier: Any,
              results: Any) -> None:
    """Publish on ``bench/<tag>/<index>`` until the scenario's time is up."""
    out: dict[str, Any] = {"role": "pub", "index": index}
    try:
        sock, _ = open_client(port, f"bench-pub{index}-{sc.tag}")
        barrier.wait(30)
        prefix = publish_prefix(f"bench/{sc.tag}/{index}", sc.qos)
        pack = PAYLOAD.pack
        qos1 = sc.qos == 1
        seq = 0
        acked = 0
        acks = bytearray()
        now_ns = time.monotonic_ns
        sock.setblocking(False)

        def drain_acks() -> None:
            nonlocal acked
            while True:
                try:
                    data = sock.recv(1 << 16)
                except BlockingIOError:
                    break
                if not data:
                    raise ConnectionError("broker closed the connection")
                acks.extend(data)
            n = len(acks) // 4  # only PUBACKs (4 bytes) arrive on a publisher connection
            if n:
                acked += n
                del acks[: n * 4]

        def send(data: bytes) -> None:
            view = memoryview(data)
            while view:
                try:
                    sent = sock.send(view)
                    view = view[sent:]
                except BlockingIOError:
                    if qos1:
                        drain_acks()
                    time.sleep(0.0001)

        start = time.monotonic()
        if index == 0:
            shared.start.value = start
        deadline = start + sc.seconds
        if sc.rate > 0:
            interval = sc.pubs / sc.rate  # this publisher's share of the total rate
            nxt = start + (index / sc.pubs) * interval  # staggered
            while True:
                now = time.monotonic()
                if now >= deadline:
                    break
                if now < nxt:
                    time.sleep(nxt - now)
                seq += 1
                pid = b"" if not qos1 else struct.pack(">H", seq % 65535 + 1)
                send(prefix + pid + pack(index, seq, now_ns()) + PAD)
                nxt += interval
                if qos1:
                    drain_acks()
        else:
            pubs, subs, window, batch = sc.pubs, sc.subs, sc.window, sc.batch
            while time.monotonic() < deadline:
                room = window - (seq - _min_received(shared, index, pubs, subs))
                if qos1:
                    drain_acks()
                    room = min(room, window - (seq - acked))
                if room <= 0:
                    time.sleep(0.0002)
                    continue
                k = min(room, batch)
                ts = now_ns()
                parts = []
                for s in range(seq + 1, seq + k + 1):
                    if qos1:
                        parts.append(prefix + struct.pack(">H", s % 65535 + 1)
                                     + pack(index, s, ts) + PAD)
                    else:
                        parts.append(prefix + pack(index, s, ts) + PAD)
                send(b"".join(parts))
                seq += k
        shared.sent[index] = seq
        if qos1:  # every PUBACK before DISCONNECT (bounded)
            until = time.monotonic() + sc.drain
            while acked < seq and time.monotonic() < until:
                drain_acks()
                time.sleep(0.001)
            out["unacked"] = seq - acked
        sock.setblocking(True)
        sock.sendall(DISCONNECT)
        sock.close()
        out.update(sent=seq, elapsed=time.monotonic() - start)
    except Exception as exc:  # reported to the parent, which prints it
        out["error"] = f"{type(exc).__name__}: {exc}"
        if shared.sent[index] < 0:
            shared.sent[index] = 0
        with contextlib.suppress(Exception):
            barrier.abort()
    out["cpu"] = _cpu()
    results.put(out)


COALESCE_BYTES = 16384
COALESCE_SLEEP = 0.0003


QUICKACK = os.environ.get("BENCH_QUICKACK", "1") == "1"


def _recv_more(sock: socket.socket) -> bytes:
    """Whatever is readable right now (the socket is non-blocking)."""
    try:
        return sock.recv(1 << 20)
    except (BlockingIOError, InterruptedError):
        return b""


def _send_all(sock: socket.socket, data: bytes) -> None:
    """sendall for a non-blocking socket (PUBACKs; the kernel buffer is rarely full)."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            select.select([], [sock], [], 1.0)


def subscriber(sc: Scenario, port: int, index: int, shared: Shared, barrier: Any,
               results: Any) -> None:
    """Receive everything on ``bench/<tag>/+``; count gaps, duplicates and latency."""
    out: dict[str, Any] = {"role": "sub", "index": index}
    pubs = sc.pubs
    counts = [0] * pubs
    expected = [1] * pubs  # next sequence number per publisher
    gaps = dups = 0
    lat: list[int] = []
    keep_latency = sc.rate > 0
    last_rx = 0.0
    try:
        sock, buf = open_client(port, f"bench-sub{index}-{sc.tag}")
        sock.sendall(subscribe_frame(1, f"bench/{sc.tag}/+", sc.qos))
        first, body = read_packet(sock, buf)
        if first != 0x90 or body[-1] & 0x80:
            raise ConnectionError(f"SUBACK refused: {body!r}")
        barrier.wait(30)
        sock.setblocking(False)
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        quickack = getattr(socket, "TCP_QUICKACK", None)
        unpack = PAYLOAD.unpack_from
        received_arr = shared.received
        base = index * pubs
        hard_deadline = time.monotonic() + sc.seconds + sc.drain + 10
        idle_since = time.monotonic()
        while True:
            data = None
            if poller.poll(200):
                data = sock.recv(1 << 20)
                if quickack is not None and QUICKACK:
                    # ACK at once: a delayed ACK would hold back a Nagle-ing broker's next write
                    sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
            now = time.monotonic()
            if data is None or not data:
                if data is not None:
                    raise ConnectionError("broker closed the connection")
                sent = list(shared.sent)
                done = min(sent) >= 0 and sum(counts) >= sum(sent)
                if done or (min(sent) >= 0 and now - idle_since > sc.drain):
                    break
                if now > hard_deadline:
                    break
                continue
            idle_since = now
            rx_ns = time.monotonic_ns()
            if not keep_latency and len(data) < COALESCE_BYTES:
                # saturation only: let a few more packets arrive so that one read carries many
                # (a broker writing one TCP segment per message would otherwise make the
                # generator, not the broker, the bottleneck); latency runs never wait
                time.sleep(COALESCE_SLEEP)
                data += _recv_more(sock)
            buf += data
            pos = 0
            n = len(buf)
            acks = []
            while n - pos >= 2:
                b0 = buf[pos]
                rl = buf[pos + 1]
                hl = 2
                if rl & 0x80:  # multi-byte remaining length (not for our 64-byte payloads)
                    rl &= 0x7F
                    mult = 128
                    while True:
                        if pos + hl >= n:
                            rl = -1
                            break
                        b = buf[pos + hl]
                        rl += (b & 0x7F) * mult
                        mult *= 128
                        hl += 1
                        if not b & 0x80:
                            break
                    if rl < 0:
                        break
                end = pos + hl + rl
                if end > n:
                    break
                if b0 & 0xF0 == 0x30:
                    p = pos + hl
                    p += 2 + ((buf[p] << 8) | buf[p + 1])
                    if b0 & 0x06:
                        acks.append(b"\x40\x02" + buf[p : p + 2])
                        p += 2
                    pub, seq, ts = unpack(buf, p)
                    if pub < pubs:
                        exp = expected[pub]
                        if seq == exp:
                            expected[pub] = exp + 1
                            counts[pub] += 1
                        elif seq > exp:
                            gaps += seq - exp
                            expected[pub] = seq + 1
                            counts[pub] += 1
                        else:
                            dups += 1
                        if keep_latency:
                            lat.append(rx_ns - ts)
                pos = end
            del buf[:pos]
            if acks:
                _send_all(sock, b"".join(acks))
            for p_i in range(pubs):  # progress = highest sequence seen (loss must not stall)
                received_arr[base + p_i] = expected[p_i] - 1
            last_rx = now
        sock.setblocking(True)
        sock.settimeout(5)
        sock.sendall(DISCONNECT)
        sock.close()
        sent = list(shared.sent)
        out.update(
            received=sum(counts), expected=sum(max(s, 0) for s in sent), gaps=gaps, dups=dups,
            lost=sum(max(s, 0) - c for s, c in zip(sent, counts, strict=True)), last_rx=last_rx,
        )
        if keep_latency:
            import array

            out["latency"] = array.array("q", lat).tobytes()
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(Exception):
            barrier.abort()
    out["cpu"] = _cpu()
    results.put(out)
