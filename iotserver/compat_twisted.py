"""Every use of Twisted internals, in one place, checked when this module is imported.

The Modbus server's fast paths (``[modbus.server] fast_paths``) skip two layers of Twisted on
plain TCP connections under the asyncio reactor:

- reading: the asyncio loop calls the protocol itself when the socket is readable, instead of
  going through ``log.callWithLogger``, the reactor's ``_readOrWrite`` and
  ``Connection.doRead`` (about as much CPU per request as answering it). This needs the
  reactor's ``_asyncioEventloop`` and ``_readers`` (the descriptor it registered),
  ``_readOrWrite`` (the normal way, for an unexpected event) and ``_disconnectSelectable``
  (connection loss reported as Twisted reports it);
- writing: a reply is sent with ``socket.send`` while the transport's buffers
  (``dataBuffer``, ``_tempDataBuffer``) are empty, instead of buffering it until the next
  reactor turn.

The asyncio loop itself (``_asyncioEventloop``) also serves SIGHUP handling (``tap.py``).
None of these is public API. If one of them is gone (a Twisted release changed it),
:data:`PROBLEM` says which, naming the Twisted version; the fast paths are then off and the
server takes the normal, public way (the Modbus server logs that line at startup).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import twisted
from twisted.internet import abstract, tcp

__all__ = ["AVAILABLE", "PROBLEM", "DirectReader", "event_loop", "hook_reader", "send_now"]


def _check() -> str:
    missing: list[str] = []
    try:
        from twisted.internet.asyncioreactor import AsyncioSelectorReactor
    except ImportError:  # pragma: no cover - part of every Twisted we support
        return f"Twisted {twisted.__version__} has no asyncio reactor"
    init_names = AsyncioSelectorReactor.__init__.__code__.co_names
    for name in ("_asyncioEventloop", "_readers"):
        if name not in init_names:
            missing.append(f"AsyncioSelectorReactor.{name}")
    for name in ("_readOrWrite", "_disconnectSelectable"):
        if not callable(getattr(AsyncioSelectorReactor, name, None)):
            missing.append(f"AsyncioSelectorReactor.{name}()")
    if not isinstance(getattr(abstract.FileDescriptor, "dataBuffer", None), bytes):
        missing.append("FileDescriptor.dataBuffer")
    if "_tempDataBuffer" not in abstract.FileDescriptor.__init__.__code__.co_names:
        missing.append("FileDescriptor._tempDataBuffer")
    if not callable(getattr(tcp.Connection, "fileno", None)):
        missing.append("tcp.Connection.fileno()")
    if not missing:
        return ""
    return (f"Twisted {twisted.__version__} lacks {', '.join(missing)}: the Modbus server's "
            "fast paths are off")


PROBLEM = _check()
AVAILABLE = not PROBLEM


def event_loop(reactor: Any) -> Any:
    """The asyncio loop under the asyncio reactor (``_asyncioEventloop``), else None."""
    return getattr(reactor, "_asyncioEventloop", None)


class DirectReader:
    """A plain TCP connection whose readable events the asyncio loop hands to ``callback``."""

    __slots__ = ("_reactor", "recv", "transport")

    def __init__(self, transport: Any, reactor: Any) -> None:
        self.transport = transport
        self._reactor = reactor
        self.recv: Callable[[int], bytes] = transport.socket.recv

    def normal_read(self) -> None:
        """What the reactor would have done with this readable event."""
        from twisted.python.log import callWithLogger

        t = self.transport
        callWithLogger(t, self._reactor._readOrWrite, t, True)

    def lost(self, why: Any) -> None:
        """Report the connection lost (``why``: CONNECTION_DONE, CONNECTION_LOST, an error)."""
        self._reactor._disconnectSelectable(self.transport, why, True)


def hook_reader(transport: Any, callback: Callable[[], None]) -> DirectReader | None:
    """Have the asyncio loop call ``callback`` when ``transport``'s socket is readable.

    Only for a plain ``tcp.Connection`` the asyncio reactor is reading; None (and nothing
    changed) otherwise. Twisted's own bookkeeping stays: ``stopReading`` (pause, close, loss)
    removes the descriptor from the loop as usual, and a later ``startReading`` registers the
    normal callback again (call this again after a resume).
    """
    if not AVAILABLE or not isinstance(transport, tcp.Connection):
        return None
    t: Any = transport
    reactor = getattr(t, "reactor", None)
    loop = getattr(reactor, "_asyncioEventloop", None)
    readers = getattr(reactor, "_readers", None)
    if loop is None or type(readers) is not dict or t.disconnecting or not t.connected:
        return None
    fd = readers.get(t)
    if fd is None or fd != t.fileno():  # not reading, or polled by other means
        return None
    reader = DirectReader(t, reactor)
    loop.add_reader(fd, callback)
    return reader


def send_now(transport: Any, data: bytes) -> None:
    """Write ``data``: straight to the socket while the transport's buffers are empty.

    Twisted's ``write`` only buffers and sends on the next reactor turn (an epoll_ctl pair and
    a loop iteration per reply). ``socket.send`` is called directly (what ``writeSomeData``
    does, minus a slice and a retry wrapper that PEP 475 made redundant); whatever is not
    sent, and anything unusual, is left to ``write``, which keeps the order.
    """
    t = transport
    if not t.dataBuffer and not t._tempDataBuffer and t.connected and not t.disconnecting:
        try:
            sent = t.socket.send(data)
        except OSError:  # EWOULDBLOCK, or a dead connection that Twisted will report
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    t.write(data)
