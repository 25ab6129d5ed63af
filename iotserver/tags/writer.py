"""Who wrote a tag, and where the store reports it: protocol-neutral.

Every endpoint passes a :class:`Writer` to :meth:`TagStore.write`; the store hands each write's
outcome to its :class:`AuditSink` (if one is attached), which knows nothing of any protocol
either. The audit file writer lives in :mod:`iotserver.security.audit`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from iotserver.tags.model import Quality


@dataclass(frozen=True, slots=True)
class Writer:
    """The identity behind a write.

    ``principal``: the user name (``""`` when anonymous or unknown: a Modbus client without
    TLS is only an address); ``protocol``: the door it came through (``mqtt``, ``modbus``,
    ``opcua``, ``console``...); ``peer``: the client's address (``host:port``) when known.
    """

    principal: str = ""
    protocol: str = ""
    peer: str = ""

    def __str__(self) -> str:
        who = self.principal or "anonymous"
        where = " ".join(p for p in (self.protocol, self.peer) if p)
        return f"{who} ({where})" if where else who


UNKNOWN_WRITER = Writer()


class AuditSink(Protocol):
    """Receives every write's outcome. Called on the event loop, once per write, on the
    protocols' fast paths: it must only queue the record (no I/O, no formatting)."""

    def write_done(self, writer: Writer, path: str, value: Any, quality: Quality) -> None: ...
