"""Certificates and keys for every TLS listener: a local CA, server, client and OPC UA certificates.

Built on ``cryptography`` only. All keys are RSA 2048: the widest client support (mosquitto,
embedded TLS stacks, PLC firmware) and what OPC UA Basic256Sha256 requires. Private keys are
written with mode 0600 and no file is ever overwritten unless the caller says ``force=True``.

The Modbus/TCP Security role (Modbus/TCP Security spec, "Role-based client authorization") is a
non-critical X.509v3 extension, OID 1.3.6.1.4.1.50316.802.1, holding one ASN.1 UTF8String.

This module is the public facade; the code lives in ``pki_issue.py`` (keys, CA and certificate
issuing, the Modbus role extension), ``pki_files.py`` (writing and loading files, first-start
``ensure_server_material``) and ``pki_inspect.py`` (``cert_info``, ``check_validity``).
"""

from __future__ import annotations

from iotserver.security.pki_files import (
    TlsMaterial,
    ensure_server_material,
    load_cert,
    load_cert_chain,
    load_key,
    write_cert_der,
    write_cert_pem,
    write_key_der,
    write_key_pem,
)
from iotserver.security.pki_inspect import (
    CertificateExpiredError,
    CertInfo,
    cert_info,
    check_validity,
)
from iotserver.security.pki_issue import (
    MODBUS_ROLE_OID,
    RSA_KEY_SIZE as RSA_KEY_SIZE,  # public constant outside __all__
    create_ca,
    generate_key,
    issue_client_cert,
    issue_opcua_app_cert,
    issue_server_cert,
    read_modbus_role,
)

__all__ = [
    "MODBUS_ROLE_OID",
    "CertInfo",
    "CertificateExpiredError",
    "TlsMaterial",
    "cert_info",
    "check_validity",
    "create_ca",
    "ensure_server_material",
    "generate_key",
    "issue_client_cert",
    "issue_opcua_app_cert",
    "issue_server_cert",
    "load_cert",
    "load_cert_chain",
    "load_key",
    "read_modbus_role",
    "write_cert_der",
    "write_cert_pem",
    "write_key_der",
    "write_key_pem",
]
