"""ServerCapabilities and ServerProfileArray from the limits the server really enforces.

Part 5 6.3.2 (ServerCapabilitiesType) and 6.3.11 (OperationLimitsType): a client reads these
before it runs into a limit; 0 means "no limit" (and, for OperationLimits, that only the
message size bounds a request). Every value comes from the ``[opcua]`` configuration or the
transport's maximum message size, never a hard-coded guess:

* MaxSessions, MaxSubscriptions, MaxMonitoredItems: ``max_sessions``, ``max_subscriptions``,
  ``max_monitored_items`` (server-wide counts, refused with Bad_TooManySessions,
  Bad_TooManySubscriptions, Bad_TooManyMonitoredItems);
* MaxSubscriptionsPerSession and MaxMonitoredItemsPerSubscription: the same server-wide limits,
  which also bound what one session or one subscription can hold;
* MaxMonitoredItemsQueueSize: ``max_queue_size`` (larger QueueSize requests are revised down);
* MaxBrowseContinuationPoints: ``max_browse_continuation_points`` (per session);
* MaxArrayLength, MaxStringLength, MaxByteStringLength: the maximum message size, the only
  bound on a value's size;
* MinSupportedSampleRate 0: tag values arrive as events, a sampling interval of 0 reports every
  change; MaxHistoryContinuationPoints 0: history continuation points are stateless.

ServerProfileArray lists the transport, the configured security policies and the facets whose
services the server implements (Part 7; data access with AnalogItem/EURange/Percent deadband,
method calls, raw, at-time and aggregate history). Subscription facets are not listed: the
server has no SetTriggering, which they include.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from asyncua import ua

if TYPE_CHECKING:
    from iotserver.opcua.config import OpcUaConfig

_OID = ua.ObjectIds
_CAP = "Server_ServerCapabilities_"
_OPS = _CAP + "OperationLimits_"

TRANSPORT_PROFILE = "http://opcfoundation.org/UA-Profile/Transport/uatcp-uasc-uabinary"
SECURITY_POLICY_URI = "http://opcfoundation.org/UA/SecurityPolicy#"  # + the policy's name
FACETS = (
    "http://opcfoundation.org/UA-Profile/Server/DataAccess",
    "http://opcfoundation.org/UA-Profile/Server/Methods",
    "http://opcfoundation.org/UA-Profile/Server/HistoricalRawData",
    "http://opcfoundation.org/UA-Profile/Server/HistoricalDataAtTime",
    "http://opcfoundation.org/UA-Profile/Server/AggregateHistorical",
)
# Services whose request size only the message size limits (OperationLimits, Part 5 6.3.11)
_UNLIMITED_OPERATIONS = (
    "MaxNodesPerRead", "MaxNodesPerHistoryReadData", "MaxNodesPerHistoryReadEvents",
    "MaxNodesPerWrite", "MaxNodesPerHistoryUpdateData", "MaxNodesPerHistoryUpdateEvents",
    "MaxNodesPerMethodCall", "MaxNodesPerBrowse", "MaxNodesPerRegisterNodes",
    "MaxNodesPerTranslateBrowsePathsToNodeIds", "MaxNodesPerNodeManagement",
    "MaxMonitoredItemsPerCall",
)


def server_profiles(cfg: OpcUaConfig) -> list[str]:
    """ServerProfileArray: transport, security policies offered, implemented facets."""
    return [TRANSPORT_PROFILE, *(SECURITY_POLICY_URI + p for p in cfg.security_policies),
            *FACETS]


def capabilities(cfg: OpcUaConfig, max_message_size: int
                 ) -> dict[int, tuple[Any, ua.VariantType]]:
    """NodeId (ns=0) -> (value, type) of every ServerCapabilities variable we fill."""
    u32, u16 = ua.VariantType.UInt32, ua.VariantType.UInt16
    size = min(int(max_message_size), 0xFFFFFFFF)

    def cap(name: str) -> int:
        return int(getattr(_OID, _CAP + name))

    out: dict[int, tuple[Any, ua.VariantType]] = {
        cap("MaxSessions"): (cfg.max_sessions, u32),
        cap("MaxSubscriptions"): (cfg.max_subscriptions, u32),
        cap("MaxMonitoredItems"): (cfg.max_monitored_items, u32),
        cap("MaxSubscriptionsPerSession"): (cfg.max_subscriptions, u32),
        cap("MaxMonitoredItemsPerSubscription"): (cfg.max_monitored_items, u32),
        cap("MaxMonitoredItemsQueueSize"): (cfg.max_queue_size, u32),
        cap("MaxBrowseContinuationPoints"): (cfg.max_browse_continuation_points, u16),
        cap("MaxHistoryContinuationPoints"): (0, u16),
        cap("MaxQueryContinuationPoints"): (0, u16),  # no Query service
        cap("MaxArrayLength"): (size, u32),
        cap("MaxStringLength"): (size, u32),
        cap("MaxByteStringLength"): (size, u32),
        cap("MinSupportedSampleRate"): (0.0, ua.VariantType.Double),
        cap("MaxSelectClauseParameters"): (0, u32),
        cap("MaxWhereClauseParameters"): (0, u32),
        cap("LocaleIdArray"): (["en"], ua.VariantType.String),
        cap("ServerProfileArray"): (server_profiles(cfg), ua.VariantType.String),
    }
    for name in _UNLIMITED_OPERATIONS:
        out[int(getattr(_OID, _OPS + name))] = (0, u32)
    return out
