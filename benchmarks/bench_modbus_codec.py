"""Modbus codec and register decoding rates, against pymodbus 3.16 measured in the same run.

Run: ``python benchmarks/bench_modbus_codec.py``. Rows:

- parse FC03 x1000/feed: ``FrameDecoder.feed`` on 1000 pipelined "read 10 holding registers"
  requests + ``parse_request`` on each; pymodbus: ``FramerSocket.handleFrame`` per frame (its
  framer + PDU decoder, as its server uses them).
- parse FC03 1/feed: one request per ``feed`` (one TCP segment per request, the common case).
- parse FC10 x1000/feed: "write 100 registers" requests.
- encode read 125: ``encode_read_registers_response`` of 125 registers sliced out of a
  preencoded big-endian image; pymodbus: build ``ReadHoldingRegistersResponse`` + ``buildFrame``.
- encode read 10: the same with 10 registers.
- encode exception: ``encode_exception``; pymodbus: ``ExceptionResponse`` + ``buildFrame``.
- float32 decode 62/block: ``BatchDecoder`` over one 125-register block (62 floats, CDAB) per
  call, as the poller does per read; pymodbus: one ``convert_from_registers`` over the block
  (it returns the list of 62 values) with ``word_order="little"``.
- float32 decode 10k: 10,000 tags at scattered offsets in a 20,000-register image, one call;
  pymodbus: ``convert_from_registers`` on each tag's 2 registers.

Best of several repeats; rates in operations (frames, responses or values) per second;
ratio = ours / pymodbus.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from iotserver.modbus.codec import (
    FrameDecoder,
    encode_exception,
    encode_read_registers_response,
    parse_request,
)
from iotserver.modbus.encoding import (
    FLOAT32,
    BatchDecoder,
    Order,
    encode_batch,
    to_wire_bytes,
)

REPEATS = 7


def _best(step: Callable[[], object], ops: int) -> float:
    """Operations per second, best of REPEATS."""
    step()
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return ops / best


def _adu(tid: int, pdu: bytes) -> bytes:
    return tid.to_bytes(2, "big") + b"\x00\x00" + (len(pdu) + 1).to_bytes(2, "big") + b"\x01" + pdu


FC03 = bytes.fromhex("03 0064 000A")
FC10 = bytes.fromhex("10 0000 0064 C8") + bytes(range(200))
N = 1000


def _ours() -> dict[str, float]:
    rates: dict[str, float] = {}
    read_stream = b"".join(_adu(i, FC03) for i in range(N))
    write_stream = b"".join(_adu(i, FC10) for i in range(N))
    one = _adu(1, FC03)

    def parse_many(stream: bytes) -> Callable[[], None]:
        def run() -> None:
            for f in FrameDecoder().feed(stream):
                parse_request(f.pdu)

        return run

    def parse_each() -> None:
        feed = FrameDecoder().feed
        for _ in range(N):
            for f in feed(one):
                parse_request(f.pdu)

    rates["parse FC03 x1000/feed"] = _best(parse_many(read_stream), N)
    rates["parse FC03 1/feed"] = _best(parse_each, N)
    rates["parse FC10 x1000/feed"] = _best(parse_many(write_stream), N)

    image = memoryview(to_wire_bytes(np.arange(10_000, dtype=np.uint16)))

    def encode(count: int) -> Callable[[], None]:
        def run() -> None:
            for i in range(N):
                a = 2 * (i % 1000)
                encode_read_registers_response(i, 1, 3, image[a : a + 2 * count])

        return run

    def encode_exc() -> None:
        for i in range(N):
            encode_exception(i, 1, 3, 2)

    rates["encode read 125"] = _best(encode(125), N)
    rates["encode read 10"] = _best(encode(10), N)
    rates["encode exception"] = _best(encode_exc, N)

    rng = np.random.default_rng(1)
    block = encode_batch(FLOAT32, Order.CDAB, rng.normal(size=62)).reshape(-1)
    block = np.concatenate([block, [0]]).astype(np.uint16)
    dec62 = BatchDecoder(FLOAT32, Order.CDAB, np.arange(62) * 2)
    blocks = 200

    def decode62() -> None:
        for _ in range(blocks):
            dec62(block)

    rates["float32 decode 62/block"] = _best(decode62, 62 * blocks)

    big = rng.integers(0, 0x10000, size=20_000, dtype=np.uint16)
    offsets = rng.choice(np.arange(0, 19_998), size=10_000, replace=False)
    dec10k = BatchDecoder(FLOAT32, Order.CDAB, offsets)
    rates["float32 decode 10k"] = _best(lambda: dec10k(big), 10_000)
    return rates


def _pymodbus() -> dict[str, float]:
    from pymodbus.client.mixin import ModbusClientMixin
    from pymodbus.framer import FramerSocket
    from pymodbus.pdu import DecodePDU
    from pymodbus.pdu import ExceptionResponse as PmException
    from pymodbus.pdu.register_message import ReadHoldingRegistersResponse

    rates: dict[str, float] = {}
    framer = FramerSocket(DecodePDU(True))
    read_frames = [_adu(i, FC03) for i in range(N)]
    write_frames = [_adu(i, FC10) for i in range(N)]

    def parse(frames: list[bytes]) -> Callable[[], None]:
        def run() -> None:
            handle = framer.handleFrame
            for f in frames:
                handle(f, 0, 0)

        return run

    rates["parse FC03 x1000/feed"] = _best(parse(read_frames), N)
    rates["parse FC03 1/feed"] = rates["parse FC03 x1000/feed"]
    rates["parse FC10 x1000/feed"] = _best(parse(write_frames), N)

    values = list(range(10_000))

    def encode(count: int) -> Callable[[], None]:
        def run() -> None:
            for i in range(N):
                a = i % 1000
                msg = ReadHoldingRegistersResponse(
                    registers=values[a : a + count], dev_id=1, transaction_id=i
                )
                framer.buildFrame(msg)

        return run

    def encode_exc() -> None:
        for i in range(N):
            framer.buildFrame(PmException(3, 2, device_id=1, transaction=i))

    rates["encode read 125"] = _best(encode(125), N)
    rates["encode read 10"] = _best(encode(10), N)
    rates["encode exception"] = _best(encode_exc, N)

    rng = np.random.default_rng(1)
    block = encode_batch(FLOAT32, Order.CDAB, rng.normal(size=62)).reshape(-1).tolist()
    conv = ModbusClientMixin.convert_from_registers
    f32 = ModbusClientMixin.DATATYPE.FLOAT32
    blocks = 20

    def decode62() -> None:
        for _ in range(blocks):
            # pymodbus' "little" reverses ALL registers, i.e. also the order of the values;
            # the cost is what matters here
            conv(block, f32, word_order="little")

    rates["float32 decode 62/block"] = _best(decode62, 62 * blocks)

    big = rng.integers(0, 0x10000, size=20_000, dtype=np.uint16).tolist()
    offsets = rng.choice(np.arange(0, 19_998), size=10_000, replace=False).tolist()

    def decode10k() -> None:
        for o in offsets:
            conv(big[o : o + 2], f32, word_order="little")

    rates["float32 decode 10k"] = _best(decode10k, 10_000)
    return rates


def main() -> None:
    import argparse

    global REPEATS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="a short run: 2 repeats instead of 7")
    if ap.parse_args().quick:
        REPEATS = 2
    ours = _ours()
    peer = _pymodbus()
    print("Modbus TCP server codec and float32 register decoding; operations/s")
    print(f"{'operation':<24} {'ours':>14} {'pymodbus':>12} {'ratio':>7}")
    for name, rate in ours.items():
        p = peer.get(name)
        p_s = f"{p:12,.0f}" if p else f"{'-':>12}"
        r_s = f"{rate / p:7.1f}" if p else f"{'-':>7}"
        print(f"{name:<24} {rate:14,.0f} {p_s} {r_s}")


if __name__ == "__main__":
    main()
