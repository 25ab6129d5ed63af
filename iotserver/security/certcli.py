"""``iotserver certs``: create the local CA and server certificates, issue client certificates.

Files (the names the server looks for, so ``certs init`` output is used without configuration)::

    <data_dir>/tls/ca.pem, ca.key           local CA: clients trust ca.pem; keep ca.key safe
    <data_dir>/tls/server.pem, server.key   TLS server certificate (MQTT, Modbus/TCP Security)
    <data_dir>/opcua/pki/own/certs/iotserver.der, own/private/iotserver.pem
                                            OPC UA application instance certificate
    <data_dir>/tls/clients/NAME.pem, NAME.key   client certificates
    <data_dir>/tls/ca.crl, <pki>/issuers/crl/iotserver-ca.crl
                                            the local CA's CRL (``certs crl`` renews it)

Keys are written with mode 0600 and nothing is overwritten without ``--force``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import re
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WARN_DAYS = 30
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")


class CliError(Exception):
    """A problem the user can fix; printed as one line, exit status 1."""


@dataclass(frozen=True)
class Places:
    """Where the certificate files live, from --dir / --config / the default data directory."""

    tls_dir: Path
    opcua_pki: Path
    hostnames: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    application_uri: str


def _places(args: argparse.Namespace) -> Places:
    from iotserver import config
    from iotserver.confparse import ConfigError

    try:
        cfg = config.load(args.config) if args.config else None
    except ConfigError as exc:
        raise CliError(f"configuration error: {exc}") from None
    data_dir = cfg.server.data_dir if cfg else config.default_data_dir()
    tls_dir = Path(args.dir).expanduser() if args.dir else data_dir / "tls"
    opcua = cfg.sections.get("opcua") if cfg else None
    if getattr(args, "opcua_pki", None):
        pki_dir = Path(args.opcua_pki).expanduser()
    elif args.dir:  # a separate certificate folder keeps the OPC UA files beside the others
        pki_dir = tls_dir / "opcua-pki"
    elif opcua is not None and hasattr(opcua, "pki_path"):
        pki_dir = opcua.pki_path(data_dir)
    else:
        pki_dir = data_dir / "opcua" / "pki"
    host = socket.gethostname() or "localhost"
    return Places(
        tls_dir=tls_dir,
        opcua_pki=pki_dir,
        hostnames=cfg.server.hostnames if cfg else ("localhost",),
        ip_addresses=cfg.server.ip_addresses if cfg else ("127.0.0.1",),
        application_uri=getattr(opcua, "application_uri", None) or f"urn:{host}:iotserver",
    )


def _opcua_files(pki_dir: Path) -> tuple[Path, Path]:
    own = pki_dir / "own"
    return own / "certs" / "iotserver.der", own / "private" / "iotserver.pem"


def _load_ca(tls_dir: Path) -> tuple[Any, Any]:
    from iotserver.security import pki

    ca_pem, ca_key = tls_dir / "ca.pem", tls_dir / "ca.key"
    if not ca_pem.exists() or not ca_key.exists():
        raise CliError(f"no CA in {tls_dir} (ca.pem and ca.key): run 'iotserver certs init' first")
    try:
        cert, key = pki.load_cert(ca_pem), pki.load_key(ca_key)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if cert.public_key() != key.public_key():
        raise CliError(f"{ca_key} is not the private key of {ca_pem}")
    return cert, key


def _refuse_existing(paths: list[Path], what: str) -> None:
    existing = [p for p in paths if p.exists()]
    if existing:
        raise CliError(f"{existing[0]} already exists; use --force to replace {what}")


def _mkdir_private(path: Path) -> None:
    """Create ``path`` and any missing parents with mode 0700 (keys and state live there)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for p in reversed(missing):
        p.mkdir(mode=0o700, exist_ok=True)


# --------------------------------------------------------------------------- init


