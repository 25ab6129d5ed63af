"""Assembles our session layer: session table, services, dispatcher and listener.

::

    UaListener -> UaChannel (framing, HEL/ACK, secure channel)      channel.py
                    -> Dispatcher (token -> session, service table)   dispatch.py
                         -> SessionServices                          sessionsvc.py
                         -> SubscriptionServices -> Subscription      subsvc.py, subscriptions.py
                         -> IotSession (Read, Write, Browse, ...)     session.py
                  SessionTable (limits, timeouts)                     sessions.py
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from iotserver.opcua.channel import ChannelLimits, UaListener
from iotserver.opcua.dispatch import Dispatcher
from iotserver.opcua.sessions import Clock, SessionLimits, SessionTable
from iotserver.opcua.sessionsvc import SessionServices
from iotserver.opcua.subscriptions import SubscriptionRegistry
from iotserver.opcua.subsvc import SubscriptionServices

if TYPE_CHECKING:
    from iotserver.opcua.config import OpcUaConfig


def session_limits(cfg: OpcUaConfig) -> SessionLimits:
    return SessionLimits(max_sessions=cfg.max_sessions,
                         max_per_address=cfg.max_sessions_per_address,
                         max_timeout_s=cfg.max_session_timeout_s,
                         activation_timeout_s=cfg.session_activation_timeout_s,
                         max_publish_requests=cfg.max_publish_requests,
                         max_subscriptions=cfg.max_subscriptions,
                         max_retransmission_queue=cfg.max_retransmission_queue,
                         max_browse_continuation_points=cfg.max_browse_continuation_points)


def channel_limits(cfg: OpcUaConfig) -> ChannelLimits:
    return ChannelLimits(max_message_size=cfg.max_message_size,
                         max_chunk_count=cfg.max_chunk_count,
                         max_chunk_size=cfg.max_chunk_size,
                         hello_timeout_s=cfg.hello_timeout_s,
                         max_pending_requests=cfg.max_pending_requests,
                         max_connections=cfg.max_connections,
                         max_connections_per_address=cfg.max_connections_per_address)


class SessionLayer:
    """Everything between the TCP socket and the address space services."""

    def __init__(self, iserver: Any, cfg: OpcUaConfig, policies: list[Any],
                 clock: Clock) -> None:
        self.registry = SubscriptionRegistry()
        self.table = SessionTable(clock, session_limits(cfg),
                                  lambda s, d, r: self.subs.session_ended(s, d, r))
        self.subs = SubscriptionServices(self.table, self.registry, iserver.aspace,
                                         iserver.item_limits,
                                         min_interval_ms=cfg.min_publishing_interval_ms)
        self.sessions = SessionServices(
            self.table, iserver, max_request_size=cfg.max_message_size,
            # only when no secure policy is offered does the user token policy itself say
            # "no encryption": then clear-text passwords are what clients must send
            clear_text_passwords=cfg.security_policies == ("None",))
        self.dispatcher = Dispatcher(self.table, self.sessions, self.subs)
        self.listener = UaListener(self.dispatcher, self.table, iserver, policies,
                                   channel_limits(cfg))

    async def stop(self) -> None:
        self.table.stop()
        await self.listener.stop()
        for session in list(self.table):
            self.table.end(session, True, "server stopping")
        self.subs.stop()
