"""asyncua's Server with our binary publish path.

Two changes per connection: ``forward_publish_response`` encodes the PublishResponse with
:func:`iotserver.opcua.fastenc.encode_publish_response` (values encoded once for all clients)
instead of asyncua's generic serializer, and BrowseNext is dispatched (``browse.py``).
Everything else is asyncua's.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from asyncua import Server, ua
from asyncua.ua.ua_binary import struct_from_binary
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
from asyncua.server.uaprocessor import PublishRequestData, UaProcessor

from iotserver.opcua.fastenc import encode_publish_response
from iotserver.opcua.security import precheck_activation

log = logging.getLogger("iotserver.opcua")


async def _forward_publish_response(self: UaProcessor, result: ua.PublishResult,
                                    requestdata: PublishRequestData) -> None:
    """UaProcessor.forward_publish_response with the fast encoder."""
    response = ua.PublishResponse()
    response.Parameters = result
    result.Results = requestdata.results
    response.ResponseHeader.RequestHandle = requestdata.requesthdr.RequestHandle
    data = self._connection.message_to_binary(
        encode_publish_response(response), message_type=ua.MessageType.SecureMessage,
        request_id=requestdata.seqhdr.RequestId)
    self._transport.write(data)


_BROWSE_NEXT = ua.NodeId(ua.ObjectIds.BrowseNextRequest_Encoding_DefaultBinary)


def _with_browse_next(processor: UaProcessor) -> Any:
    """The processor's request dispatch plus BrowseNext, which asyncua's lacks (it answers
    Bad_ServiceUnsupported). The session and permission checks are asyncua's own: a
    BrowseNext without a session, or one the policy refuses, goes to the original dispatch,
    which refuses it as it refuses any request."""
    original = processor._process_message

    async def process_message(typeid: ua.NodeId, requesthdr: Any, seqhdr: Any, body: Any) -> bool:
        session = processor.session
        permissions = processor._connection.security_policy.permissions
        if typeid != _BROWSE_NEXT or session is None or (
                permissions is not None
                and permissions.check_validity(session.user, typeid, body) is False):
            return bool(await original(typeid, requesthdr, seqhdr, body))
        processor.session_last_activity = time.monotonic()
        session.touch()
        params = struct_from_binary(ua.BrowseNextParameters, body)
        response = ua.BrowseNextResponse()
        response.Parameters.Results = await session.browse_next(params)
        processor.send_response(requesthdr.RequestHandle, seqhdr, response)
        return True

    return process_message


class IotProtocol(OPCUAProtocol):  # type: ignore[misc]  # asyncua is untyped
    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        processor = self.processor
        if processor is not None:
            processor.forward_publish_response = (
                _forward_publish_response.__get__(processor))
            processor._process_message = precheck_activation(  # passwords off the loop
                processor, _with_browse_next(processor))


class IotBinaryServer(BinaryServer):  # type: ignore[misc]  # asyncua is untyped
    def _make_protocol(self) -> OPCUAProtocol:
        return IotProtocol(iserver=self.iserver, policies=self._policies, clients=self.clients,
                           closing_tasks=self.closing_tasks, limits=self.limits)


class IotUaServer(Server):  # type: ignore[misc]  # asyncua is untyped
    """asyncua Server whose listener is :class:`IotBinaryServer`, sending its issuer chain.

    Part 6 6.7.2: a certificate issued by a CA travels with its chain (SenderCertificate and the
    endpoints' ServerCertificate), or clients cannot verify it (node-opcua:
    Bad_CertificateChainIncomplete). asyncua can send a chain but its Server never passes one.
    """

    certificate_chain: list[Any] = []

    async def _setup_server_nodes(self) -> None:
        await super()._setup_server_nodes()
        if not self.certificate_chain:
            return
        from asyncua.crypto import uacrypto

        for factory in self._policies:
            factory.certificate_chain = self.certificate_chain
        chain = b"".join(uacrypto.der_from_x509(c) for c in self.certificate_chain)
        for edp in self.iserver.endpoints:
            if edp.ServerCertificate:
                edp.ServerCertificate = edp.ServerCertificate + chain

    async def start(self) -> None:
        # Server.start, with our BinaryServer
        await self._setup_server_nodes()
        await self.iserver.start()
        try:
            host, port = self._get_bind_socket_info()
            self.bserver = IotBinaryServer(self.iserver, host, port, self.limits)
            self.bserver.set_policies(self._policies)
            await self.bserver.start()
        except Exception:
            await self.iserver.stop()
            raise
