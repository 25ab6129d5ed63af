"""The tag store: the hub every protocol adapter reads from and writes to.

Sources call :meth:`TagStore.apply` with batches of :class:`Update`; endpoints subscribe by path
pattern and receive batched :class:`Change` lists at most once per reactor turn. Writes from any
endpoint go through :meth:`TagStore.write`, which validates and coerces the value and routes it to
the tag's owner; the returned Deferred fires with the final :class:`Quality` and never errbacks.

Subscriber isolation: pending changes are kept per subscriber in a dict keyed by path, so a
subscriber that falls behind (its callback returned an unfinished Deferred) gets the latest value of
each tag once it is ready again, and its backlog is bounded by the number of tags it watches. A
callback that raises is logged and counted; other subscribers are not affected.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from iotserver.clock import Clock
from iotserver.tags.model import (
    Change,
    CoerceError,
    DeadbandKind,
    Quality,
    TagDef,
    TagValue,
    Update,
    coerce,
)
from iotserver.tags.writer import UNKNOWN_WRITER, AuditSink, Writer

log = Logger(namespace="iotserver.tags")

Callback = Callable[[list[Change]], "Deferred[Any] | None"]


class TagError(Exception):
    """Misuse of the store API by server code (not a user or protocol error)."""


class DuplicateTagError(TagError):
    pass


class UnknownTagError(TagError, KeyError):
    pass


class WriteRefused(Exception):
    """Raised (or errbacked) by an owner to refuse a write with a specific quality code."""

    def __init__(self, quality: Quality, message: str = "") -> None:
        super().__init__(message or quality.text)
        self.quality = quality


class TagOwner(Protocol):
    """Whoever answers writes for a tag: the server's memory, a PLC poller, an OPC UA client..."""

    def write_tag(self, tag: TagDef, value: Any) -> Deferred[Quality] | Quality:
        """Carry out the write; fire with GOOD or a Bad quality, or raise WriteRefused."""


class InlineOwner(TagOwner, Protocol):
    """An owner that can answer some writes synchronously, in the writer's own turn, says so
    by having ``write_inline`` (the store looks for it when the owner is registered)."""

    def write_inline(self, tag: TagDef, value: Any,
                     origin: Subscription | None) -> Quality | None:
        """Carry out the write now and return its quality, or None: this one goes through
        :meth:`write_tag`. ``origin`` must not be notified (see :meth:`TagStore.write_now`)."""