def _cmd_init(args: argparse.Namespace) -> int:
    from iotserver.security import pki

    places = _places(args)
    hostnames = tuple(args.hostname) if args.hostname else places.hostnames
    ips = tuple(args.ip) if args.ip else places.ip_addresses
    app_uri = args.application_uri or places.application_uri
    if not hostnames and not ips:
        raise CliError("give at least one --hostname or --ip")
    tls = places.tls_dir
    ca_pem, ca_key_path = tls / "ca.pem", tls / "ca.key"
    server_pem, server_key = tls / "server.pem", tls / "server.key"
    opcua_cert, opcua_key = _opcua_files(places.opcua_pki)
    leaves = [server_pem, server_key, opcua_cert, opcua_key]
    if not args.force:
        if args.renew:
            _refuse_existing(leaves, "the server certificates (with --renew)")
        else:
            _refuse_existing([ca_pem, ca_key_path, *leaves], "the CA and server certificates")
    try:
        if args.renew:
            ca_cert, ca_key = _load_ca(tls)
        else:
            ca_cert, ca_key = pki.create_ca(f"iotserver local CA ({(hostnames or ips)[0]})",
                                            days=args.ca_days)
        server_cert, server_priv = pki.issue_server_cert(
            ca_cert, ca_key, (hostnames or ips)[0], dns_names=hostnames, ip_addresses=ips,
            days=args.days)
        app_cert, app_key = pki.issue_opcua_app_cert(
            ca_cert, ca_key, app_uri, common_name=f"iotserver@{(hostnames or ips)[0]}",
            dns_names=hostnames, ip_addresses=ips, days=args.days)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    _mkdir_private(tls)
    _mkdir_private(opcua_key.parent)
    _mkdir_private(opcua_cert.parent)
    force = args.force
    written: list[Path] = []
    if not args.renew:
        written += [pki.write_key_pem(ca_key, ca_key_path, force=force),
                    pki.write_cert_pem(ca_cert, ca_pem, force=force)]
    written += [
        pki.write_key_pem(server_priv, server_key, force=force),
        pki.write_cert_pem(server_cert, server_pem, force=force),
        pki.write_key_pem(app_key, opcua_key, force=force),
        pki.write_cert_der(app_cert, opcua_cert, force=force),
    ]
    # the issuer beside our application certificate, where OPC UA stacks build chains from
    issuers = places.opcua_pki / "issuers" / "certs"
    _mkdir_private(issuers)
    written.append(pki.write_cert_der(ca_cert, issuers / "iotserver-ca.der", force=True))
    written += _write_crl(tls, places.opcua_pki, force=False)
    for path in written:
        print(f"wrote {path}")
    print(f"server certificate for {', '.join([*hostnames, *ips])}; "
          f"OPC UA ApplicationUri {app_uri}")
    if not args.renew:
        print(f"clients must trust {ca_pem} and import {tls / 'ca.crl'} with it; keep "
              f"{ca_key_path} private (it signs certificates)")
        if force:
            print("a new CA was created: certificates issued by the old one are no longer valid")
    print("restart the server to use the new certificates")
    return 0


def _write_crl(tls: Path, opcua_pki: Path, *, force: bool, days: int | None = None
               ) -> list[Path]:
    """Issue or renew the CA's CRL when needed (always with ``force``), and put a copy into
    the OPC UA issuers folder; returns the files written."""
    from iotserver.security import pki_crl

    try:
        state = pki_crl.ensure_crl(tls, force=force, days=days or pki_crl.CRL_DAYS)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if state.problem:
        raise CliError(state.problem)
    assert state.crl is not None
    folder = opcua_pki / "issuers" / "crl"
    _mkdir_private(folder.parent)
    before = (folder / pki_crl.OPCUA_CRL_NAME).read_bytes() if \
        (folder / pki_crl.OPCUA_CRL_NAME).exists() else None
    copy = pki_crl.publish_crl(state.crl, folder)
    written = [state.path] if state.renewed else []
    return written + ([copy] if copy.read_bytes() != before else [])


def _cmd_crl(args: argparse.Namespace) -> int:
    places = _places(args)
    _load_ca(places.tls_dir)  # a clear message when there is no CA (key) here
    for path in _write_crl(places.tls_dir, places.opcua_pki, force=True, days=args.days):
        print(f"wrote {path}")
    from iotserver.security import pki_crl

    crl = pki_crl.load_crl(places.tls_dir / pki_crl.CRL_NAME)
    print(f"CRL number {pki_crl.crl_number(crl)}, {len(list(crl))} revoked, next update "
          f"{crl.next_update_utc:%Y-%m-%d %H:%M} UTC; clients that imported ca.crl need this one "
          "before then")
    return 0


# --------------------------------------------------------------------------- client


