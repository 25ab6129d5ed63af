"""What an operator finds at the console prompt: the store, tag helpers, history, services.

Everything here runs in the reactor thread, so nothing may block: writes and other asynchronous
work return Deferreds, which the console prints when they fire (``wait`` adds a timeout and
accepts asyncio coroutines too). Output goes through ``print``, which the console redirects to
the SSH channel.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import inspect
import weakref
from typing import Any, NamedTuple

import numpy as np
from twisted.internet.defer import Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferTimeout
from twisted.python.failure import Failure

from iotserver.tags.model import Quality, TagValue
from iotserver.tags.store import UnknownTagError
from iotserver.tags.writer import Writer

HELP = """\
iotserver console: Python inside the running server (the reactor thread: never block).

  tags.read(path)              current TagValue of a tag
  tags.write(path, value)      write through the tag's owner; prints the resulting quality
  tags.find(pattern='**')      tag paths matching a glob ('*' one segment, '**' any depth)
  tags.show(pattern='**')      table: value, unit, quality, source and server time (UTC)
  history(path, start, end)    (ts_ns, values) numpy arrays from the tag's history ring
                               start/end: None, seconds ago as a negative number (-60),
                               epoch seconds, epoch nanoseconds, ISO-8601 text or datetime
  signal(name, seconds=1.0)    (ts_ns, samples) of the newest seconds of a signal channel
  envelope(name, seconds=60, buckets=500)
                               (bucket_ts, mins, maxs) min/max envelope of a signal, for plots
  aggregate(path, start, end, interval)
                               per-interval count/min/max/mean/rms/first/last of a tag's
                               history (interval in seconds), a dict of numpy arrays
  services                     running services and what they expose; services.mqtt ...
  reload()                     re-read the user file and ACLs (like SIGHUP)
  wait(d, timeout=10)          wait for a Deferred or asyncio coroutine and print its result
  store, core, np, Quality     the tag store, the server core, numpy, quality codes
  help(obj)                    documentation of obj; help() prints this text
  exit()                       leave (Ctrl-D works too)
