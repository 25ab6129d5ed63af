"""asyncua's ``Server`` as the holder of the address space, certificates and endpoints.

We use it to build the standard address space, load the certificate and key, make the
security policy factories and the endpoint descriptions; it never listens. Our listener
(``channel.py``), session table (``sessions.py``) and dispatch (``dispatch.py``) serve the
clients. :func:`prepare` does what is needed before listening.
"""

from __future__ import annotations

from typing import Any

from asyncua import Server
from asyncua.crypto import uacrypto

from iotserver.opcua import compat


class IotUaServer(Server):  # type: ignore[misc]  # asyncua is untyped
    """asyncua Server whose endpoints carry the server certificate's issuer chain.

    Part 6 6.7.2: a certificate issued by a CA travels with its chain (SenderCertificate and the
    endpoints' ServerCertificate), or clients cannot verify it (node-opcua:
    Bad_CertificateChainIncomplete). asyncua can send a chain but its Server never passes one.
    """

    certificate_chain: list[Any] = []

    async def _setup_server_nodes(self) -> None:
        await super()._setup_server_nodes()
        if not self.certificate_chain:
            return
        for factory in compat.policy_factories(self):
            factory.certificate_chain = self.certificate_chain
        chain = b"".join(uacrypto.der_from_x509(c) for c in self.certificate_chain)
        for edp in self.iserver.endpoints:
            if edp.ServerCertificate:
                edp.ServerCertificate = edp.ServerCertificate + chain


async def prepare(server: IotUaServer) -> list[Any]:
    """Make the endpoints and start the internal server (ServerStatus clock); return the
    security policy factories for the listener."""
    compat.check_server(server)
    await compat.setup_endpoints(server)
    await server.iserver.start()
    return compat.policy_factories(server)