def _cmd_client(args: argparse.Namespace) -> int:
    from iotserver.security import pki

    if not _NAME.match(args.name):
        raise CliError(f"client name {args.name!r}: use letters, digits, '_', '.', '@', '-'")
    places = _places(args)
    ca_cert, ca_key = _load_ca(places.tls_dir)
    out = Path(args.out).expanduser() if args.out else places.tls_dir / "clients"
    cert_path, key_path = out / f"{args.name}.pem", out / f"{args.name}.key"
    if not args.force:
        _refuse_existing([cert_path, key_path], f"the certificate of {args.name!r}")
    try:
        cert, key = pki.issue_client_cert(ca_cert, ca_key, args.name, role=args.role,
                                          days=args.days)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    _mkdir_private(out)
    pki.write_key_pem(key, key_path, force=args.force)
    pki.write_cert_pem(cert, cert_path, force=args.force)
    print(f"wrote {key_path}")
    print(f"wrote {cert_path}")
    role = f", Modbus/TCP Security role {args.role!r}" if args.role else ""
    print(f"client certificate CN={args.name}{role}, valid {args.days} days; the client also "
          f"needs {places.tls_dir / 'ca.pem'}")
    print(f"map it to a user for MQTT and OPC UA: iotserver users add {args.name} "
          f"--role {args.role if args.role in ('operator', 'engineer', 'admin') else 'ROLE'} "
          f"--cert-name {args.name} --no-password")
    return 0


# --------------------------------------------------------------------------- show


def _cert_files(places: Places) -> list[Path]:
    files: list[Path] = []
    if places.tls_dir.is_dir():
        files += sorted(p for p in places.tls_dir.glob("*.pem") if p.is_file())
        clients = places.tls_dir / "clients"
        if clients.is_dir():
            files += sorted(p for p in clients.glob("*.pem") if p.is_file())
    own = places.opcua_pki / "own" / "certs"
    if own.is_dir():
        files += sorted(p for p in own.iterdir() if p.suffix.lower() in (".der", ".pem"))
    return files


def _cmd_show(args: argparse.Namespace) -> int:
    from iotserver.security import pki

    places = _places(args)
    files = _cert_files(places)
    if not files:
        print(f"no certificates in {places.tls_dir} or {places.opcua_pki}; "
              "'iotserver certs init' creates them (the server does on first start)")
        return 0
    now = _dt.datetime.now(_dt.UTC)
    expired = _show_crls(places, now, args.warn_days)
    for path in files:
        try:
            info = pki.cert_info(path, now=now)
        except ValueError as exc:
            print(f"{path}\n  cannot read: {exc}\n")
            continue
        print(path)
        print(f"  subject   {info.subject}")
        kind = "CA" if info.is_ca else "end entity"
        if info.self_signed:
            kind += ", self-signed"
        else:
            print(f"  issuer    {info.issuer}")
        print(f"  type      {kind}, {info.public_key}")
        sans = ([f"DNS:{d}" for d in info.dns_names] + [f"IP:{i}" for i in info.ip_addresses]
                + [f"URI:{u}" for u in info.uris] + [f"email:{e}" for e in info.emails])
        if sans:
            print(f"  SANs      {', '.join(sans)}")
        if info.modbus_role:
            print(f"  role      {info.modbus_role} (Modbus/TCP Security)")
        print(f"  expires   {info.not_after:%Y-%m-%d %H:%M} UTC ({info.days_left} days left)")
        if info.not_after <= now:
            print("  EXPIRED: replace it ('iotserver certs init --renew' for server certificates)")
            expired += 1
        elif info.not_before > now:
            print(f"  NOT YET VALID until {info.not_before:%Y-%m-%d %H:%M} UTC (check the clock)")
        elif info.days_left < args.warn_days:
            print(f"  WARNING: expires within {args.warn_days} days")
        print()
    return 1 if expired else 0


