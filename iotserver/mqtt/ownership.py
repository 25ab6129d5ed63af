"""Who a session belongs to, and what it may still deliver when it changes hands.

A session is created by an authenticated user and belongs to that user (MQTT-3.1.2-4 ties
the session to the client id; the server's authorization rule ties the client id's state to
the identity that made it). When another user connects with the same client id:

- the old session ends: its subscriptions, queued and in-flight messages are discarded, and
  its will is published under its owner's rights (a session that ends publishes its will,
  MQTT-3.1.3-9), never under the newcomer's;
- the newcomer gets a fresh session (CONNACK Session Present 0), and the change is logged.

When a session is resumed by its own user, messages queued for it were checked against the
ACL when they were routed; the rules (or the user's role) may have changed since, so what is
still queued is checked again before anything is sent (``purge_unreadable``), and again when
the ACL is reloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from iotserver.mqtt.session import RELEASED, Session

log = Logger(namespace="iotserver.mqtt")


def owner_name(user: str | None) -> str:
    return user if user is not None else "anonymous"


def log_new_owner(client_id: str, old_user: str | None, new_user: str | None,
                  connected: bool) -> None:
    log.warn("MQTT: client id {cid!r} belongs to a session of {old}; {new} connected with it "
             "and starts a fresh session, the session of {old} ends{how}",
             cid=client_id, old=owner_name(old_user), new=owner_name(new_user),
             how=" (its connection is closed)" if connected else "")


def purge_unreadable(session: Session, may_read: Callable[[str], bool], stats: Any, *,
                     inflight: bool = True) -> int:
    """Drop what ``session`` holds for topics its user may no longer read: queued messages,
    last-value messages and, with ``inflight`` (a new connection, which would get them
    again), unacknowledged PUBLISHes (not yet released QoS 2 ones too: their packet ids stay
    reserved, the client may still hold them). PUBRELs stay (no content). On the connection
    that already has them, in-flight messages are left to their acknowledgement. Returns the
    number dropped."""
    dropped = 0
    for pid, d in list(session.inflight.items()) if inflight else ():
        if d.state != RELEASED and not may_read(d.msg.topic):
            del session.inflight[pid]
            if d.qos == 2:
                session.reserved.add(pid)  # MQTT-2.2.1-4: not reused while it may be held
            session._removed(d)
            dropped += 1
    if session.queue:
        kept = []
        for d in session.queue:
            if may_read(d.msg.topic):
                kept.append(d)
                continue
            dropped += 1
            session.queued_bytes -= d.size
            if d.qos == 0:
                session.queued_qos0 -= 1
            else:
                session.reserved.discard(d.pid)
                session._removed(d)
        if len(kept) != len(session.queue):
            session.queue.clear()
            session.queue.extend(kept)
    for topic in [t for t in session.latest if not may_read(t)]:
        session.latest_bytes -= session.latest.pop(topic).size
        dropped += 1
    if dropped:
        stats.dropped["not_authorized"] += dropped
        log.info("MQTT: {n} messages queued for {cid!r} dropped: {user} may no longer read "
                 "their topics", n=dropped, cid=session.client_id,
                 user=owner_name(session.user))
    return dropped