class HistorySink(Protocol):
    def append(self, ts_ns: int, value: Any) -> None: ...


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Path glob: ``*`` matches within one segment, ``**`` across segments, ``?`` one character.

    ``Line1/**`` matches everything below Line1; ``**`` matches every tag.
    """
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


@dataclass(eq=False)
class Subscription:
    """A subscriber's handle; ``cancel()`` stops delivery."""

    store: TagStore
    pattern: str
    callback: Callback
    name: str
    regex: re.Pattern[str]
    pending: dict[str, Change] = field(default_factory=dict)
    busy: bool = False
    active: bool = True
    delivered: int = 0
    conflated: int = 0
    failures: int = 0

    def cancel(self) -> None:
        if self.active:
            self.active = False
            self.pending.clear()
            self.store._remove_subscription(self)

    def matches(self, path: str) -> bool:
        return self.regex.match(path) is not None


class _Entry:
    """Per-tag state, kept lean: it is touched once per update on the hot path."""

    __slots__ = ("tag", "value", "reported", "reported_quality", "subs", "history", "plain")

    def __init__(self, tag: TagDef, value: TagValue) -> None:
        self.tag = tag
        self.value = value
        self.reported: Any = None
        self.reported_quality: Quality | None = None
        self.subs: tuple[Subscription, ...] = ()
        self.history: HistorySink | None = None
        # Scalars without deadband compare with != directly (the common, fast case).
        self.plain = tag.deadband_kind is DeadbandKind.NONE and not tag.is_array


@dataclass
class StoreStats:
    updates_applied: int = 0
    updates_unknown: int = 0
    history_dropped: int = 0
    notifications: int = 0
    writes: int = 0
    writes_failed: int = 0
    subscriber_errors: int = 0


class TagStore:
    """In-memory tags, batched change fan-out, and the write path."""

    def __init__(self, clock: Clock, *, write_timeout: float = 10.0) -> None:
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._owners: dict[str, TagOwner] = {}
        # owner name -> its write_inline (InlineOwner), looked up once at registration
        self._inline: dict[str, Callable[[TagDef, Any, Subscription | None], Quality | None]] = {}
        self._subs: list[Subscription] = []
        self._flush_call: IDelayedCall | None = None
        self._dirty: set[Subscription] = set()
        self.write_timeout = write_timeout
        self.stats = StoreStats()
        self.audit: AuditSink | None = None  # told every write's outcome (writer.py)
        self._define_listeners: list[Callable[[TagDef, bool], None]] = []

    # -- time -----------------------------------------------------------------------------
    def now_ns(self) -> int:
        """Server time in integer nanoseconds, from the injected clock (task.Clock in tests)."""
        return int(self._clock.seconds() * 1_000_000_000)

    # -- definitions ----------------------------------------------------------------------
    def define(self, tag: TagDef, initial: TagValue | None = None) -> None:
        """Add a tag. Its value starts as ``initial`` or Bad_WaitingForInitialData."""
        if tag.path in self._entries:
            raise DuplicateTagError(tag.path)
        if initial is None:
            now = self.now_ns()
            if tag.initial is not None:
                initial = TagValue(coerce(tag, tag.initial), Quality.GOOD, now, now)
            else:
                initial = TagValue(None, Quality.BAD_WAITING_FOR_INITIAL_DATA, now, now)
        entry = _Entry(tag, initial)
        entry.subs = tuple(s for s in self._subs if s.matches(tag.path))
        self._entries[tag.path] = entry
        for listener in list(self._define_listeners):
            listener(tag, True)
        if initial.quality is not Quality.BAD_WAITING_FOR_INITIAL_DATA:
            self._notify(entry, initial)
            self._schedule_flush()

    def remove(self, path: str) -> None:
        entry = self._entries.pop(path, None)
        if entry is None:
            raise UnknownTagError(path)
        for sub in entry.subs:
            sub.pending.pop(path, None)
        for listener in list(self._define_listeners):
            listener(entry.tag, False)

    def on_define(self, listener: Callable[[TagDef, bool], None]) -> Callable[[], None]:
        """Call ``listener(tag, added)`` when tags are defined or removed; returns the
        unsubscribe function."""
        self._define_listeners.append(listener)
        return lambda: self._define_listeners.remove(listener)

    def set_history(self, path: str, sink: HistorySink | None) -> None:
        self._entry(path).history = sink

    def register_owner(self, name: str, owner: TagOwner) -> None:
        self._owners[name] = owner
        inline = getattr(owner, "write_inline", None)
        if inline is not None:
            self._inline[name] = inline
        else:
            self._inline.pop(name, None)

    def unregister_owner(self, name: str) -> None:
        self._owners.pop(name, None)
        self._inline.pop(name, None)

    def __contains__(self, path: object) -> bool:
        return path in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def paths(self) -> Iterator[str]:
        return iter(self._entries)

    def tag(self, path: str) -> TagDef:
        return self._entry(path).tag

    def tags(self, pattern: str = "**") -> list[TagDef]:
        rx = compile_pattern(pattern)
        return [e.tag for p, e in self._entries.items() if rx.match(p)]

    def _entry(self, path: str) -> _Entry:
        try:
            return self._entries[path]
        except KeyError:
            raise UnknownTagError(path) from None

    # -- reads ----------------------------------------------------------------------------
    def read(self, path: str) -> TagValue:
        return self._entry(path).value

    def read_many(self, pattern: str) -> dict[str, TagValue]:
        """Current values of every tag whose path matches the glob ``pattern``, in path order."""
        if not any(c in pattern for c in "*?"):
            entry = self._entries.get(pattern)
            return {pattern: entry.value} if entry else {}
        rx = compile_pattern(pattern)
        return {p: self._entries[p].value for p in sorted(self._entries) if rx.match(p)}

    # -- source updates (hot path) ----------------------------------------------------------
    def apply(self, updates: Iterable[Update], *, origin: Subscription | None = None) -> int:
        """Apply a batch from a source; returns how many changes were notified.

        Values are trusted to be of the tag's type (sources decode them); the deadband decides
        whether subscribers hear of the change, while ``read`` always returns the latest sample.
        ``origin`` (a write's own subscriber, see :meth:`write_now`) is not notified.
        """
        now = self.now_ns()
        entries = self._entries
        notified = 0
        unknown = 0
        applied = 0
        history_dropped = 0
        for path, value, quality, source_ns in updates:
            entry = entries.get(path)
            if entry is None:
                unknown += 1
                continue
            applied += 1
            tv = TagValue(value, quality, source_ns or now, now)
            entry.value = tv
            # History holds usable samples only: a Bad period is a gap, not repeated values.
            if entry.history is not None and value is not None and quality < 0x80000000:
                try:
                    entry.history.append(tv.source_ns, value)
                except ValueError:  # source clock went backwards: keep the ring time-ordered
                    history_dropped += 1
            if quality != entry.reported_quality or (
                (value != entry.reported)
                if entry.plain
                else entry.tag.deadband_exceeded(entry.reported, value)
            ):
                if entry.subs:
                    self._notify(entry, tv, origin)
                else:
                    entry.reported = value
                    entry.reported_quality = quality
                notified += 1
        self.stats.updates_applied += applied
        if history_dropped:
            self.stats.history_dropped += history_dropped
            log.debug("apply: {n} samples older than their history dropped", n=history_dropped)
        if unknown:
            self.stats.updates_unknown += unknown
            log.debug("apply: {n} updates for unknown tags ignored", n=unknown)
        if notified and self._dirty:
            self._schedule_flush()
        return notified

    def _notify(self, entry: _Entry, tv: TagValue, origin: Subscription | None = None) -> None:
        entry.reported = tv.value
        entry.reported_quality = tv.quality
        change = Change(entry.tag, tv)
        path = entry.tag.path
        dirty = self._dirty
        for sub in entry.subs:
            if sub is origin:
                # The writer shows this value itself; an older pending one must not follow it.
                sub.pending.pop(path, None)
                continue
            pending = sub.pending
            if path in pending:
                sub.conflated += 1
            pending[path] = change
            dirty.add(sub)

    def set_quality(self, pattern: str, quality: Quality, source_ns: int = 0) -> int:
        """Mark every matching tag with ``quality``, keeping its last value (e.g. PLC offline)."""
        rx = compile_pattern(pattern)
        batch = [
            Update(p, e.value.value, quality, source_ns)
            for p, e in self._entries.items()
            if rx.match(p)
        ]
        return self.apply(batch)

    # -- subscriptions --------------------------------------------------------------------
    def subscribe(
        self, pattern: str, callback: Callback, *, name: str = "", initial: bool = True
    ) -> Subscription:
        """Deliver changes of tags matching ``pattern`` to ``callback(list[Change])``.

        With ``initial`` the current value of every matching tag is delivered first (in the
        next flush). The callback may return a Deferred: until it fires, further changes are
        conflated per tag instead of queued.
        """
        sub = Subscription(self, pattern, callback, name or pattern, compile_pattern(pattern))
        self._subs.append(sub)
        for path, entry in self._entries.items():
            if sub.matches(path):
                entry.subs = (*entry.subs, sub)
                if initial:
                    sub.pending[path] = Change(entry.tag, entry.value)
        if sub.pending:
            self._dirty.add(sub)
            self._schedule_flush()
        return sub

    def _remove_subscription(self, sub: Subscription) -> None:
        self._subs.remove(sub)
        self._dirty.discard(sub)
        for entry in self._entries.values():
            if sub in entry.subs:
                entry.subs = tuple(s for s in entry.subs if s is not sub)

    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._subs)

    def _schedule_flush(self) -> None:
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Deliver pending changes to every ready subscriber (normally called by the clock)."""
        self._flush_call = None
        dirty, self._dirty = self._dirty, set()
        for sub in dirty:
            if not sub.active:
                continue
            if sub.busy:
                self._dirty.add(sub)  # delivered when its Deferred fires
                continue
            self._deliver(sub)

    def _deliver(self, sub: Subscription) -> None:
        batch = list(sub.pending.values())
        sub.pending.clear()
        if not batch:
            return
        sub.delivered += len(batch)
        self.stats.notifications += len(batch)
        try:
            result = sub.callback(batch)
        except Exception:
            self._subscriber_failed(sub, Failure())
            return
        if isinstance(result, Deferred):
            sub.busy = True
            result.addErrback(lambda f: self._subscriber_failed(sub, f))
            result.addBoth(lambda _: self._subscriber_ready(sub))

    def _subscriber_ready(self, sub: Subscription) -> None:
        sub.busy = False
        if sub.active and sub.pending:
            self._dirty.add(sub)
            self._schedule_flush()

    def _subscriber_failed(self, sub: Subscription, failure: Failure) -> None:
        sub.failures += 1
        self.stats.subscriber_errors += 1
        log.failure("subscriber {name!r} failed on a batch of changes", failure, name=sub.name)

    # -- writes ---------------------------------------------------------------------------
    def write(self, path: str, value: Any, *, writer: Writer | None = None,
              principal: str = "") -> Deferred[Quality]:
        """Validate, coerce and route a write to the tag's owner; fires with the final quality.

        Never errbacks: every failure becomes a Bad quality (BadNodeIdUnknown, BadNotWritable,
        BadTypeMismatch, BadOutOfRange, BadTimeout, BadInternalError ...), so each protocol can
        answer its client with its own code. ``writer`` says who writes (the audit trail);
        ``principal`` alone is the older form of it (a name, no protocol or peer).
        """
        result = self.write_now(path, value, writer=writer, principal=principal)
        if isinstance(result, Deferred):
            return result
        return succeed(result)

    def write_now(
        self,
        path: str,
        value: Any,
        *,
        writer: Writer | None = None,
        principal: str = "",
        checked: TagDef | None = None,
        origin: Subscription | None = None,
    ) -> Quality | Deferred[Quality]:
        """:meth:`write` for hot paths: the same checks and routing, but when the owner answers
        at once (memory tags, refusals) the final Quality is returned itself, no Deferred.

        ``checked``: the TagDef the caller already coerced ``value`` for; while that is still
        the tag's definition the value is not coerced a second time (coerce is idempotent).
        ``origin``: the caller's own store subscription. A memory tag's write does not notify
        it (every other subscriber is notified as usual): the caller must show the new value
        itself, e.g. from :meth:`read` right after the write.
        """
        result = self._route(path, value, checked, origin)
        audit = self.audit
        if audit is not None:
            if writer is None:
                writer = Writer(principal) if principal else UNKNOWN_WRITER
            if type(result) is Quality:
                audit.write_done(writer, path, value, result)
            else:
                result.addCallback(_audited, audit, writer, path, value)  # type: ignore[union-attr]
        return result

    def audit_refusal(self, writer: Writer, path: str, value: Any, quality: Quality) -> None:
        """Record a write that its protocol refused before it reached the store (role, bad
        payload...), so the audit trail holds every attempt (the store's counters do not)."""
        if self.audit is not None:
            self.audit.write_done(writer, path, value, quality)

    def _route(self, path: str, value: Any, checked: TagDef | None,
               origin: Subscription | None) -> Quality | Deferred[Quality]:
        self.stats.writes += 1
        entry = self._entries.get(path)
        if entry is None:
            return self._refused(Quality.BAD_NODE_ID_UNKNOWN)
        tag = entry.tag
        if not tag.writable:
            return self._refused(Quality.BAD_NOT_WRITABLE)
        if checked is not tag:
            try:
                value = coerce(tag, value)
            except CoerceError as exc:
                return self._refused(exc.quality)
        owner = self._owners.get(tag.owner)
        if owner is None:
            log.warn("write to {path}: no owner {owner!r} is running", path=path, owner=tag.owner)
            return self._refused(Quality.BAD_NOT_CONNECTED)
        result: Quality | Deferred[Quality]
        try:
            inline = self._inline.get(tag.owner)
            if inline is not None:
                answer = inline(tag, value, origin)
                if answer is Quality.GOOD:  # the hot path (memory tags): nothing to count
                    return answer
                if answer is not None:
                    return self._write_done(answer)
            result = owner.write_tag(tag, value)
        except Exception:
            return self._write_done(self._write_failed(Failure(), path))
        if not isinstance(result, Deferred):
            return self._write_done(result)  # answered at once: no timer, no callback chain
        d: Deferred[Quality] = result
        if not d.called:
            d.addTimeout(self.write_timeout, cast(IReactorTime, self._clock))  # same object
        d.addErrback(self._write_failed, path)
        d.addCallback(self._write_done)
        return d

    def _refused(self, quality: Quality) -> Quality:
        self.stats.writes_failed += 1
        return quality

    def _write_failed(self, failure: Failure, path: str) -> Quality:
        from twisted.internet.defer import TimeoutError as DeferTimeout

        if failure.check(WriteRefused):
            return failure.value.quality  # type: ignore[no-any-return,union-attr]
        if failure.check(DeferTimeout):
            log.warn("write to {path} timed out", path=path)
            return Quality.BAD_TIMEOUT
        log.failure("write to {path} failed in its owner", failure, path=path)
        return Quality.BAD_INTERNAL_ERROR

    def _write_done(self, quality: Quality) -> Quality:
        if type(quality) is not Quality:
            quality = Quality(quality)
        if quality & 0x80000000:  # Bad (Quality is an IntEnum; .is_bad is slower)
            self.stats.writes_failed += 1
        return quality


def _audited(quality: Quality, audit: AuditSink, writer: Writer, path: str, value: Any) -> Quality:
    audit.write_done(writer, path, value, quality)
    return quality


class MemoryOwner:
    """Owner of the server's own tags (setpoints and the like): a write simply becomes the value.

    A write is answered at once (``write_inline``), except for a ``persist`` tag with a
    persistence backend: its value is committed to disk on the backend's writer thread
    (group commit, see ``iotserver.tags.persist``) and applied, and the write acknowledged,
    once it is durable, so an acknowledged write survives kill -9 and the event loop never
    waits for the disk.
    """

    name = "memory"

    def __init__(self, store: TagStore, persistence: Any | None = None) -> None:
        self._store = store
        self._persistence = persistence

    def write_inline(self, tag: TagDef, value: Any,
                     origin: Subscription | None) -> Quality | None:
        if tag.persist and self._persistence is not None:
            return None  # durable first: write_tag
        self._store.apply((Update(tag.path, value, Quality.GOOD, 0),), origin=origin)
        return Quality.GOOD

    def write_tag(self, tag: TagDef, value: Any) -> Quality | Deferred[Quality]:
        store = self._store
        if not (tag.persist and self._persistence is not None):
            store.apply((Update(tag.path, value, Quality.GOOD, 0),))
            return Quality.GOOD
        ts = store.now_ns()
        path = tag.path

        def durable(_: None) -> Quality:
            store.apply((Update(path, value, Quality.GOOD, ts),))
            return Quality.GOOD

        d: Deferred[None] = self._persistence.commit(path, value, Quality.GOOD, ts)
        return d.addCallback(durable)
