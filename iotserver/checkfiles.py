"""``iotserver check-config``'s second half: open and validate every file a configuration names.

Parsing a configuration checks its keys; this checks what they point to, the way startup will
use it: certificates and keys (readable, parseable, the key belongs to the certificate, within
their validity), the user file, the MQTT ACL file, the OPC UA client user certificates, files in
``tls:`` endpoint strings, and that the data directory can be written. Every problem found is one
line naming the configuration file, the key and the file; nothing here raises.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from iotserver.config import Config

_ENDPOINT_FILE_KEYS = ("cert", "key", "ca", "certKey", "privateKey", "extraCertChain")


def check_files(config: Config) -> list[str]:
    """Every problem with the files ``config`` names; empty when startup would find none."""
    problems: list[str] = []
    src = config.source

    def add(key: str, text: str) -> None:
        problems.append(f"{src}: {key}: {text}")

    _check_data_dir(config.server.data_dir, add)
    tls = config.tls
    if tls.cert is not None and tls.key is not None:
        _check_pair("tls.cert", tls.cert, "tls.key", tls.key, add)
    if tls.ca is not None:
        _check_cert("tls.ca", tls.ca, add)
    if tls.generated:
        # the material the server generated on an earlier start, loaded the same way at start
        tls_dir = config.server.data_dir / "tls"
        if (tls_dir / "server.pem").exists():
            _check_pair("tls (generated)", tls_dir / "server.pem", "tls (generated)",
                        tls_dir / "server.key", add)
            _check_cert("tls (generated)", tls_dir / "ca.pem", add)
    _check_users(config, add)
    mqtt = config.section("mqtt")
    if mqtt is not None:
        if mqtt.acl_file is not None:
            _check_acl("mqtt.auth.acl_file", mqtt.acl_file, add)
        for i, lst in enumerate(mqtt.listeners):
            _check_endpoint(f"mqtt.listeners[{i}].endpoint", lst.endpoint, add)
    modbus = config.section("modbus")
    server = getattr(modbus, "server", None)
    for i, ep in enumerate(getattr(server, "endpoints", ()) if server is not None else ()):
        _check_endpoint(f"modbus.server.endpoints[{i}]", ep, add)
    opcua = config.section("opcua")
    for i, client in enumerate(getattr(opcua, "clients", ()) if opcua is not None else ()):
        if client.user_certificate is not None and client.user_private_key is not None:
            _check_pair(f"opcua.clients[{i}].user_certificate", client.user_certificate,
                        f"opcua.clients[{i}].user_private_key", client.user_private_key, add)
    console = config.section("console")
    if console is not None and console.authorized_keys is not None:
        _check_readable("console.authorized_keys", console.authorized_keys, add)
    return problems


Add = Callable[[str, str], None]  # add(key, problem)


def _check_data_dir(path: Path, add: Add) -> None:
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        add("server.data_dir", f"{path}: {existing} is not a directory")
    elif not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created ({existing} is " \
            "not writable)"
        add("server.data_dir", f"{path} {what}")


def _read(key: str, path: Path, add: Add) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        add(key, f"{path}: file not found")
    except IsADirectoryError:
        add(key, f"{path}: is a directory, expected a file")
    except OSError as exc:
        add(key, f"{path}: cannot read: {exc.strerror}")
    return None


def _check_readable(key: str, path: Path, add: Add) -> None:
    _read(key, path, add)


def _check_cert(key: str, path: Path, add: Add) -> Any:
    from iotserver.security import pki

    if _read(key, path, add) is None:
        return None
    try:
        cert = pki.load_cert(path)
        pki.check_validity(path)
    except pki.CertificateExpiredError as exc:
        add(key, str(exc))
        return None
    except ValueError as exc:
        add(key, str(exc))
        return None
    return cert


def _check_key(key: str, path: Path, add: Add) -> Any:
    from iotserver.security import pki

    if _read(key, path, add) is None:
        return None
    try:
        return pki.load_key(path)
    except ValueError as exc:
        add(key, str(exc))
        return None


def _public(obj: Any) -> bytes:
    return bytes(obj.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


def _check_pair(cert_key: str, cert_path: Path, key_key: str, key_path: Path, add: Add) -> None:
    cert = _check_cert(cert_key, cert_path, add)
    private = _check_key(key_key, key_path, add)
    if cert is not None and private is not None and \
            _public(cert.public_key()) != _public(private.public_key()):
        add(key_key, f"{key_path} is not the private key of {cert_key} {cert_path}")


def _check_users(config: Config, add: Add) -> None:
    from iotserver.security.users import UserFileError, load_users

    path = config.server.users_file
    if not path.exists():
        if getattr(config.server, "users_file_configured", False):
            add("server.users_file", f"{path}: file not found (password logins would be off)")
        return
    try:
        load_users(path)
    except UserFileError as exc:
        add("server.users_file", str(exc))


def _check_acl(key: str, path: Path, add: Add) -> None:
    from iotserver.mqtt.acl import AclError, load_acl_file

    try:
        load_acl_file(path)
    except AclError as exc:
        add(key, str(exc))


def _endpoint_files(endpoint: str) -> Iterator[tuple[str, Path]]:
    """(option, path) of the file options in a ``tls:``/``ssl:`` endpoint string."""
    if not endpoint.startswith(("tls:", "ssl:")):
        return
    for part in re.split(r"(?<!\\):", endpoint)[1:]:
        name, sep, value = part.partition("=")
        if sep and name in _ENDPOINT_FILE_KEYS and value:
            yield name, Path(value.replace("\\:", ":").replace("\\\\", "\\")).expanduser()


def _check_endpoint(key: str, endpoint: str, add: Add) -> None:
    files = dict(_endpoint_files(endpoint))
    cert = files.get("cert") or files.get("certKey")
    private = files.get("key") or files.get("privateKey")
    if cert is not None and private is not None:
        _check_pair(f"{key} cert=", cert, f"{key} key=", private, add)
    elif cert is not None:
        # Twisted's ssl: accepts a PEM holding both certificate and key in certKey
        _check_cert(f"{key} cert=", cert, add)
    if "ca" in files:
        _check_cert(f"{key} ca=", files["ca"], add)
