"""The tag bridge: tags as retained JSON topics, setpoint writes over MQTT, signal blocks in.

Topic layout (``<prefix>`` is ``iotserver`` by default):

``<prefix>/tags/<path>``
    Retained, published on every change the store reports (its deadband applies):
    ``{"v": value, "q": "Good", "t": "2024-05-01T12:00:00.123Z"}``. ``v`` is a number, boolean,
    string, list (arrays) or null (no value yet, NaN, +-inf); ``q`` the OPC UA quality name;
    ``t`` the source timestamp in UTC with milliseconds. A removed tag's retained value is cleared.
``<prefix>/tags/<path>/set``
    A client writes the tag by publishing a JSON value (or ``{"v": value}``). The result,
    ``{"ok": true}`` or ``{"ok": false, "status": "BadOutOfRange"}``, goes to the MQTT 5 Response
    Topic when one is given (with the Correlation Data copied), else to ``.../set/result``.
``<prefix>/signals/<channel>``
    Binary sample blocks for a high-rate channel (header below); problems are counted, logged
    (rate-limited) and reported on ``<prefix>/signals/<channel>/error``.

Signal block (little-endian), 28-byte header then the samples::

    offset size  field
     0     4     magic b"SIG1"
     4     1     version (1)
     5     1     sample type (1 = float32)
     6     2     reserved, 0
     8     8     int64  start timestamp, ns since the Unix epoch (first sample)
    16     8     float64 sample rate in Hz (must match the channel's configured rate)
    24     4     uint32 sample count n
    28     4*n   float32 samples

Writes and signal blocks need a user whose role may write (engineer, admin); the ACL decides
first whether the client may publish the topic at all.

``[mqtt.bridge]`` options honoured here: ``enabled``, ``prefix``, ``publish`` (tag path globs),
``qos``, ``retain``, ``payload`` (``json`` as above, or ``value``: the bare JSON value),
``writes`` (false: ``/set`` is answered with BadNotWritable) and ``signals`` (channel names open
to MQTT blocks; empty: every channel).
"""

from __future__ import annotations

import json
import math
import struct
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from iotserver.mqtt.packets import Properties, Publish, ReasonCode
from iotserver.mqtt.session import Message
from iotserver.mqtt.topics import is_valid_topic_name, matches
from iotserver.tags.model import Change, Quality, TagDef, TagValue
from iotserver.security.login import may_write
from iotserver.tags.store import compile_pattern
from iotserver.tags.writer import Writer

log = Logger(namespace="iotserver.mqtt.bridge")

DEFAULT_PREFIX = "iotserver"

SIGNAL_MAGIC = b"SIG1"
SIGNAL_VERSION = 1
SAMPLE_FLOAT32 = 1
SIGNAL_HEADER = struct.Struct("<4sBBHqdI")  # 28 bytes; samples stay 4-byte aligned
RATE_TOLERANCE = 1e-3  # relative difference allowed between a block's rate and the channel's
MAX_PENDING_WRITES = 1000  # writes in flight before new ones are refused (BadResourceUnavailable)
ERROR_LOG_INTERVAL = 10.0  # seconds between log lines about bad blocks on one channel

_QUALITY_TEXT = {q: q.text for q in Quality}
_OK_PAYLOAD = b'{"ok":true}'


class SignalBlockError(ValueError):
    """A signal block that cannot be ingested; the message says why."""


class SignalBlock(NamedTuple):
    start_ns: int
    sample_rate: float
    samples: npt.NDArray[np.float32]  # a read-only view on the payload (no copy)


def encode_signal_block(start_ns: int, sample_rate: float, samples: Any) -> bytes:
    """Build a block (for clients, tests and the docs example)."""
    data = np.ascontiguousarray(samples, dtype="<f4")
    if data.ndim != 1:
        raise ValueError("samples must be one-dimensional")
    header = SIGNAL_HEADER.pack(
        SIGNAL_MAGIC, SIGNAL_VERSION, SAMPLE_FLOAT32, 0, start_ns, sample_rate, data.size
    )
    return header + data.tobytes()