"""


class ConsoleExit(Exception):
    """Raised by ``exit()``: ends the session (an exec request exits with ``code``)."""

    def __init__(self, code: int | str | None = 0) -> None:
        super().__init__(code)
        self.code = code


class NotFound(KeyError):
    """An unknown tag, ring or channel; prints as its message (KeyError would quote it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class WriteResult(NamedTuple):
    """The outcome of ``tags.write``: printed as ``path <- value: QualityName``."""

    path: str
    value: Any
    quality: Quality

    @property
    def ok(self) -> bool:
        return self.quality.is_good

    def __repr__(self) -> str:
        return f"{self.path} <- {self.value!r}: {self.quality.text}"


class Series(NamedTuple):
    """Timestamps (int64 ns since the epoch) and values; unpacks as ``ts, values``."""

    ts: np.ndarray
    values: np.ndarray

    def __repr__(self) -> str:
        n = len(self.ts)
        if not n:
            return "Series(0 samples)"
        v = self.values
        stats = ""
        if v.dtype.kind in "iuf":
            stats = f", min {v.min():.6g}, max {v.max():.6g}, mean {v.mean():.6g}"
        return (
            f"Series({n} samples, {iso(int(self.ts[0]))} .. {iso(int(self.ts[-1]))}{stats})\n"
            f"  ts     = {np.array2string(self.ts, threshold=6, edgeitems=3)}\n"
            f"  values = {np.array2string(v, threshold=6, edgeitems=3, precision=6)}"
        )


def iso(ns: int) -> str:
    """ISO-8601 UTC text of a nanosecond timestamp, millisecond precision."""
    seconds, rest = divmod(int(ns), 1_000_000_000)
    stamp = _dt.datetime.fromtimestamp(seconds, _dt.UTC) + _dt.timedelta(microseconds=rest // 1000)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_value(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:.6g}"
    if isinstance(value, np.ndarray):
        return np.array2string(value, threshold=8, edgeitems=3, precision=6)
    if isinstance(value, str):
        return repr(value)
    return str(value)


def to_ns(when: Any, now_ns: int) -> int | None:
    """A time bound for history queries (see HELP) as epoch nanoseconds; None = unbounded."""
    if when is None:
        return None
    if isinstance(when, _dt.datetime):
        if when.tzinfo is None:
            when = when.replace(tzinfo=_dt.UTC)
        return int(when.timestamp() * 1_000_000_000)
    if isinstance(when, str):
        return to_ns(_dt.datetime.fromisoformat(when.replace("Z", "+00:00")), now_ns)
    if isinstance(when, int | float | np.integer | np.floating) and not isinstance(when, bool):
        if when < 0:
            return now_ns + int(when * 1_000_000_000)
        if when >= 1e15:  # already nanoseconds (1e15 ns is 1970-01-12; 1e15 s is far future)
            return int(when)
        return int(when * 1_000_000_000)
    raise TypeError(
        f"expected None, seconds, nanoseconds, ISO-8601 text or a datetime, got {when!r}"
    )


# Deferreds the console made for work it started (asyncio coroutines): cancelled when the
# session ends. Deferreds from the server itself (a write on its way to a PLC) never are.
_owned: weakref.WeakSet[Deferred[Any]] = weakref.WeakSet()


def as_deferred(obj: Any) -> Deferred[Any] | None:
    """A Deferred for a Deferred, an asyncio coroutine or future; None for anything else."""
    if isinstance(obj, Deferred):
        return obj
    if inspect.iscoroutine(obj) or isinstance(obj, asyncio.Future):
        d: Deferred[Any] = Deferred.fromFuture(asyncio.ensure_future(obj))
        _owned.add(d)
        return d
    return None


def cancel_if_owned(d: Deferred[Any]) -> None:
    """Cancel ``d`` when the console started the work behind it (see ``_owned``)."""
    if d in _owned and not d.called:
        d.cancel()


class RecordedWrite:
    """A ``tags.write`` of a script: its outcome once the owner answered (``done`` fires)."""

    def __init__(self, path: str, value: Any, result: Deferred[WriteResult]) -> None:
        self.path = path
        self.value = value
        self.result = result
        self.outcome: WriteResult | Failure | None = None
        self.done: Deferred[None] = Deferred()

    def note(self, outcome: Any) -> Any:
        self.outcome = outcome
        self.done.callback(None)
        return outcome  # unchanged: whoever else waits for the write gets it too

    @property
    def failed(self) -> bool:
        return not isinstance(self.outcome, WriteResult) or not self.outcome.ok

    def describe(self) -> str:
        if isinstance(self.outcome, Failure):
            return f"{self.path} <- {self.value!r}: {type(self.outcome.value).__name__}: " \
                f"{self.outcome.value}"
        if self.outcome is None:
            return f"{self.path} <- {self.value!r}: no answer"
        return repr(self.outcome)


class Tags:
    """Tag helpers bound to the store: ``read``, ``write``, ``find`` and ``show``."""

    def __init__(self, core: Any, writer: Writer | None = None) -> None:
        self._core = core
        self._writer = writer or Writer("", "console", "")
        # Set by a script session: every write is recorded, so a failed write that is not the
        # script's last value still fails the script (exit status 1).
        self.record: list[RecordedWrite] | None = None

    @property
    def _store(self) -> Any:
        return self._core.store

    def __repr__(self) -> str:
        return f"<tags: {len(self._store)} tags; tags.show('**') lists them>"

    def read(self, path: str) -> TagValue:
        """The current value, quality and timestamps of ``path``."""
        try:
            return self._store.read(path)  # type: ignore[no-any-return]
        except UnknownTagError:
            raise NotFound(f"unknown tag {path!r}") from None

    def write(self, path: str, value: Any) -> Deferred[WriteResult]:
        """Write through the tag's owner (a PLC, the server's memory...); fires with the result."""
        d: Deferred[Quality] = self._store.write(path, value, writer=self._writer)
        result: Deferred[WriteResult] = d.addCallback(
            lambda q: WriteResult(path, value, Quality(q)))
        if self.record is not None:
            entry = RecordedWrite(path, value, result)
            self.record.append(entry)
            result.addBoth(entry.note)
        return result

    def find(self, pattern: str = "**") -> list[str]:
        """Sorted paths of the tags matching the glob ``pattern``."""
        return sorted(t.path for t in self._store.tags(pattern))

    def show(self, pattern: str = "**") -> None:
        """Print a table of the matching tags: value, unit, quality, source and server time."""
        rows = [("path", "value", "quality", "source time", "server time")]
        for path, tv in self._store.read_many(pattern).items():
            unit = self._store.tag(path).unit
            value = "-" if tv.value is None else format_value(tv.value)
            rows.append((
                path, f"{value} {unit}".rstrip(), tv.quality.text, iso(tv.source_ns),
                iso(tv.server_ns),
            ))
        if len(rows) == 1:
            print(f"no tag matches {pattern!r}")
            return
        widths = [min(max(len(r[i]) for r in rows), 48) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


class Services:
    """The running services by section name; ``services.mqtt`` is the service object itself."""

    # Attributes the protocol services may offer (they are built independently; all optional).
    _COLLECTIONS = ("sessions", "clients", "connections", "devices", "subscriptions", "peers")

    def __init__(self, core: Any) -> None:
        self._core = core

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._core.services[name]
        except KeyError:
            raise AttributeError(f"no service {name!r} (running: {self.names()})") from None

    def __getitem__(self, name: str) -> Any:
        return self._core.services[name]

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._core.services))

    def names(self) -> list[str]:
        return sorted(self._core.services)

    def describe(self, name: str) -> str:
        """One line: running state and the size of whatever the service exposes."""
        svc = self._core.services[name]
        parts = ["running" if getattr(svc, "running", False) else "stopped"]
        if getattr(svc, "failure", None) is not None:
            parts.append("FAILED to start")
        for attr in self._COLLECTIONS:
            try:
                value = getattr(svc, attr, None)
            except Exception:  # a property of a half-started service
                continue
            if value is not None and not callable(value) and hasattr(value, "__len__"):
                parts.append(f"{attr}={len(value)}")
        stats = getattr(svc, "stats", None)
        if stats is not None and not callable(stats):
            parts.append(f"stats={stats!r}")
        lines = [f"{name}: " + ", ".join(parts)]
        edge = getattr(svc, "edge_stats", None)
        if callable(edge):  # each listener's connections and what its limits refused or closed
            try:
                per_listener = edge()
            except Exception:
                per_listener = {}
            for listener, counters in per_listener.items():
                shown = ", ".join(f"{k}={v}" for k, v in counters.items()
                                  if v or k in ("accepted", "open"))
                lines.append(f"  {listener}: {shown}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        if not self._core.services:
            return "no protocol services configured"
        return "\n".join(self.describe(n) for n in self.names())


def make_namespace(core: Any, *, extra: dict[str, Any] | None = None,
                   writer: Writer | None = None) -> dict[str, Any]:
    """A fresh namespace for one console session (sessions do not share variables).

    ``writer``: the logged-in user, for the audit trail of ``tags.write``."""
    from twisted.internet import reactor

    clock = core.clock if core.clock is not None else reactor

    def tag_ring(path: str) -> Any:
        try:
            return core.rings.get(f"tag:{path}")
        except KeyError:
            raise NotFound(f"no history for {path!r} (set history = true on the tag)") from None

    def signal_ring(name: str) -> Any:
        try:
            return core.rings.get(f"signal:{name}")
        except KeyError:
            names = ", ".join(sorted(getattr(core.signals, "channels", {}))) or "none"
            raise NotFound(f"no signal channel {name!r} (channels: {names})") from None

    def history(path: str, start: Any = None, end: Any = None) -> Series:
        """Samples of ``path`` in [start, end) from its history ring (see help())."""
        ring = tag_ring(path)
        now = core.store.now_ns()
        lo, hi = to_ns(start, now), to_ns(end, now)
        ts, values = ring.range(-(2**63) if lo is None else lo, 2**63 - 1 if hi is None else hi)
        return Series(ts, values)

    def signal(name: str, seconds: float = 1.0) -> Series:
        """The newest ``seconds`` of samples of a signal channel."""
        ring = signal_ring(name)
        latest = ring.latest()
        if latest is None:
            return Series(np.empty(0, np.int64), np.empty(0, ring.dtype))
        end = latest[0] + 1
        ts, values = ring.range(end - int(seconds * 1_000_000_000), end)
        return Series(ts, values)

    def envelope(name: str, seconds: float = 60.0, buckets: int = 500) -> Any:
        """Min/max envelope of the newest ``seconds`` of a signal, decimated to ``buckets``."""
        ring = signal_ring(name)
        latest = ring.latest()
        end = (latest[0] + 1) if latest is not None else core.store.now_ns()
        return ring.envelope(end - int(seconds * 1_000_000_000), end, buckets)

    def aggregate(path: str, start: Any = -3600, end: Any = None, interval: float = 60.0) -> Any:
        """Per-interval aggregates of a tag's history between ``start`` and ``end``."""
        ring = tag_ring(path)
        now = core.store.now_ns()
        lo, hi = to_ns(start, now), to_ns(end, now)
        return ring.aggregate(lo if lo is not None else now - 3_600_000_000_000,
                              hi if hi is not None else now, int(interval * 1_000_000_000))

    def reload() -> list[str]:
        """Re-read the user file and ACLs now (as on SIGHUP); returns the problems found."""
        problems: list[str] = core.reload()
        print("reloaded" if not problems else "previous settings kept:\n  " + "\n  ".join(problems))
        return problems

    def wait(obj: Any, timeout: float = 10.0) -> Deferred[Any]:
        """A Deferred for ``obj`` (Deferred or asyncio coroutine) failing after ``timeout`` s."""
        return with_timeout(obj, timeout, clock)

    def help(obj: Any = None) -> None:  # shadows the builtin, which would block on stdin
        """Print the console overview, or the documentation of ``obj``."""
        if obj is None:
            print(HELP, end="")
            return
        import pydoc

        print(pydoc.render_doc(obj, renderer=pydoc.plaintext), end="")  # type: ignore[attr-defined]

    def exit(code: int | str | None = 0) -> None:  # shadows the builtin, which stops the process
        """End this console session."""
        raise ConsoleExit(code)

    def no_input(*_: Any) -> None:
        raise RuntimeError("input() would block the server: the console has no stdin")

    ns: dict[str, Any] = {
        "__name__": "__console__",
        "__doc__": HELP,
        "core": core,
        "store": core.store,
        "tags": Tags(core, writer),
        "history": history,
        "signal": signal,
        "envelope": envelope,
        "aggregate": aggregate,
        "services": Services(core),
        "reload": reload,
        "wait": wait,
        "help": help,
        "exit": exit,
        "quit": exit,
        "input": no_input,
        "breakpoint": no_input,
        "np": np,
        "Quality": Quality,
    }
    ns.update(extra or {})
    return ns


def with_timeout(obj: Any, timeout: float, clock: Any) -> Deferred[Any]:
    """``obj`` as a Deferred that errbacks with TimeoutError after ``timeout`` seconds."""
    d = as_deferred(obj)
    if d is None:
        return succeed(obj)
    if d.called:
        return d
    timed_out: list[bool] = []
    out: Deferred[Any] = Deferred(lambda _: d.cancel())  # cancelling out cancels the work

    def expire() -> None:
        timed_out.append(True)
        d.cancel()

    timer = clock.callLater(timeout, expire)
    if d in _owned:
        _owned.add(out)

    def settle(result: Any) -> None:
        if timer.active():
            timer.cancel()
        if out.called:  # cancelled from outside: the result has nowhere to go
            return
        if timed_out:
            out.errback(DeferTimeout(f"no result within {timeout:g} s"))
        elif isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)

    d.addBoth(settle)
    return out


def display(obj: Any) -> str:
    """How the console prints a result."""
    if isinstance(obj, Quality):
        return obj.text
    return repr(obj)