def _show_crls(places: Places, now: _dt.datetime, warn_days: int) -> int:
    """Print the CRLs of the TLS and OPC UA issuers folders; returns how many have expired."""
    from iotserver.security import pki_crl

    paths = [places.tls_dir / pki_crl.CRL_NAME]
    crl_dir = places.opcua_pki / "issuers" / "crl"
    if crl_dir.is_dir():
        paths += sorted(p for p in crl_dir.iterdir() if p.suffix.lower() in (".crl", ".der"))
    expired = 0
    for path in paths:
        if not path.is_file():
            continue
        try:
            crl = pki_crl.load_crl(path)
        except (ValueError, OSError) as exc:
            print(f"{path}\n  cannot read: {exc}\n")
            continue
        print(path)
        print(f"  CRL of    {crl.issuer.rfc4514_string()}, number {pki_crl.crl_number(crl)}, "
              f"{len(list(crl))} revoked")
        nxt = crl.next_update_utc
        if nxt is None:
            print("  next update: none given")
        else:
            print(f"  next update {nxt:%Y-%m-%d %H:%M} UTC")
            if nxt <= now:
                print("  EXPIRED: renew it with 'iotserver certs crl' (the server does at start)")
                expired += 1
            elif nxt - now < _dt.timedelta(days=warn_days):
                print(f"  WARNING: next update within {warn_days} days")
        print()
    return expired


# --------------------------------------------------------------------------- argparse


def _days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 36500:
        raise argparse.ArgumentTypeError(f"expected a number of days 1..36500, got {text!r}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", help="certificate folder (default: <data_dir>/tls)")
    p.add_argument("--config", "-c", help="server configuration file (for data_dir and names)")


def setup(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Fill in the ``certs`` subcommand; returns its handler."""
    sub = parser.add_subparsers(dest="certs_command", metavar="ACTION")
    p = sub.add_parser("init", help="create the local CA, TLS server and OPC UA certificates")
    _common(p)
    p.add_argument("--hostname", action="append", metavar="H",
                   help="DNS name in the certificates (repeat; default: server.hostnames)")
    p.add_argument("--ip", action="append", metavar="IP",
                   help="IP address in the certificates (repeat; default: server.ip_addresses)")
    p.add_argument("--application-uri", metavar="URI",
                   help="OPC UA ApplicationUri (default: [opcua] application_uri or "
                        "urn:<hostname>:iotserver)")
    p.add_argument("--opcua-pki", metavar="DIR",
                   help="OPC UA PKI folder (default: [opcua] pki_dir or <data_dir>/opcua/pki)")
    p.add_argument("--days", type=_days, default=825, help="validity of the certificates (825)")
    p.add_argument("--ca-days", type=_days, default=3650, help="validity of the CA (3650)")
    p.add_argument("--renew", action="store_true",
                   help="keep the existing CA; issue new server and OPC UA certificates")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(certs_handler=_cmd_init)

    p = sub.add_parser("client", help="issue a client certificate signed by the local CA")
    p.add_argument("name", help="client name (certificate CN; maps to a user via --cert-name)")
    p.add_argument("--role", help="operator, engineer, admin or a Modbus/TCP Security role "
                                  "(written into the role extension)")
    p.add_argument("--out", help="output folder (default: <dir>/clients)")
    _common(p)
    p.add_argument("--days", type=_days, default=825, help="validity (825)")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(certs_handler=_cmd_client)

    p = sub.add_parser("crl", help="renew the local CA's CRL now (ca.crl and the OPC UA "
                                   "issuers copy)")
    _common(p)
    p.add_argument("--opcua-pki", metavar="DIR", help="OPC UA PKI folder")
    p.add_argument("--days", type=_days, default=None,
                   help="days until the CRL's next update (365)")
    p.set_defaults(certs_handler=_cmd_crl)

    p = sub.add_parser("show", help="list certificates with names and expiry")
    _common(p)
    p.add_argument("--opcua-pki", metavar="DIR", help="OPC UA PKI folder")
    p.add_argument("--warn-days", type=int, default=WARN_DAYS,
                   help=f"warn about certificates expiring within this many days ({WARN_DAYS})")
    p.set_defaults(certs_handler=_cmd_show)

    from iotserver.security.trustcli import add_commands

    add_commands(sub, _common)  # list / trust / untrust OPC UA client certificates

    def handler(args: argparse.Namespace) -> int:
        run = getattr(args, "certs_handler", None)
        if run is None:
            parser.print_help()
            return 2
        try:
            return int(run(args))
        except CliError as exc:
            print(f"iotserver certs: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:  # FileExistsError from a race, permissions...
            print(f"iotserver certs: {exc}", file=sys.stderr)
            return 1

    return handler
