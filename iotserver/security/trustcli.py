"""``iotserver certs list`` and ``iotserver certs trust``: the OPC UA trust decisions.

A client with an unknown certificate is refused (Bad_CertificateUntrusted) and a copy of its
certificate lands in ``<pki_dir>/rejected/certs``, named ``CN [SHA1-THUMBPRINT].der``. ``list``
shows the rejected and the trusted client certificates; ``trust`` moves rejected ones into
``trusted/certs``, where the server picks them up on the client's next connection attempt (the
folders are re-read when they change: no restart). ``untrust`` moves one back.
"""

from __future__ import annotations

import argparse
import datetime as _dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from iotserver.security.certcli import CliError


@dataclass(frozen=True)
class Entry:
    path: Path
    state: str  # "rejected" or "trusted"
    common_name: str
    thumbprint: str
    application_uri: str
    not_after: _dt.datetime


def _entry(path: Path, state: str) -> Entry | None:
    import hashlib

    from cryptography.hazmat.primitives import serialization

    from iotserver.security import pki

    try:
        cert = pki.load_cert(path)
    except (OSError, ValueError):
        return None
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if cns else ""
    uris: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        pass
    der = cert.public_bytes(serialization.Encoding.DER)
    return Entry(path, state, cn if isinstance(cn, str) else cn.decode("utf-8", "replace"),
                 hashlib.sha1(der).hexdigest().upper(), ", ".join(uris) or "-",
                 cert.not_valid_after_utc)


def entries(pki_dir: Path) -> list[Entry]:
    """Rejected, then trusted client certificates (files in the two ``certs`` folders)."""
    out = []
    for state in ("rejected", "trusted"):
        folder = pki_dir / state / "certs"
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            entry = _entry(path, state) if path.is_file() else None
            if entry is not None:
                out.append(entry)
    return out


def _pki_dir(args: argparse.Namespace) -> Path:
    from iotserver.security.certcli import _places

    return _places(args).opcua_pki


def cmd_list(args: argparse.Namespace) -> int:
    pki_dir = _pki_dir(args)
    found = entries(pki_dir)
    if not found:
        print(f"no client certificates in {pki_dir}/rejected/certs or trusted/certs")
        return 0
    for e in found:
        print(f"{e.state:<9} {e.thumbprint[:16]}  {e.common_name}  (ApplicationUri "
              f"{e.application_uri}, expires {e.not_after:%Y-%m-%d})")
        print(f"          {e.path}")
    if any(e.state == "rejected" for e in found):
        print("trust one with: iotserver certs trust THUMBPRINT (the first 8 or more "
              "characters) or COMMON-NAME")
    return 0


def _select(found: list[Entry], selector: str, state: str) -> Entry:
    """One certificate by path, file name, thumbprint prefix (8+ hex digits) or common name."""
    wanted = selector.upper().replace(":", "")
    matches = [
        e for e in found
        if e.state == state and (
            str(e.path) == selector or e.path.name == selector or e.common_name == selector
            or (len(wanted) >= 8 and e.thumbprint.startswith(wanted)))
    ]
    if not matches:
        raise CliError(f"no {state} certificate matches {selector!r} "
                       "('iotserver certs list' shows them)")
    if len(matches) > 1:
        raise CliError(f"{selector!r} matches {len(matches)} {state} certificates; give more of "
                       "the thumbprint")
    return matches[0]


def _move(args: argparse.Namespace, source: str, target: str) -> int:
    pki_dir = _pki_dir(args)
    found = entries(pki_dir)
    chosen = [_select(found, s, source) for s in args.certificate]
    folder = pki_dir / target / "certs"
    folder.mkdir(parents=True, exist_ok=True)
    for e in chosen:
        dest = folder / e.path.name
        if dest.exists():
            raise CliError(f"{dest} exists already; nothing moved")
    for e in chosen:
        e.path.rename(folder / e.path.name)
        print(f"{target}: {e.common_name} [{e.thumbprint}] -> {folder / e.path.name}")
    if target == "trusted":
        print("the client is accepted on its next connection attempt (no restart needed)")
    return 0


def cmd_trust(args: argparse.Namespace) -> int:
    return _move(args, "rejected", "trusted")


def cmd_untrust(args: argparse.Namespace) -> int:
    return _move(args, "trusted", "rejected")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                 common: Callable[[argparse.ArgumentParser], None]) -> None:
    """``certs list``, ``certs trust``, ``certs untrust`` (``common`` adds --dir/--config)."""
    specs = [
        ("list", "list rejected and trusted OPC UA client certificates", cmd_list, False),
        ("trust", "trust rejected OPC UA client certificates (moves them to trusted/certs)",
         cmd_trust, True),
        ("untrust", "stop trusting OPC UA client certificates (back to rejected/certs)",
         cmd_untrust, True),
    ]
    for name, help_text, handler, takes_certs in specs:
        p = sub.add_parser(name, help=help_text)
        if takes_certs:
            p.add_argument("certificate", nargs="+",
                           help="thumbprint (8+ leading hex digits), common name or file")
        common(p)
        p.add_argument("--opcua-pki", metavar="DIR",
                       help="OPC UA PKI folder (default: [opcua] pki_dir or <data_dir>/opcua/pki)")
        p.set_defaults(certs_handler=handler)
