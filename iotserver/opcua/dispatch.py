"""Service dispatch: every request goes to the session its AuthenticationToken names.

:class:`Dispatcher` decodes a request's type and RequestHeader, finds its session in the
:class:`~iotserver.opcua.sessions.SessionTable` and calls the service (Part 4 5.6-5.13):

* without a session: CreateSession, ActivateSession, GetEndpoints, FindServers;
* every other request needs the token of an activated session *bound to this channel*:
  an unknown or closed token is Bad_SessionIdInvalid, a session that is not activated
  Bad_SessionNotActivated, a session of another channel Bad_SecureChannelIdInvalid (Part 4
  5.6.3.1: only ActivateSession moves a session to a new channel);
* the session services (``sessionsvc.py``) and the subscription services (``subsvc.py``) are
  ours; the address space services (Read, Write, Browse, BrowseNext, TranslateBrowsePaths,
  Call, HistoryRead) go to the session's :class:`~iotserver.opcua.session.IotSession`, our
  services over asyncua's address space.

A handler returns the response object, or None when it answers later (Publish).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, UTC
from typing import TYPE_CHECKING, Any

from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.ua.ua_binary import nodeid_from_binary, struct_from_binary, struct_to_binary

from iotserver.opcua.convert import status
from iotserver.opcua.sessionsvc import SessionServices
from iotserver.opcua.subsvc import SubscriptionServices

if TYPE_CHECKING:
    from iotserver.opcua.sessions import Channel, Session, SessionTable

log = logging.getLogger("iotserver.opcua")
OBJECT_IDS = ua.ObjectIds

Handler = Callable[["Request"], Awaitable[Any]]


class Request:
    """One decoded request: where it came from and its header."""

    __slots__ = ("channel", "request_id", "type_id", "header", "body", "session")

    def __init__(self, channel: Channel, request_id: int, type_id: ua.NodeId,
                 header: ua.RequestHeader, body: Any) -> None:
        self.channel = channel
        self.request_id = request_id
        self.type_id = type_id
        self.header = header
        self.body = body
        self.session: Session | None = None

    def params(self, cls: type) -> Any:
        return struct_from_binary(cls, self.body)


def _id(name: str) -> int:
    return int(getattr(OBJECT_IDS, f"{name}Request_Encoding_DefaultBinary"))


NO_SESSION = frozenset(_id(n) for n in ("CreateSession", "ActivateSession", "GetEndpoints",
                                        "FindServers"))
_CLOSE = _id("CloseSession")
# Part 4 5.7: node management is not offered to clients (the address space is the tag store)
REFUSED = frozenset(_id(n) for n in ("AddNodes", "DeleteNodes", "AddReferences",
                                     "DeleteReferences", "HistoryUpdate"))


class Dispatcher:
    """Routes requests (see the module docstring)."""

    def __init__(self, table: SessionTable, sessions: SessionServices,
                 subscriptions: SubscriptionServices) -> None:
        self.table = table
        self.sessions = sessions
        self.subs = subscriptions
        self.requests = 0
        self.faults = 0
        s, sub = sessions, subscriptions
        self.handlers: dict[int, Handler] = {
            _id("CreateSession"): s.create_session,
            _id("ActivateSession"): s.activate_session,
            _id("CloseSession"): s.close_session,
            _id("Cancel"): self.cancel,
            _id("GetEndpoints"): s.get_endpoints,
            _id("FindServers"): s.find_servers,
            _id("Read"): self.read,
            _id("Write"): self.write,
            _id("Browse"): self.browse,
            _id("BrowseNext"): self.browse_next,
            _id("TranslateBrowsePathsToNodeIds"): self.translate,
            _id("RegisterNodes"): self.register_nodes,
            _id("UnregisterNodes"): self.unregister_nodes,
            _id("Call"): self.call,
            _id("HistoryRead"): self.history_read,
            _id("CreateSubscription"): sub.create_subscription,
            _id("ModifySubscription"): sub.modify_subscription,
            _id("SetPublishingMode"): sub.set_publishing_mode,
            _id("DeleteSubscriptions"): sub.delete_subscriptions,
            _id("TransferSubscriptions"): sub.transfer_subscriptions,
            _id("Publish"): sub.publish,
            _id("Republish"): sub.republish,
            _id("CreateMonitoredItems"): sub.create_monitored_items,
            _id("ModifyMonitoredItems"): sub.modify_monitored_items,
            _id("DeleteMonitoredItems"): sub.delete_monitored_items,
            _id("SetMonitoringMode"): sub.set_monitoring_mode,
        }

    async def dispatch(self, channel: Channel, request_id: int, body: Any) -> None:
        """Serve one request (a reassembled MSG body) and send its answer on ``channel``."""
        type_id = nodeid_from_binary(body)
        header = struct_from_binary(ua.RequestHeader, body)
        request = Request(channel, request_id, type_id, header, body)
        self.requests += 1
        try:
            response = await self._serve(request)
        except (ServiceError, ua.UaStatusCodeError) as exc:
            self._fault(request, int(exc.code))
            return
        except Exception:
            log.exception("OPC UA: %s failed", _name(type_id))
            self._fault(request, ua.StatusCodes.BadInternalError)
            return
        if response is not None:
            self.reply(request, response)

    async def _serve(self, request: Request) -> Any:
        tid = request.type_id
        ident = tid.Identifier if tid.NamespaceIndex == 0 and isinstance(tid.Identifier, int) \
            else None
        handler = self.handlers.get(ident) if ident is not None else None
        if ident in NO_SESSION:
            assert handler is not None
            return await handler(request)
        session = self.table.get(request.header.AuthenticationToken)
        if session is None or session.closed:
            raise ServiceError(ua.StatusCodes.BadSessionIdInvalid)  # Part 4 5.6.2
        if not session.activated and ident != _CLOSE:
            raise ServiceError(ua.StatusCodes.BadSessionNotActivated)
        if session.channel is not request.channel:
            # Part 4 5.6.3.1: a session is bound to one channel; only ActivateSession moves it
            raise ServiceError(ua.StatusCodes.BadSecureChannelIdInvalid)
        session.last_activity = self.table.clock.seconds()
        request.session = session
        if ident in REFUSED:
            raise ServiceError(ua.StatusCodes.BadUserAccessDenied)
        if handler is None:
            log.info("OPC UA: unsupported service %s from %s", _name(tid), session)
            raise ServiceError(ua.StatusCodes.BadServiceUnsupported)
        return await handler(request)

    def reply(self, request: Request, response: Any) -> None:
        header = response.ResponseHeader
        header.RequestHandle = request.header.RequestHandle
        header.Timestamp = datetime.now(UTC)
        if request.channel.is_open:
            request.channel.send(request.request_id, struct_to_binary(response))

    def _fault(self, request: Request, code: int) -> None:
        self.faults += 1
        fault = ua.ServiceFault()
        fault.ResponseHeader.ServiceResult = status(code)
        log.debug("OPC UA: %s -> %s", _name(request.type_id), ua.StatusCode(code).name)
        self.reply(request, fault)

    # -- Cancel (Part 4 5.6.5): queued Publish requests are what can wait ------------------------
    async def cancel(self, request: Request) -> Any:
        handle = request.params(ua.CancelParameters).RequestHandle
        session = request.session
        assert session is not None
        cancelled = [p for p in session.publish_queue if p.handle == handle]
        for p in cancelled:
            session.publish_queue.remove(p)
            self.subs.fault(p, ua.StatusCodes.BadRequestCancelledByClient)
        response = ua.CancelResponse()
        response.Parameters.CancelCount = len(cancelled)
        return response

    # -- address space services ------------------------------------------------------------
    @staticmethod
    def _svc(request: Request) -> Any:
        assert request.session is not None
        return request.session.services

    async def read(self, request: Request) -> Any:
        params = request.params(ua.ReadParameters)
        if params.MaxAge < 0:
            raise ServiceError(ua.StatusCodes.BadMaxAgeInvalid)  # Part 4 5.11.2.2
        if not params.NodesToRead:
            raise ServiceError(ua.StatusCodes.BadNothingToDo)
        response = ua.ReadResponse()
        response.Results = await self._svc(request).read(params)
        return response

    async def write(self, request: Request) -> Any:
        params = request.params(ua.WriteParameters)
        if not params.NodesToWrite:
            raise ServiceError(ua.StatusCodes.BadNothingToDo)
        response = ua.WriteResponse()
        response.Results = await self._svc(request).write(params)
        return response

    async def browse(self, request: Request) -> Any:
        params = request.params(ua.BrowseParameters)
        if not params.NodesToBrowse:
            raise ServiceError(ua.StatusCodes.BadNothingToDo)
        response = ua.BrowseResponse()
        response.Results = await self._svc(request).browse(params)
        return response

    async def browse_next(self, request: Request) -> Any:
        response = ua.BrowseNextResponse()
        response.Parameters.Results = await self._svc(request).browse_next(
            request.params(ua.BrowseNextParameters))
        return response

    async def translate(self, request: Request) -> Any:
        params = request.params(ua.TranslateBrowsePathsToNodeIdsParameters)
        response = ua.TranslateBrowsePathsToNodeIdsResponse()
        response.Results = await self._svc(request).translate_browsepaths_to_nodeids(
            params.BrowsePaths)
        return response

    async def register_nodes(self, request: Request) -> Any:
        # Part 4 5.8.5: registering is an optimisation hint; the NodeIds stay valid as they are
        params = request.params(ua.RegisterNodesParameters)
        response = ua.RegisterNodesResponse()
        response.Parameters.RegisteredNodeIds = params.NodesToRegister
        return response

    async def unregister_nodes(self, request: Request) -> Any:
        request.params(ua.UnregisterNodesParameters)
        return ua.UnregisterNodesResponse()

    async def call(self, request: Request) -> Any:
        params = request.params(ua.CallParameters)
        if not params.MethodsToCall:
            raise ServiceError(ua.StatusCodes.BadNothingToDo)
        response = ua.CallResponse()
        response.Results = await self._svc(request).call(params.MethodsToCall)
        return response

    async def history_read(self, request: Request) -> Any:
        params = request.params(ua.HistoryReadParameters)
        response = ua.HistoryReadResponse()
        response.Results = await self._svc(request).history_read(params)
        return response


def _name(type_id: ua.NodeId) -> str:
    ident = type_id.Identifier
    for name in dir(OBJECT_IDS):
        if name.endswith("Request_Encoding_DefaultBinary") and getattr(OBJECT_IDS, name) == ident:
            return name[: -len("Request_Encoding_DefaultBinary")]
    return str(type_id)