def decode_signal_block(payload: bytes) -> SignalBlock:
    """Parse and check a block's framing; the samples are a view on ``payload``."""
    size = len(payload)
    if size < SIGNAL_HEADER.size:
        raise SignalBlockError(f"block of {size} bytes is shorter than the 28-byte header")
    magic, version, sample_type, reserved, start_ns, rate, count = SIGNAL_HEADER.unpack_from(
        payload
    )
    if magic != SIGNAL_MAGIC:
        raise SignalBlockError(f"bad magic {magic!r}, expected {SIGNAL_MAGIC!r}")
    if version != SIGNAL_VERSION:
        raise SignalBlockError(f"unsupported block version {version}")
    if sample_type != SAMPLE_FLOAT32:
        raise SignalBlockError(f"unsupported sample type {sample_type} (1 = float32)")
    if reserved:
        raise SignalBlockError("reserved header bytes must be 0")
    if count == 0:
        raise SignalBlockError("block holds no samples")
    expected = SIGNAL_HEADER.size + 4 * count
    if size != expected:
        raise SignalBlockError(f"header says {count} samples ({expected} bytes), got {size} bytes")
    if not (math.isfinite(rate) and rate > 0):
        raise SignalBlockError(f"bad sample rate {rate!r}")
    samples = np.frombuffer(payload, dtype="<f4", count=count, offset=SIGNAL_HEADER.size)
    return SignalBlock(start_ns, rate, samples)


# --------------------------------------------------------------------------- tag JSON


class _IsoClock:
    """Formats ns timestamps as ISO 8601 UTC with milliseconds; the last millisecond's text is
    cached (a poll stamps a whole block with one time)."""

    __slots__ = ("_ms", "_sec", "_sec_text", "_text")

    def __init__(self) -> None:
        self._ms: int | None = None
        self._text = ""
        self._sec: int | None = None
        self._sec_text = ""

    def __call__(self, ns: int) -> str:
        ms = ns // 1_000_000
        if ms == self._ms:
            return self._text
        sec, rem = divmod(ms, 1000)
        if sec != self._sec:
            self._sec = sec
            self._sec_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        self._ms = ms
        self._text = f"{self._sec_text}.{rem:03d}Z"
        return self._text


def json_value(value: Any) -> Any:
    """A JSON-ready form of a tag value: arrays as lists, NaN/inf as None, numpy as Python."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f" and value.size and not np.isfinite(value).all():
            obj = value.astype(object)
            obj[~np.isfinite(value)] = None
            return obj.tolist()
        return value.tolist()
    if isinstance(value, np.generic):
        return json_value(value.item())
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    return str(value)


_dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_float_text = float.__repr__  # what the json module writes for a finite float


def json_text(value: Any) -> str:
    """The JSON text of a tag value. Scalars are formatted directly, exactly as the json
    module would (the bridge formats 100k values/s); anything else goes through it."""
    kind = type(value)
    if kind is int:
        return int.__repr__(value)
    if kind is float:
        return _float_text(value) if math.isfinite(value) else "null"
    if kind is bool:
        return "true" if value else "false"
    if value is None:
        return "null"
    return _dumps(json_value(value))


class TagJson:
    """Encodes TagValues as the bridge's JSON payload ``{"v":..,"q":..,"t":..}``."""

    def __init__(self) -> None:
        self._iso = _IsoClock()

    def __call__(self, tv: TagValue) -> bytes:
        return (f'{{"v":{json_text(tv.value)},"q":"{_QUALITY_TEXT[tv.quality]}",'
                f'"t":"{self._iso(tv.source_ns)}"}}').encode()


def _bare_value(tv: TagValue) -> bytes:
    """``payload = "value"``: just the JSON value (quality and timestamp are dropped)."""
    return json_text(tv.value).encode()


def _payload_text(payload: bytes, limit: int = 200) -> str:
    """A refused request's payload for the audit trail (bounded, never raises)."""
    return payload[:limit].decode("utf-8", "replace")


def parse_set_payload(payload: bytes) -> Any:
    """The value of a ``.../set`` message: a JSON value, or ``{"v": value}``. Raises ValueError.

    NaN and Infinity are refused (not JSON; the bridge publishes them as null).
    """

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON value")

    value = json.loads(payload.decode("utf-8"), parse_constant=no_constants)
    if isinstance(value, dict):
        if set(value) != {"v"}:
            raise ValueError('expected a JSON value or {"v": value}')
        value = value["v"]
    return value


# --------------------------------------------------------------------------- bridge


def _tag_message(topic: str, payload: bytes, qos: int, retain: bool) -> Message:
    """A tag value as a broker message: last-value (a paused reader keeps only the newest)."""
    msg = Message(topic, payload, qos, retain)
    msg.last_value = True
    return msg


