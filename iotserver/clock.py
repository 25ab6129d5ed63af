"""The part of Twisted's ``IReactorTime`` the server uses, as a typing Protocol.

Twisted declares ``IReactorTime`` with zope.interface, whose methods have no ``self``: mypy
(without the mypy-zope plugin) cannot call ``seconds()`` or ``callLater()`` through it. The
reactor and ``twisted.internet.task.Clock`` (tests) both match this Protocol structurally.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall


class Clock(Protocol):
    def seconds(self) -> float: ...

    def callLater(
        self, delay: float, callable: Callable[..., Any], /, *args: Any, **kw: Any
    ) -> IDelayedCall: ...


class LoopClock:
    """:class:`Clock` over an asyncio loop's monotonic time (the reactor's loop in the server).

    Not the reactor itself: its ``seconds()`` is wall time, and a wall clock stepped back by an
    hour would hold a timer (a session timeout, a waiting sample) for that hour.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def seconds(self) -> float:
        return self._loop.time()

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any) -> Any:
        return self._loop.call_later(delay, f, *args)
