"""Helpers shared by the test modules (test modules import these, never each other).

* :func:`wait_for` / :func:`wait_for_aio` / :func:`wait_for_sync`: a bounded wait for a
  condition, for Twisted-style coroutines, asyncio coroutines and blocking code (threads,
  subprocesses). Tests synchronise on these, never on a fixed sleep.
* :func:`aio`: await asyncio code from a Twisted-style test.
* :func:`sleep`: a deliberate delay, for the few tests where the passing of time is what is
  tested (a peer that goes silent); such a test then waits for a condition.
* :func:`free_port`: a port reserved for peers that need it before they start.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred

# Generous: the suite runs on two cores shared with other work. A wait returns as soon as its
# condition holds, so a large bound costs nothing when things work.
TIMEOUT = 20.0
INTERVAL = 0.01


def _fail(what: str, timeout: float) -> AssertionError:
    return AssertionError(f"timed out after {timeout} s waiting for {what}")


def _describe(condition: Callable[[], object], what: str) -> str:
    return what or getattr(condition, "__name__", "a condition")


async def wait_for(condition: Callable[[], object], timeout: float = TIMEOUT,
                   what: str = "", interval: float = INTERVAL) -> Any:
    """Wait (Twisted-style coroutine) until ``condition()`` is truthy and return that value;
    fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise _fail(_describe(condition, what), timeout)
        await sleep(interval)
    return result


async def wait_for_aio(condition: Callable[[], object], timeout: float = TIMEOUT,
                       what: str = "", interval: float = INTERVAL) -> Any:
    """The same for asyncio coroutines (asyncua clients, code run through ``aio``); the
    condition may also return an awaitable (a client read), which is awaited each time."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise _fail(_describe(condition, what), timeout)
        await asyncio.sleep(interval)


def wait_for_sync(condition: Callable[[], object], timeout: float = TIMEOUT,
                  what: str = "", interval: float = INTERVAL) -> Any:
    """The same for blocking code (a thread's client library, a subprocess)."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise _fail(_describe(condition, what), timeout)
        time.sleep(interval)
    return result


def aio(coro: Coroutine[Any, Any, Any]) -> Deferred[Any]:
    """Await asyncio code (asyncua, pymodbus) from a Twisted-style test.

    A Twisted coroutine cannot await an asyncio future directly ("await wasn't used with
    future"): run it as an asyncio task and wrap that in a Deferred.
    """
    return Deferred.fromFuture(asyncio.ensure_future(coro))


def sleep(seconds: float) -> Deferred[None]:
    """A deliberate delay on the reactor: only where elapsed time is itself what is tested."""
    from twisted.internet import reactor  # not at import: conftest imports this module before
    # pytest-twisted installs the asyncio reactor

    return task.deferLater(reactor, seconds, lambda: None)


def free_port(host: str = "127.0.0.1") -> int:
    """Reserve a port that is free on ``host`` now (bind port 0, read it, release it).

    Only for servers that must know their port before they start: a peer we run as a
    subprocess (mosquitto, twistd, python -m iotserver) takes it on its command line or in its
    config, and an OPC UA endpoint URL carries it because the server advertises that URL to
    clients (GetEndpoints). Anything we start in-process on a Twisted endpoint listens on port 0
    instead and reads ``getHost().port`` back.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
