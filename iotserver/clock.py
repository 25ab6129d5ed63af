"""The part of Twisted's ``IReactorTime`` the server uses, as a typing Protocol.

Twisted declares ``IReactorTime`` with zope.interface, whose methods have no ``self``: mypy
(without the mypy-zope plugin) cannot call ``seconds()`` or ``callLater()`` through it. The
reactor and ``twisted.internet.task.Clock`` (tests) both match this Protocol structurally.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall


class Clock(Protocol):
    def seconds(self) -> float: ...

    def callLater(
        self, delay: float, callable: Callable[..., Any], /, *args: Any, **kw: Any
    ) -> IDelayedCall: ...
