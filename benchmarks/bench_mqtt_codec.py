"""MQTT codec rate for 64-byte-payload PUBLISH packets, against paho-mqtt measured in the same run.

Run: ``python benchmarks/bench_mqtt_codec.py``. Rows:

- decode: ``Decoder.feed`` on a buffer of 1000 back-to-back PUBLISH packets (framing + fields +
  frozen dataclass); paho: ``paho.mqtt._packet.decode_publish`` on each body alone (no framing,
  paho's own reader does that byte by byte from the socket, so paho is flattered here).
- decode 1/feed: one packet per ``feed`` call (the worst case for a per-call overhead).
- encode: ``encode_publish``; paho: ``Client._send_publish`` with the socket write stubbed out.
- fan-out: ``with_packet_id`` on a pre-encoded QoS 1 PUBLISH (per-subscriber cost in the broker).

Best of several interleaved repeats, in packets per second; ratio = ours / paho.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from iotserver.mqtt.codec import (
    Decoder,
    encode_publish,
    encode_publish_with_offset,
    with_packet_id,
)

N = 1000
REPEATS = 7
TOPIC = "plant/Line1/Press/Temperature"
PAYLOAD = bytes(range(64))


def _best(step: Callable[[], None], packets: int) -> float:
    """Packets per second, best of REPEATS."""
    step()
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return packets / best


def _ours(version: int, qos: int) -> dict[str, float]:
    pid = 1 if qos else None
    one = encode_publish(TOPIC, PAYLOAD, qos, packet_id=pid, version=version)
    stream = one * N
    rates: dict[str, float] = {}

    def decode() -> None:
        Decoder(version=version).feed(stream)

    def decode_each() -> None:
        feed = Decoder(version=version).feed
        for _ in range(N):
            feed(one)

    def encode() -> None:
        for _ in range(N):
            encode_publish(TOPIC, PAYLOAD, qos, False, False, pid, None, version)

    rates["decode"] = _best(decode, N)
    rates["decode 1/feed"] = _best(decode_each, N)
    rates["encode"] = _best(encode, N)
    if qos:
        template, offset = encode_publish_with_offset(TOPIC, PAYLOAD, qos, packet_id=1,
                                                      version=version)

        def fan_out() -> None:
            for i in range(1, N + 1):
                with_packet_id(template, offset, i)

        rates["fan-out"] = _best(fan_out, N)
    return rates


def _paho(version: int, qos: int) -> dict[str, float]:
    import paho.mqtt.client as mqtt
    from paho.mqtt import _packet

    proto = mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311
    pid = 1 if qos else None
    one = encode_publish(TOPIC, PAYLOAD, qos, packet_id=pid, version=version)
    header, body = one[0], one[2:]  # one-byte remaining length for this size
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
                         protocol=proto)
    client._sock = object()  # type: ignore[assignment]  # _send_publish only checks for None
    client._packet_queue = lambda *a, **k: 0  # type: ignore[method-assign,assignment]
    topic_b = TOPIC.encode()

    def decode() -> None:
        for _ in range(N):
            _packet.decode_publish(header, body, proto)

    def encode() -> None:
        for _ in range(N):
            client._send_publish(1, topic_b, PAYLOAD, qos, False, False)

    rates = {"decode": _best(decode, N), "encode": _best(encode, N)}
    client._sock = None
    return rates


def main() -> None:
    import argparse

    global REPEATS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="a short run: 2 repeats instead of 7")
    if ap.parse_args().quick:
        REPEATS = 2
    print(f"PUBLISH, topic {len(TOPIC)} chars, payload {len(PAYLOAD)} bytes; packets/s")
    print(f"{'version':>7} {'qos':>3} {'operation':<14} {'ours':>12} {'paho':>12} {'ratio':>6}")
    for version in (4, 5):
        for qos in (0, 1):
            ours = _ours(version, qos)
            paho = _paho(version, qos)
            for name, rate in ours.items():
                peer = paho.get(name)
                peer_s = f"{peer:12,.0f}" if peer else f"{'-':>12}"
                ratio = f"{rate / peer:6.2f}" if peer else f"{'-':>6}"
                print(f"{version:>7} {qos:>3} {name:<14} {rate:12,.0f} {peer_s} {ratio}")


if __name__ == "__main__":
    main()
