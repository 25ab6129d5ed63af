"""``iotserver users``: add, remove, list users and change passwords in the user file.

The file is the one the server reads (``server.users_file``, default ``<data_dir>/users.toml``):
``--file`` names it directly, ``--config`` takes it from a server configuration. Passwords are
read with getpass (twice) or from stdin (``--password-stdin``, for scripts) and stored as scrypt
hashes only. A running server picks changes up on SIGHUP or ``reload()`` in the console.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from pathlib import Path

from iotserver.security.users import (
    Role,
    User,
    UserFileError,
    hash_password,
    load_users,
    save_users,
)

MIN_PASSWORD = 8


class CliError(Exception):
    """A problem the user can fix; printed as one line, exit status 1."""


def _users_file(args: argparse.Namespace) -> Path:
    from iotserver import config
    from iotserver.confparse import ConfigError

    if args.file:
        return Path(args.file).expanduser()
    if args.config:
        try:
            return config.load(args.config).server.users_file
        except ConfigError as exc:
            raise CliError(f"configuration error: {exc}") from None
    return config.default_data_dir() / "users.toml"


def _load(path: Path) -> dict[str, User]:
    if not path.exists():
        return {}
    try:
        return load_users(path)
    except UserFileError as exc:
        raise CliError(str(exc)) from None


def _save(path: Path, users: dict[str, User]) -> None:
    missing = [p for p in path.parents if not p.exists()]
    for p in reversed(missing):
        p.mkdir(mode=0o700, exist_ok=True)
    save_users(path, list(users.values()))


def _check_name(name: str) -> None:
    if not name or len(name) > 64 or not name.isprintable() or any(c.isspace() for c in name):
        raise CliError(f"user name {name!r}: 1 to 64 printable characters, no spaces")


def _read_password(args: argparse.Namespace, name: str) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        password = password.removesuffix("\r")
    else:
        password = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("repeat it: ") != password:
            raise CliError("the passwords do not match; nothing changed")
    if len(password) < MIN_PASSWORD:
        raise CliError(f"the password is shorter than {MIN_PASSWORD} characters; nothing changed")
    return password


def _reload_hint(path: Path) -> str:
    return f"{path}: a running server picks this up on SIGHUP (or reload() in the console)"


def _cmd_add(args: argparse.Namespace) -> int:
    _check_name(args.name)
    path = _users_file(args)
    users = _load(path)
    if args.name in users:
        raise CliError(f"user {args.name!r} already exists in {path} "
                       "('users passwd' changes the password, 'users remove' deletes it)")
    certs = tuple(args.cert_name or ())
    if args.no_password and not certs:
        raise CliError("a user without password needs at least one --cert-name to log in with")
    password_hash = None if args.no_password else hash_password(_read_password(args, args.name))
    users[args.name] = User(args.name, Role(args.role), password_hash, certs)
    _save(path, users)
    print(f"added {args.name} ({args.role})")
    print(_reload_hint(path))
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    path = _users_file(args)
    users = _load(path)
    if users.pop(args.name, None) is None:
        raise CliError(f"no user {args.name!r} in {path}")
    _save(path, users)
    print(f"removed {args.name}")
    print(_reload_hint(path))
    return 0


def _cmd_passwd(args: argparse.Namespace) -> int:
    path = _users_file(args)
    users = _load(path)
    user = users.get(args.name)
    if user is None:
        raise CliError(f"no user {args.name!r} in {path}")
    password_hash = hash_password(_read_password(args, args.name))
    users[args.name] = User(user.name, user.role, password_hash, user.certificates)
    _save(path, users)
    print(f"password of {args.name} changed")
    print(_reload_hint(path))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    path = _users_file(args)
    users = _load(path)
    if not users:
        state = "is empty" if path.exists() else "does not exist"
        print(f"no users ({path} {state}); add one with 'iotserver users add NAME --role ROLE'")
        return 0
    rows = [("name", "role", "password", "certificates")]
    rows += [(u.name, u.role.value, "yes" if u.password_hash else "no",
              ", ".join(u.certificates) or "-") for u in sorted(users.values(), key=_by_name)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True))
              + "  " + row[3])
    print(f"({len(users)} users in {path})")
    return 0


def _by_name(user: User) -> str:
    return user.name


def _file_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--file", "-f", help="user file (default: server.users_file of --config, "
                                        "else <data_dir>/users.toml)")
    p.add_argument("--config", "-c", help="server configuration file to take users_file from")


def setup(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Fill in the ``users`` subcommand; returns its handler."""
    roles = [r.value for r in Role]
    sub = parser.add_subparsers(dest="users_command", metavar="ACTION")
    p = sub.add_parser("add", help="add a user (asks for the password twice)")
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=roles,
                   help="operator: read; engineer: read and write; admin: also the SSH console")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of stdin (for scripts)")
    p.add_argument("--no-password", action="store_true",
                   help="certificate login only (needs --cert-name)")
    p.add_argument("--cert-name", action="append", metavar="CN",
                   help="TLS/X509 identity (certificate CN or SAN) of this user; repeat for more")
    _file_options(p)
    p.set_defaults(users_handler=_cmd_add)

    p = sub.add_parser("remove", help="remove a user")
    p.add_argument("name")
    _file_options(p)
    p.set_defaults(users_handler=_cmd_remove)

    p = sub.add_parser("list", help="list users, roles and certificate names (never hashes)")
    _file_options(p)
    p.set_defaults(users_handler=_cmd_list)

    p = sub.add_parser("passwd", help="set a new password")
    p.add_argument("name")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of stdin")
    _file_options(p)
    p.set_defaults(users_handler=_cmd_passwd)

    def handler(args: argparse.Namespace) -> int:
        run = getattr(args, "users_handler", None)
        if run is None:
            parser.print_help()
            return 2
        try:
            return int(run(args))
        except (CliError, OSError) as exc:
            print(f"iotserver users: {exc}", file=sys.stderr)
            return 1
        except EOFError:
            print("iotserver users: no password given; nothing changed", file=sys.stderr)
            return 1

    return handler
