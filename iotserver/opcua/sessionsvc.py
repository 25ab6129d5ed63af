"""The session services: CreateSession, ActivateSession, CloseSession, GetEndpoints (Part 4 5.6).

Security rules applied here:

* SecurityPolicy None: the ClientCertificate is ignored, neither validated nor kept (Part 4
  5.6.2.2: "If the securityPolicyUri is None, the Server shall ignore the ClientCertificate").
  node-opcua always sends one.
* Otherwise the certificate is validated (trust list) and the ClientSignature checked over our
  certificate and the last server nonce (Part 4 5.6.3.1).
* ActivateSession from a channel other than the session's (Part 4 5.6.3.1 / 5.7.3): the new
  channel's client certificate must be the one the session was created with, and the user
  identity the same as the session's; otherwise it is refused (Bad_SecurityChecksFailed /
  Bad_IdentityChangeNotSupported), logged and counted, and the session is untouched.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
from typing import TYPE_CHECKING, Any

from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.uacrypto import x509
from asyncua.ua.ua_binary import Primitives
from twisted.internet.defer import Deferred

from iotserver.opcua.security import IotUserManager, role_of
from iotserver.opcua.sessions import Identity

if TYPE_CHECKING:
    from iotserver.opcua.dispatch import Request
    from iotserver.opcua.sessions import SessionTable

log = logging.getLogger("iotserver.opcua")
NONE_URI = "http://opcfoundation.org/UA/SecurityPolicy#None"


def _is_none(policy_uri: str) -> bool:
    return not policy_uri or policy_uri == NONE_URI


def leaf(der: bytes | None) -> bytes:
    """The first certificate of a DER chain (Part 6 6.2.3: a chain is concatenated DER)."""
    if not der:
        return b""
    der = bytes(der)
    if len(der) < 4 or der[0] != 0x30:
        return der
    first = der[1]
    if first < 0x80:
        return der[: 2 + first]
    n = first & 0x7F
    return der[: 2 + n + int.from_bytes(der[2:2 + n], "big")]


class SessionServices:
    """Session services over the table and asyncua's InternalServer (endpoints, user tokens)."""

    def __init__(self, table: SessionTable, iserver: Any, *, max_request_size: int,
                 clear_text_passwords: bool) -> None:
        self.table = table
        self.iserver = iserver
        self.max_request_size = max_request_size
        self.clear_text_passwords = clear_text_passwords

    # -- CreateSession (Part 4 5.6.2) ----------------------------------------------------------
    async def create_session(self, request: Request) -> Any:
        params = request.params(ua.CreateSessionParameters)
        channel = request.channel
        policy = channel.policy
        client_cert: bytes | None = None
        if not _is_none(channel.policy_uri):
            client_cert = params.ClientCertificate or None
            if client_cert is None:
                raise ServiceError(ua.StatusCodes.BadCertificateInvalid)
            if channel.peer_certificate is not None and \
                    leaf(client_cert) != leaf(channel.peer_certificate):
                # the certificate of the session is the one of its secure channel
                raise ServiceError(ua.StatusCodes.BadCertificateInvalid)
            validator = self.iserver.certificate_validator
            if validator is not None:
                await validator(x509.load_der_x509_certificate(leaf(client_cert)),
                                params.ClientDescription)
        session = self.table.create(channel, params.SessionName or "",
                                    float(params.RequestedSessionTimeout or 0), client_cert)
        session.services = self.iserver.create_session(session.name or channel.address)
        session.services.session_id = session.session_id  # one id (GetMonitoredItems)
        session.services.peer = channel.peer
        result = ua.CreateSessionResult()
        result.SessionId = session.session_id
        result.AuthenticationToken = session.auth_token
        result.RevisedSessionTimeout = session.timeout_s * 1000.0
        result.ServerNonce = session.nonce
        result.MaxRequestMessageSize = self.max_request_size
        result.ServerCertificate = policy.host_certificate
        endpoints = ua.GetEndpointsParameters()
        endpoints.EndpointUrl = params.EndpointUrl
        result.ServerEndpoints = await self.iserver.get_endpoints(endpoints,
                                                                  sockname=channel.sockname)
        if client_cert is not None:
            signed = bytes(client_cert) + bytes(params.ClientNonce or b"")
            result.ServerSignature.Signature = policy.asymmetric_cryptography.signature(signed)
            result.ServerSignature.Algorithm = policy.AsymmetricSignatureURI
        response = ua.CreateSessionResponse()
        response.Parameters = result
        log.info("OPC UA session %r created for %s (%d sessions)", session.name,
                 channel.address, len(self.table))
        return response

    # -- ActivateSession (Part 4 5.6.3) --------------------------------------------------------
    async def activate_session(self, request: Request) -> Any:
        params = request.params(ua.ActivateSessionParameters)
        channel = request.channel
        session = self.table.get(request.header.AuthenticationToken)
        if session is None or session.closed:
            raise ServiceError(ua.StatusCodes.BadSessionIdInvalid)
        policy = channel.policy
        new_channel = session.channel is not channel
        if new_channel and not session.activated:
            # Part 4 5.6.3.1: the first activation is on the channel of CreateSession
            raise ServiceError(ua.StatusCodes.BadSecureChannelIdInvalid)
        channel_cert = None if _is_none(channel.policy_uri) else channel.peer_certificate
        if new_channel and session.activated and \
                leaf(channel_cert) != leaf(session.client_certificate):
            self.table.stats.takeover_refused += 1
            log.warning("OPC UA: ActivateSession of %s from %s refused: the channel's client "
                        "certificate is not the session's (Part 4 5.6.3)", session,
                        channel.address)
            raise ServiceError(ua.StatusCodes.BadSecurityChecksFailed)
        if not _is_none(channel.policy_uri):
            host = policy.host_certificate or b""
            try:
                policy.asymmetric_cryptography.verify(bytes(host) + session.nonce,
                                                      params.ClientSignature.Signature)
            except Exception:
                raise ServiceError(ua.StatusCodes.BadApplicationSignatureInvalid) from None
        user = await self._login(session, params, channel)
        identity = Identity(user)
        if new_channel and session.activated and identity != session.identity:
            self.table.stats.takeover_refused += 1
            log.warning("OPC UA: ActivateSession of %s from %s refused: another user identity "
                        "than the session's (Part 4 5.6.3)", session, channel.address)
            raise ServiceError(ua.StatusCodes.BadIdentityChangeNotSupported)
        if new_channel:
            if session.channel is not None:
                session.publish_queue.clear()  # requests of the old channel are not answered
            session.channel = channel
        first = not session.activated
        session.user = user
        session.identity = identity
        session.services.user = user
        session.activated = True
        session.last_activity = self.table.clock.seconds()
        session.nonce = secrets.token_bytes(32)
        if first:
            self.table.stats.activated += 1
        log.info("OPC UA session %s activated (%s)%s", session, role_of(user),
                 " on a new channel" if new_channel and not first else "")
        result = ua.ActivateSessionResult()
        result.ServerNonce = session.nonce
        result.Results = [ua.StatusCode() for _ in params.ClientSoftwareCertificates or []]
        response = ua.ActivateSessionResponse()
        response.Parameters = result
        return response

    async def _login(self, session: Any, params: ua.ActivateSessionParameters,
                     channel: Any) -> Any:
        """The user of the identity token, or a ServiceError (Part 4 5.6.3.2, 7.41)."""
        iserver = self.iserver
        token = params.UserIdentityToken
        if token is None or (isinstance(token, ua.ExtensionObject) and token.Body is None):
            token = ua.AnonymousIdentityToken()  # Part 4 5.6.3.2: null means anonymous
        if not isinstance(token, iserver.supported_tokens):
            raise ServiceError(ua.StatusCodes.BadIdentityTokenRejected)
        secure = not _is_none(channel.policy_uri)
        username = password = certificate = None
        try:
            if isinstance(token, ua.UserNameIdentityToken):
                if not token.EncryptionAlgorithm and not secure and \
                        not self.clear_text_passwords:
                    # a clear-text password on a channel without security, although our user
                    # token policy asked for an encrypted one (Part 4 7.41.2.3): refused unread
                    raise ServiceError(ua.StatusCodes.BadIdentityTokenInvalid)
                username, password = iserver.decrypt_user_token(session, token)
            elif isinstance(token, ua.X509IdentityToken):
                certificate = iserver.verify_x509_token(session, token, params.UserTokenSignature)
        except (ServiceError, ua.UaStatusCodeError):
            raise
        except Exception:
            raise ServiceError(ua.StatusCodes.BadIdentityTokenInvalid) from None
        # only an X509 *user token* logs a user in by certificate, never the channel's
        manager = iserver.user_manager
        if isinstance(manager, IotUserManager):
            # the server's own: the shared login throttle (by address and user), scrypt in a
            # thread, the audit trail
            user = await manager.login(peer=channel.address, username=username,
                                       password=password, certificate=certificate)
        else:
            user = manager.get_user(iserver, username=username, password=password,
                                    certificate=certificate)
        # a user manager that checks passwords off the event loop may answer later
        if isinstance(user, Deferred):
            user = await user.asFuture(asyncio.get_running_loop())
        elif inspect.isawaitable(user):
            user = await user
        if user is None:
            raise ServiceError(ua.StatusCodes.BadUserAccessDenied)
        return user

    # -- CloseSession (Part 4 5.6.4) -----------------------------------------------------------
    async def close_session(self, request: Request) -> Any:
        delete = bool(Primitives.Boolean.unpack(request.body))  # CloseSessionRequest's only field
        assert request.session is not None
        self.table.end(request.session, delete, "CloseSession")
        return ua.CloseSessionResponse()

    # -- discovery ---------------------------------------------------------------------------
    async def get_endpoints(self, request: Request) -> Any:
        params = request.params(ua.GetEndpointsParameters)
        response = ua.GetEndpointsResponse()
        response.Endpoints = await self.iserver.get_endpoints(params,
                                                              sockname=request.channel.sockname)
        return response

    async def find_servers(self, request: Request) -> Any:
        params = request.params(ua.FindServersParameters)
        response = ua.FindServersResponse()
        response.Servers = self.iserver.find_servers(params, sockname=request.channel.sockname)
        return response
