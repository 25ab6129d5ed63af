"""Tag store -> address space: batches of changes written into the variables, fast and fair.

One store subscription (``**``) delivers each batch of changes once per reactor turn. The tag
variables are virtual (:mod:`.addrspace`: their Value is read from the store when read), so
only changes of *monitored* tags cost anything: for each, a new DataValue is built (StatusCode =
the tag's quality, source and server timestamps) and every monitored item on the node is handed
the same DataValue synchronously (:mod:`.monitoring`; no copy, no coroutine).

asyncua has no sampling: values go straight into the monitored item queues, and a long batch
would starve the publish loops and the sockets (clients then time out with zero notifications,
seen with asyncua 2.1). So a batch is processed in slices of ``yield_ms``; between slices
control returns to
the event loop. While a batch is in progress the store sees a busy subscriber (our callback
returned a Deferred) and conflates further changes per tag, so the backlog is bounded by the
number of tags.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from twisted.internet.defer import Deferred

from iotserver.opcua.addrspace import TagSpace
from iotserver.opcua.convert import VARIANT_TYPES, make_datavalue
from iotserver.tags.model import Change, TagDef
from iotserver.tags.store import Subscription, TagStore

log = logging.getLogger("iotserver.opcua")

_CHECK_EVERY = 64  # changes between two looks at the clock


class ValuePump:
    """Keeps the tag variables' values (and so the subscriptions) in step with the store."""

    def __init__(self, store: TagStore, space: TagSpace, yield_ms: float) -> None:
        self.store = store
        self.space = space
        self.budget = yield_ms / 1000.0
        self._sub: Subscription | None = None
        self._undefine: Any = None
        self._task: asyncio.Task[None] | None = None
        self.changes = 0
        self.batches = 0
        self.slices = 0

    def start(self) -> None:
        self._sub = self.store.subscribe("**", self._on_changes, name="opcua", initial=False)
        self._undefine = self.store.on_define(self._on_define)

    async def stop(self) -> None:
        if self._sub is not None:
            self._sub.cancel()
            self._sub = None
        if self._undefine is not None:
            self._undefine()
            self._undefine = None
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _on_define(self, tag: TagDef, added: bool) -> None:
        if added:
            if self.space.add(tag, self.store.read(tag.path)):
                log.info("OPC UA: variable added for tag %s", tag.path)
        elif self.space.remove(tag.path):
            log.info("OPC UA: variable removed for tag %s", tag.path)

    def _on_changes(self, changes: list[Change]) -> Deferred[None] | None:
        """Store callback: apply what fits in one slice now, the rest in a task."""
        self.batches += 1
        done = self._apply(changes, 0)
        if done >= len(changes):
            return None
        self._task = asyncio.ensure_future(self._finish(changes, done))
        return Deferred.fromFuture(self._task)

    async def _finish(self, changes: list[Change], start: int) -> None:
        try:
            while start < len(changes):
                await asyncio.sleep(0)
                start = self._apply(changes, start)
        except asyncio.CancelledError:
            return  # stopping: the store subscription is already cancelled

    def _apply(self, changes: list[Change], start: int) -> int:
        """Handle changes from ``start`` until the slice budget is used; returns the next index.

        Only monitored tags cost anything: unmonitored variables read the store when read.
        """
        self.slices += 1
        space = self.space
        monitored = space.monitored
        n = len(changes)
        if not monitored:
            self.changes += n - start
            return n
        times = space.times
        deadline = time.perf_counter() + self.budget
        i = start
        while i < n:
            stop = min(n, i + _CHECK_EVERY)
            for j in range(i, stop):
                tag, tv = changes[j]
                attval = monitored.get(tag.path)
                if attval is None:
                    continue
                dv = make_datavalue(tag, VARIANT_TYPES[tag.data_type], tv.value, tv.quality,
                                    tv.source_ns, tv.server_ns, times)
                # every callback is a monitoring._Hook: all subscriptions are ours
                for handle, hook in attval.datachange_callbacks.items():
                    hook.sync(handle, dv)
            self.changes += stop - i
            i = stop
            if time.perf_counter() >= deadline:
                break
        return i