@dataclass
class BridgeStats:
    published: int = 0
    encode_errors: int = 0
    writes: int = 0
    writes_refused: int = 0  # not Good, for any reason
    blocks: int = 0
    bad_blocks: int = 0


def _setting(cfg: Any, names: tuple[str, ...], default: Any) -> Any:
    """First attribute found on ``cfg.bridge``, then ``cfg`` (the broker config grows over time)."""
    for owner in (getattr(cfg, "bridge", None), cfg):
        if owner is None:
            continue
        for name in names:
            value = getattr(owner, name, None)
            if value is not None:
                return value
    return default


class TagBridge:
    """Connects the tag store and the signal hub to the broker (see the module docstring)."""

    def __init__(self, core: Any, broker: Any, cfg: Any) -> None:
        self.core = core
        self.broker = broker
        self.prefix = str(_setting(cfg, ("topic_prefix", "prefix"), DEFAULT_PREFIX)).rstrip("/")
        self.enabled = bool(_setting(cfg, ("enabled",), True))
        self.qos = int(_setting(cfg, ("tag_qos", "bridge_qos", "qos"), 0))
        self.retain = bool(_setting(cfg, ("retain",), True))
        self.payload_kind = str(_setting(cfg, ("payload",), "json"))
        self.writes = bool(_setting(cfg, ("writes",), True))
        self.signal_channels = frozenset(_setting(cfg, ("signals",), ()))
        patterns = tuple(_setting(cfg, ("publish",), ("**",)))
        self._publish_rx = (
            None if "**" in patterns else [compile_pattern(p) for p in patterns]
        )
        self._publish_ok: dict[str, bool] = {}
        self._topics: dict[str, str] = {}  # tag path -> topic, for published tags only
        self.tags_prefix = f"{self.prefix}/tags/"
        self.signals_prefix = f"{self.prefix}/signals/"
        self.stats = BridgeStats()
        self._encode = TagJson()
        self._subscription: Any = None
        self._undefine: Any = None
        self._interceptors: list[tuple[str, Any, Any]] = []
        self._pending_writes = 0
        self._running = False
        self._block_errors: dict[str, tuple[float, int]] = {}  # channel -> (last log, suppressed)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Publish every tag (retained) and start listening for writes and signal blocks."""
        if self._running or not self.enabled:
            return
        self._running = True
        store = self.core.store
        self._undefine = store.on_define(self._on_define)
        if self.retain:
            # the store holds every tag's current value: it answers for the retained
            # messages of the tag topics (no copy in the broker, nothing to persist)
            self.broker.add_retained_source(self.tags_prefix, self)
        self.broker.on_publish_denied = self._on_publish_denied
        self._subscription = store.subscribe("**", self._on_changes, name="mqtt-bridge")
        # the tags subtree is always intercepted (consumed), even with writes off: clients
        # must not be able to publish or retain look-alike tag values there
        hooks: list[tuple[str, Any]] = [
            (self.tags_prefix + "#", self._on_tag_publish),
            (self.signals_prefix + "#", self._on_signal_publish),
        ]
        for topic_filter, callback in hooks:
            handle = self.broker.add_interceptor(topic_filter, callback)
            self._interceptors.append((topic_filter, callback, handle))

    def stop(self) -> None:
        """Stop publishing and intercepting; idempotent."""
        self._running = False
        self.broker.on_publish_denied = None
        if self.retain:
            self.broker.remove_retained_source(self.tags_prefix)
        if self._subscription is not None:
            self._subscription.cancel()
            self._subscription = None
        if self._undefine is not None:
            self._undefine()
            self._undefine = None
        for _filter, _callback, handle in self._interceptors:
            if callable(handle):
                handle()
            else:  # the broker's int handle
                self.broker.remove_interceptor(handle)
        self._interceptors.clear()

    # -- tags -> MQTT ---------------------------------------------------------------------
    # Changes published per reactor turn. A poll of a large PLC delivers tens of thousands of
    # changes at once; publishing them in one go stalls the loop and overflows subscribers'
    # queues (benchmarks/e2e/bench_scale.py). Between slices the store sees us busy and
    # conflates further changes per tag, so the backlog stays bounded by the tag count.
    SLICE = 2000

    def _on_changes(self, changes: list[Change]) -> Deferred[None] | None:
        if len(changes) <= self.SLICE:
            self._publish_changes(changes)
            return None
        done: Deferred[None] = Deferred()
        self._next_slice(changes, 0, done)
        return done

    def _next_slice(self, changes: list[Change], start: int, done: Deferred[None]) -> None:
        # A method with explicit arguments, not a closure calling itself: that closure is a
        # reference cycle which kept every batch (10,000 changes) alive until the garbage
        # collector ran, 16 % of a core at 100k changes/s (benchmarks/e2e/bench_scale.py).
        if not self._running:
            done.callback(None)
            return
        end = start + self.SLICE
        try:
            self._publish_changes(changes[start:end])
        except Exception:  # the store logs a subscriber failure; do not hang it
            done.errback()
            return
        if end < len(changes):
            self.core.clock.callLater(0, self._next_slice, changes, end, done)
        else:
            done.callback(None)

    def _publish_changes(self, changes: list[Change]) -> None:
        # Hot path (one call per tag change): topics were validated when the tags were
        # defined, and a change nobody subscribes to is neither encoded nor built.
        broker = self.broker
        plan_for = broker.plan_for
        route = broker.route
        encode = self._encoder()
        topics = self._topics
        qos = self.qos
        retain = self.retain
        selected = self._publish_rx is not None
        sent = 0
        for tag, tv in changes:
            path = tag.path
            topic = topics.get(path)
            if topic is None:
                if selected and not self._selected(path):
                    continue
                topic = self._topic(path)
            plan = plan_for(topic)
            if plan is None:
                continue
            try:
                payload = encode(tv)
            except (TypeError, ValueError) as exc:
                self.stats.encode_errors += 1
                log.warn("tag {path}: value not encodable as JSON: {exc}", path=path, exc=exc)
                continue
            route(plan, _tag_message(topic, payload, qos, retain))
            sent += 1
        self.stats.published += sent

    def _encoder(self) -> Any:
        return self._encode if self.payload_kind == "json" else _bare_value

    def _topic(self, path: str) -> str:
        """The topic of a published tag (cached; tag paths are valid topic levels)."""
        topic = self.tags_prefix + path
        if len(self._topics) >= 1_000_000:
            self._topics.clear()  # bound: more tags than that were defined and removed
        self._topics[path] = topic
        return topic

    # -- retained source: the store answers for the tag topics' retained messages ----------
    def retained_match(self, topic_filter: str) -> list[Message]:
        """Current values of the published tags whose topics ``topic_filter`` matches."""
        store = self.core.store
        prefix = self.tags_prefix
        # tag paths under the filter's literal head, then the exact MQTT match
        head = topic_filter[len(prefix):] if topic_filter.startswith(prefix) else ""
        cut = min((i for i in (head.find("+"), head.find("#")) if i >= 0), default=len(head))
        # one tag's topic (no wildcard): a lookup, not a walk over every tag
        exact = topic_filter.startswith(prefix) and cut == len(head)
        paths = ([head] if head in store else []) if exact else store.paths()
        # the literal levels before the first wildcard, without the "/" that ends them: "#"
        # also matches its parent level (MQTT-4.7.1-2), so ".../Pump1/#" includes the tag
        # "Pump1" itself; matches() below makes the exact decision
        head = head[:cut].rpartition("/")[0]
        encode = self._encoder()
        out: list[Message] = []
        for path in paths:
            if not path.startswith(head):
                continue
            if self._publish_rx is not None and not self._selected(path):
                continue
            topic = prefix + path
            if not matches(topic_filter, topic):
                continue
            try:
                payload = encode(store.read(path))
            except (TypeError, ValueError):
                continue  # counted and logged when it was published
            out.append(_tag_message(topic, payload, self.qos, True))
        return out

    def retained_count(self) -> int:
        if self._publish_rx is None:
            return len(self.core.store)
        return sum(1 for p in self.core.store.paths() if self._selected(p))

    def _selected(self, path: str) -> bool:
        """Whether ``[mqtt.bridge] publish`` globs include the tag (cached per path)."""
        ok = self._publish_ok.get(path)
        if ok is None:
            assert self._publish_rx is not None
            ok = any(rx.match(path) for rx in self._publish_rx)
            if len(self._publish_ok) > 100_000:
                self._publish_ok.clear()
            self._publish_ok[path] = ok
        return ok

    def _on_define(self, tag: TagDef, added: bool) -> None:
        self._publish_ok.pop(tag.path, None)
        self._topics.pop(tag.path, None)
        if not added and self._running and self.retain:
            # subscribers see the retained value go: an empty retained message (MQTT-3.3.1-10)
            self.broker.publish_internal(self.tags_prefix + tag.path, b"", 0, True)

    # -- MQTT -> tag writes ---------------------------------------------------------------
    def _may_write(self, user: str | None) -> bool:
        if user is None:
            return False
        entry = self.core.users.get(user)
        return entry is not None and may_write(entry.role)

    def _writer(self, client_id: str, user: str | None) -> Writer:
        sessions = getattr(self.broker, "sessions", None) or {}
        conn = getattr(sessions.get(client_id), "conn", None)  # not .clients: that is a copy
        return Writer(user or "", "mqtt", getattr(conn, "peer", "") or "")

    def _on_publish_denied(self, client_id: str, user: str | None, topic: str,
                           payload: bytes, peer: str) -> None:
        """The ACL refused a PUBLISH: a tag write request among them goes into the audit
        trail (it never reaches :meth:`_on_tag_publish`)."""
        if topic.startswith(self.tags_prefix) and topic.endswith("/set"):
            path = topic[len(self.tags_prefix) : -4]
            self.core.store.audit_refusal(Writer(user or "", "mqtt", peer), path,
                                          _payload_text(payload),
                                          Quality.BAD_USER_ACCESS_DENIED)

    def _on_tag_publish(
        self, client_id: str, user: str | None, publish: Publish
    ) -> Deferred[Any] | None:
        """A client PUBLISH under ``<prefix>/tags/`` (consumed: never routed nor retained).

        For a ``/set`` request the returned Deferred fires once the result is published, so
        the broker sends the PUBACK after the write (acks stay in order); it fires with a v5
        reason code when the request itself was unusable (0x87 role, 0x99 not JSON).
        """
        topic = publish.topic
        if not topic.endswith("/set"):
            return None  # value topics belong to the bridge; results are not requests
        path = topic[len(self.tags_prefix) : -4]
        if not path:
            return None
        self.stats.writes += 1
        reply_topic, properties = self._reply_route(client_id, user, publish)
        qos = min(publish.qos, 1)
        if not self.writes:
            self._reply(reply_topic, properties, qos, Quality.BAD_NOT_WRITABLE,
                        "writes over MQTT are off ([mqtt.bridge] writes = false)")
            return None
        if not self._may_write(user):
            log.info(
                "client {cid!r} ({user}): write to {path} refused: role may not write",
                cid=client_id, user=user or "anonymous", path=path,
            )
            self.core.store.audit_refusal(self._writer(client_id, user), path,
                                          _payload_text(publish.payload),
                                          Quality.BAD_USER_ACCESS_DENIED)
            self._reply(reply_topic, properties, qos, Quality.BAD_USER_ACCESS_DENIED)
            return succeed(ReasonCode.NOT_AUTHORIZED)  # in a v5 PUBACK
        try:
            value = parse_set_payload(publish.payload)
        except (ValueError, UnicodeDecodeError) as exc:
            self.core.store.audit_refusal(self._writer(client_id, user), path,
                                          _payload_text(publish.payload),
                                          Quality.BAD_TYPE_MISMATCH)
            self._reply(reply_topic, properties, qos, Quality.BAD_TYPE_MISMATCH, str(exc))
            return succeed(ReasonCode.PAYLOAD_FORMAT_INVALID)
        if self._pending_writes >= MAX_PENDING_WRITES:
            self._reply(reply_topic, properties, qos, Quality.BAD_RESOURCE_UNAVAILABLE)
            return None
        self._pending_writes += 1
        d: Deferred[Any] = self.core.store.write(path, value,
                                                 writer=self._writer(client_id, user))

        def done(quality: Quality) -> None:
            self._pending_writes -= 1
            self._reply(reply_topic, properties, qos, quality)

        d.addCallback(done)
        d.addErrback(lambda f: log.failure("write result for {path}", f, path=path))
        return d

    def _reply_route(
        self, client_id: str, user: str | None, publish: Publish
    ) -> tuple[str, Properties | None]:
        """Where the result goes: the v5 Response Topic when usable, else ``<topic>/result``."""
        props = publish.properties
        correlation = props.correlation_data if props is not None else None
        reply_props = Properties(correlation_data=correlation) if correlation is not None else None
        wanted = props.response_topic if props is not None else None
        if wanted is not None:
            if self._response_topic_ok(client_id, user, wanted):
                return wanted, reply_props
            log.info(
                "client {cid!r}: response topic {t!r} refused, answering on {d!r}",
                cid=client_id, t=wanted, d=publish.topic + "/result",
            )
        return publish.topic + "/result", reply_props

    def _response_topic_ok(self, client_id: str, user: str | None, topic: str) -> bool:
        """No wildcards or ``$`` topics, nothing in the bridge's own namespace but results, and
        (when the broker has an ACL) only topics the client could publish itself."""
        if not is_valid_topic_name(topic) or topic.startswith("$"):
            return False
        if topic.startswith(self.signals_prefix):
            return False
        if topic.startswith(self.tags_prefix) and not topic.endswith("/result"):
            return False
        acl = getattr(self.broker, "acl", None)
        if acl is not None:
            return bool(acl.can_publish(user, client_id, topic))
        return True

    def _reply(
        self,
        topic: str,
        properties: Properties | None,
        qos: int,
        quality: Quality,
        error: str | None = None,
    ) -> None:
        if not quality.is_good:
            self.stats.writes_refused += 1
        if not self._running:
            return
        if quality.is_good:
            payload = _OK_PAYLOAD
        else:
            body: dict[str, Any] = {"ok": False, "status": _QUALITY_TEXT[quality]}
            if error:
                body["error"] = error
            payload = _dumps(body).encode()
        self.broker.publish_internal(topic, payload, qos, False, properties)

    # -- signal blocks --------------------------------------------------------------------
    def _on_signal_publish(
        self, client_id: str, user: str | None, publish: Publish
    ) -> Deferred[Any] | None:
        """A signal block: ingested synchronously; a rejected one is reported (and answered
        with 0x87 / 0x99 in a v5 PUBACK)."""
        channel = publish.topic[len(self.signals_prefix) :]
        if not channel or channel.endswith("/error"):
            return None
        if not self._may_write(user):
            self._bad_block(channel, client_id, "BadUserAccessDenied: the role may not write")
            return succeed(ReasonCode.NOT_AUTHORIZED)
        try:
            if self.signal_channels and channel not in self.signal_channels:
                raise SignalBlockError(f"channel {channel!r} does not accept blocks over MQTT")
            block = decode_signal_block(publish.payload)
            signals = self.core.signals
            ch = signals.channels.get(channel)
            if ch is None:
                raise SignalBlockError(f"unknown signal channel {channel!r}")
            rate = ch.config.sample_rate
            if abs(block.sample_rate - rate) > RATE_TOLERANCE * rate:
                raise SignalBlockError(
                    f"sample rate {block.sample_rate:g} Hz does not match the channel's {rate:g} Hz"
                )
            if ch.stats.blocks and block.start_ns <= ch.next_start_ns - ch.period_ns:
                raise SignalBlockError(
                    f"block starts at {block.start_ns} ns, not after the previous block's last "
                    f"sample ({ch.next_start_ns - ch.period_ns} ns)"
                )
            signals.ingest(channel, block.start_ns, block.samples)
        except ValueError as exc:  # SignalBlockError, and SignalError from the hub
            self._bad_block(channel, client_id, str(exc))
            return succeed(ReasonCode.PAYLOAD_FORMAT_INVALID)
        self.stats.blocks += 1
        return None

    def _bad_block(self, channel: str, client_id: str, reason: str) -> None:
        self.stats.bad_blocks += 1
        now = self.core.clock.seconds()
        last, suppressed = self._block_errors.get(channel, (-math.inf, 0))
        if now - last >= ERROR_LOG_INTERVAL:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            log.warn(
                "signal block on {channel!r} from {cid!r} rejected: {reason}{more}",
                channel=channel, cid=client_id, reason=reason, more=more,
            )
            if len(self._block_errors) > 1000:
                self._block_errors.clear()
            self._block_errors[channel] = (now, 0)
        else:
            self._block_errors[channel] = (last, suppressed + 1)
        if self._running and is_valid_topic_name(self.signals_prefix + channel + "/error"):
            body = {"error": reason, "client": client_id}
            self.broker.publish_internal(
                self.signals_prefix + channel + "/error", _dumps(body).encode(), 0, False
            )
