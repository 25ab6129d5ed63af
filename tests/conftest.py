"""Shared fixtures. The reactor is the asyncio one (``--reactor=asyncio`` in pyproject addopts)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import helpers
import pytest


def _open_fds() -> set[int]:
    try:
        return {int(name) for name in os.listdir("/proc/self/fd")}
    except FileNotFoundError:  # not Linux: no fd accounting
        return set()


def _pending_tasks() -> set[asyncio.Task[object]]:
    try:
        loop = asyncio.get_event_loop_policy().get_event_loop()
    except RuntimeError:
        return set()
    return {t for t in asyncio.all_tasks(loop) if not t.done()}


@pytest.fixture(scope="session", autouse=True)
def _reactor_running() -> None:
    """Start the reactor once before any leak accounting: its own pipes are not a test's leak."""
    import pytest_twisted
    from twisted.internet import reactor, task
    from twisted.internet.protocol import Factory

    pytest_twisted.blockon(task.deferLater(reactor, 0, lambda: None))
    # The first TCP listener of a process opens /dev/null for good (Twisted's reserved fd for
    # EMFILE handling): open one here so no test is blamed for it.
    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest, _reactor_running: None) -> Iterator[None]:
    """Fail a test that leaves asyncio tasks running or file descriptors open.

    Neither pytest nor trial notices a leaked asyncio server (a listening asyncio server or a
    pending task outlives its test silently), so we count.
    A test that legitimately keeps something (a module-scoped server) opts out with
    ``@pytest.mark.allow_leaks``.
    """
    if request.node.get_closest_marker("allow_leaks"):
        yield
        return
    tasks_before = _pending_tasks()
    fds_before = _open_fds()
    yield
    leaked_tasks = _pending_tasks() - tasks_before
    if leaked_tasks:
        # give cancelled tasks one loop turn to finish before calling them leaks
        leaked_tasks = {t for t in leaked_tasks if not t.done()}
    fds_after = _open_fds()
    leaked_fds = sorted(fds_after - fds_before)
    problems = []
    if leaked_tasks:
        problems.append(f"leaked asyncio tasks: {[repr(t.get_coro()) for t in leaked_tasks]}")
    if leaked_fds:
        targets = []
        for fd in leaked_fds:
            try:
                targets.append(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
            except OSError:
                continue
        if targets:
            problems.append(f"leaked file descriptors: {targets}")
    if problems:
        pytest.fail("; ".join(problems))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_leaks: skip the task/fd leak check for this test")
    config.addinivalue_line(
        "markers", "ci_may_skip: a skip of this test is not a failure under CI=true")


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _skip_is_failure(report: pytest.CollectReport | pytest.TestReport) -> None:
    """Under CI=true a skip fails the run: every skip site is a missing peer (mosquitto,
    mosquitto_pub/sub, mbpoll, node/node-opcua, ssh, openssl), and a green CI must mean that
    every real peer ran. A test that may skip in CI for another reason is marked ci_may_skip."""
    if not (report.skipped and _ci()) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"CI=true: a skip is a failure (missing peer?): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if not item.get_closest_marker("ci_may_skip"):
        _skip_is_failure(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    _skip_is_failure(outcome.get_result())  # type: ignore[attr-defined]


@pytest.fixture
def free_port() -> int:
    """A TCP port reserved on 127.0.0.1 (see ``helpers.free_port`` for when to use one)."""
    return helpers.free_port()
