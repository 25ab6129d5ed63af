"""CONNECT negotiation: what a CONNECT may not ask for, and what the CONNACK grants.

Pure functions over the packet and ``LimitsConfig``; the protocol (``protocol.py``) runs the
flow (authentication in between, session attach, timers).
"""

from __future__ import annotations

import uuid
from typing import Any, NamedTuple

from iotserver.mqtt.config import LimitsConfig
from iotserver.mqtt.packets import (
    CONNACK_CODES,
    MQTT_5,
    NO_PROPERTIES,
    Connack,
    Connect,
    Properties,
    ReasonCode,
)

RC = ReasonCode
# 5.0 CONNACK codes that have a 3.1.1 return code (the codec maps them); others become 3.
V311_REFUSALS = frozenset({RC.UNSUPPORTED_PROTOCOL_VERSION, RC.CLIENT_IDENTIFIER_NOT_VALID,
                           RC.SERVER_UNAVAILABLE, RC.SERVER_BUSY, RC.BAD_USER_NAME_OR_PASSWORD,
                           RC.NOT_AUTHORIZED, RC.BANNED, RC.BAD_AUTHENTICATION_METHOD})


def refusal(p: Connect, limits: LimitsConfig, broker: Any) -> tuple[int, str] | None:
    """(reason code, text) when the CONNECT is refused before authentication, else None."""
    if broker.shutting_down:
        return RC.SERVER_UNAVAILABLE, "server shutting down"
    if len(broker.connections) > limits.max_connections:
        return RC.SERVER_BUSY, "too many connections"
    if not broker.connect_rate.allow():
        return RC.CONNECTION_RATE_EXCEEDED, "connection rate exceeded"
    v5 = p.protocol_level == MQTT_5
    if v5 and p.properties.authentication_method is not None:
        return RC.BAD_AUTHENTICATION_METHOD, "enhanced authentication is not supported"  # 4.12
    if not p.client_id and not v5 and not p.clean_start:
        return RC.CLIENT_IDENTIFIER_NOT_VALID, "empty client id needs a clean session"  # 3.1.3-8
    will = p.will
    if will is not None:
        if will.qos > limits.maximum_qos:
            return RC.QOS_NOT_SUPPORTED, "will QoS not supported"  # MQTT-3.2.2-12
        if will.retain and not limits.retain_available:
            return RC.RETAIN_NOT_SUPPORTED, "retain not supported"  # MQTT-3.2.2-13
        if will.properties.payload_format_indicator == 1 and not is_utf8(will.payload):
            return RC.PAYLOAD_FORMAT_INVALID, "will payload is not UTF-8"  # 3.1.3.2.3
    return None


def client_id_for(p: Connect) -> tuple[str, str | None]:
    """(client id, assigned id or None): an empty id gets a unique one (MQTT-3.1.3-6)."""
    if p.client_id:
        return p.client_id, None
    assigned = f"auto-{uuid.uuid4().hex}"
    return assigned, assigned


def auth_refusal_code(result: Any) -> int:
    """The CONNACK code for a refused login (Not authorized unless the authenticator says)."""
    code = getattr(result, "reason", 0)
    return code if code and code in CONNACK_CODES else RC.NOT_AUTHORIZED


class Grant(NamedTuple):
    """What the CONNACK grants: session expiry (and what was asked), keepalive to enforce."""

    expiry: int
    requested: int | None
    keepalive: int
    server_keepalive: int | None


def grant(p: Connect, limits: LimitsConfig) -> Grant:
    if p.protocol_level == MQTT_5:
        requested: int | None = p.properties.session_expiry_interval or 0
        expiry = min(requested or 0, limits.max_session_expiry)
    else:
        requested = None
        expiry = 0 if p.clean_start else limits.v311_session_expiry
    keepalive = p.keepalive
    server_keepalive = None
    if p.protocol_level == MQTT_5 and limits.max_keepalive and (
            keepalive == 0 or keepalive > limits.max_keepalive):
        keepalive = server_keepalive = limits.max_keepalive  # MQTT-3.2.2-21
    return Grant(expiry, requested, keepalive, server_keepalive)


def connack(version: int, present: bool, g: Grant, limits: LimitsConfig,
            assigned: str | None) -> Connack:
    """The accepting CONNACK; v5 announces every limit that differs from the default."""
    if version != MQTT_5:
        return Connack(present, RC.SUCCESS)
    return Connack(present, RC.SUCCESS, Properties(
        session_expiry_interval=g.expiry if g.expiry != g.requested else None,
        receive_maximum=limits.receive_maximum if limits.receive_maximum < 65535 else None,
        maximum_qos=limits.maximum_qos if limits.maximum_qos < 2 else None,
        retain_available=None if limits.retain_available else False,
        maximum_packet_size=limits.max_packet_size,
        assigned_client_identifier=assigned,
        topic_alias_maximum=limits.topic_alias_maximum or None,
        server_keep_alive=g.server_keepalive,
    ))


def refusing_connack(version: int, code: int, reason: Properties = NO_PROPERTIES) -> Connack:
    if version == MQTT_5:
        return Connack(False, code, reason)
    return Connack(False, code if code in V311_REFUSALS else RC.SERVER_UNAVAILABLE)


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
