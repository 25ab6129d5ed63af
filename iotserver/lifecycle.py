"""Service base classes with Deferred-returning, idempotent start and stop.

Twisted's ``MultiService`` ignores what ``startService`` returns, so an asynchronous start (an
asyncua server, a listener that may fail to bind) is tracked in ``self.started``; ``stopService``
waits for it to settle, then stops whatever did start. Stop is idempotent and safe after a failed
or half-finished start.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="iotserver")


class StartupError(Exception):
    """A subsystem could not start for a reason the user can act on (port in use, bad cert...)."""


def as_deferred(coro: Any) -> Deferred[Any]:
    """Run an asyncio coroutine on the running loop and return a Deferred for its result."""
    return Deferred.fromFuture(asyncio.ensure_future(coro))


class AsyncService(Service):
    """A service whose start and stop are coroutines (via ``Deferred.fromCoroutine``).

    Inside them, await Deferreds directly and asyncio code through ``as_deferred(coro)``
    (mixing the two styles raises RuntimeError: "await wasn't used with future" or "Task got
    bad yield").

    Subclasses implement ``async def start(self)`` and ``async def stop(self)``; ``stop`` must cope
    with a partial start. A failed start calls ``on_start_failure`` (the application stops the
    reactor with a clear message: half a server is worse than none).
    """

    on_start_failure: Callable[[AsyncService, Failure], None] | None = None

    def __init__(self) -> None:
        self.started: Deferred[None] | None = None
        self.failure: Failure | None = None
        self._stopping: Deferred[None] | None = None

    async def start(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    async def stop(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def startService(self) -> None:
        super().startService()
        self._stopping = None
        self.started = Deferred.fromCoroutine(self.start())
        self.started.addErrback(self._start_failed)

    def _start_failed(self, failure: Failure) -> None:
        self.failure = failure
        if self.on_start_failure is not None:
            self.on_start_failure(self, failure)
        else:
            log.failure("{name} failed to start", failure, name=self.name)

    def stopService(self) -> Deferred[None]:
        if self._stopping is not None:
            return self._stopping
        super().stopService()
        started = self.started if self.started is not None else succeed(None)

        async def _stop() -> None:
            if not started.called:
                started.cancel()
            with contextlib.suppress(BaseException):  # reported when it happened
                await started
            await self.stop()

        self._stopping = Deferred.fromCoroutine(_stop())
        self._stopping.addErrback(
            lambda f: log.failure("{name} did not stop cleanly", f, name=self.name)
        )
        return self._stopping
