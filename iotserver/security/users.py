"""The user file shared by MQTT, OPC UA and the console: names, roles, salted password hashes.

Format (TOML, one table per user)::

    [users.alice]
    role = "engineer"                       # operator (read-only) | engineer (read-write) | admin
    password = "scrypt$16384$8$1$<salt b64>$<hash b64>"
    certificates = ["alice", "alice@example.com"]   # TLS/X509 identities (CN or SAN) of alice

Passwords are never stored in clear: scrypt (RFC 7914) with a random 16-byte salt. Verifying
costs tens of milliseconds on purpose, so servers call :meth:`UserDB.verify_deferred`, which runs
it in a thread (hashlib releases the GIL) instead of stalling the event loop.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import os
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1


class Role(enum.Enum):
    OPERATOR = "operator"
    ENGINEER = "engineer"
    ADMIN = "admin"

    @property
    def can_write(self) -> bool:
        """The one "may write" rule (every protocol asks it through ``login.may_write``)."""
        return self is not Role.OPERATOR


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    password_hash: str | None = None
    certificates: tuple[str, ...] = ()


class UserFileError(ValueError):
    """The user file is unreadable or malformed; the message names the file and the entry."""


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, encoded: str) -> bool:
    """Constant-time comparison against an encoded hash; False for a malformed hash."""
    try:
        scheme, n, r, p, salt_b64, digest_b64 = encoded.split("$")
        if scheme != "scrypt":
            return False
        salt = base64.b64decode(salt_b64, validate=True)
        expected = base64.b64decode(digest_b64, validate=True)
        digest = hashlib.scrypt(
            password.encode("utf-8"),
            salt=salt,
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
            maxmem=256 * 1024 * 1024,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, expected)


# A real hash of a random password: verifying an unknown user costs the same as a known one, so
# response time does not reveal which user names exist.
_DUMMY_HASH = hash_password(secrets.token_hex(16))


class UserDB:
    """Users loaded from a file; ``reload()`` re-reads it (SIGHUP, console) atomically."""

    def __init__(self, path: Path | None = None, users: dict[str, User] | None = None) -> None:
        self.path = path
        self._users: dict[str, User] = dict(users or {})
        self._by_cert: dict[str, User] = {}
        self._index()
        if path is not None and users is None:
            self.reload()

    def _index(self) -> None:
        self._by_cert = {c: u for u in self._users.values() for c in u.certificates}

    def reload(self) -> None:
        if self.path is None:
            return
        self._users = load_users(self.path)
        self._index()

    def __contains__(self, name: object) -> bool:
        return name in self._users

    def __len__(self) -> int:
        return len(self._users)

    def get(self, name: str) -> User | None:
        return self._users.get(name)

    def users(self) -> list[User]:
        return list(self._users.values())

    def verify(self, name: str, password: str) -> User | None:
        """The user when the password matches, else None (blocking: tens of ms)."""
        user = self._users.get(name)
        encoded = user.password_hash if user and user.password_hash else _DUMMY_HASH
        ok = check_password(password, encoded)
        return user if ok and user is not None and user.password_hash else None

    def verify_deferred(self, name: str, password: str) -> Any:
        """``verify`` in the reactor's thread pool; a Deferred firing with the User or None."""
        from twisted.internet.threads import deferToThread

        return deferToThread(self.verify, name, password)

    def user_for_certificate(self, identity: str) -> User | None:
        """The user a TLS/X509 identity (certificate CN or SAN) is mapped to."""
        return self._by_cert.get(identity)


def load_users(path: Path) -> dict[str, User]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserFileError(f"{path}: user file not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserFileError(f"{path}: {exc}") from None
    unknown = set(data) - {"users"}
    if unknown:
        raise UserFileError(f"{path}: unknown key {sorted(unknown)[0]!r} (expected [users.NAME])")
    users: dict[str, User] = {}
    table = data.get("users", {})
    if not isinstance(table, dict):
        raise UserFileError(f"{path}: users: expected tables [users.NAME]")
    for name, entry in table.items():
        where = f"{path}: users.{name}"
        if not isinstance(entry, dict):
            raise UserFileError(f"{where}: expected a table")
        extra = set(entry) - {"role", "password", "certificates"}
        if extra:
            raise UserFileError(f"{where}.{sorted(extra)[0]}: unknown key")
        try:
            role = Role(entry.get("role", "operator"))
        except ValueError:
            raise UserFileError(
                f"{where}.role: expected operator, engineer or admin, got {entry.get('role')!r}"
            ) from None
        pw = entry.get("password")
        if pw is not None and (not isinstance(pw, str) or not pw.startswith("scrypt$")):
            raise UserFileError(
                f"{where}.password: expected a scrypt hash (use 'iotserver users add'), "
                "never a clear-text password"
            )
        certs = entry.get("certificates", [])
        if not isinstance(certs, list) or not all(isinstance(c, str) for c in certs):
            raise UserFileError(f"{where}.certificates: expected an array of strings")
        users[name] = User(name, role, pw, tuple(certs))
    return users


def save_users(path: Path, users: list[User]) -> None:
    """Write the file atomically (temp file + rename) with mode 0600."""
    lines = ["# iotserver users: manage with 'iotserver users add/remove/list'", ""]
    for u in sorted(users, key=lambda u: u.name):
        lines.append(f"[users.{_toml_key(u.name)}]")
        lines.append(f'role = "{u.role.value}"')
        if u.password_hash:
            lines.append(f'password = "{u.password_hash}"')
        if u.certificates:
            lines.append("certificates = [" + ", ".join(_toml_str(c) for c in u.certificates) + "]")
        lines.append("")
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _toml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_key(name: str) -> str:
    bare = name.replace("_", "").replace("-", "").isalnum()
    return name if bare else _toml_str(name)
