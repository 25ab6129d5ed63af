"""Console authentication pieces without SSH: authorized_keys reading, the password checker."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin

from iotserver.console.service import (
    AuthorizedKeysFile,
    UserPasswordChecker,
    load_or_create_host_key,
)
from iotserver.lifecycle import StartupError
from iotserver.security.users import Role, User, UserDB, hash_password


def test_authorized_keys_file(tmp_path: Path) -> None:
    keyfile = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "op@plant", "-f",
                    str(keyfile)], check=True)
    path = tmp_path / "authorized_keys"
    db = AuthorizedKeysFile(path)
    assert db.getAuthorizedKeys(b"anyone") == []  # missing file: nobody
    path.write_bytes(b"# comment\n\nnot a key\n" + keyfile.with_suffix(".pub").read_bytes())
    path.chmod(0o600)
    found = db.getAuthorizedKeys(b"anyone")
    assert len(found) == 1 and found[0].sshType() == b"ssh-ed25519"
    path.chmod(0o620)  # group-writable: ignored, as sshd's StrictModes does
    assert db.getAuthorizedKeys(b"anyone") == []


def test_host_key_is_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "console" / "host_key"
    key, created = load_or_create_host_key(path)
    assert created and (path.stat().st_mode & 0o777) == 0o600
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    again, created_again = load_or_create_host_key(path)
    assert not created_again and again == key
    path.write_text("garbage")
    with pytest.raises(StartupError, match="console host key"):
        load_or_create_host_key(path)


@pytest_twisted.ensureDeferred
async def test_password_checker_admits_admins_only() -> None:
    users = UserDB(users={
        "boss": User("boss", Role.ADMIN, hash_password("pw1")),
        "eng": User("eng", Role.ENGINEER, hash_password("pw2")),
        "certonly": User("certonly", Role.ADMIN, None, ("certonly",)),
    })
    checker = UserPasswordChecker(SimpleNamespace(users=users))
    assert await checker.requestAvatarId(UsernamePassword(b"boss", b"pw1")) == b"boss"
    for name, password in [(b"boss", b"wrong"), (b"eng", b"pw2"), (b"nobody", b"pw1"),
                           (b"certonly", b""), (b"boss", b"")]:
        with pytest.raises(UnauthorizedLogin):
            await checker.requestAvatarId(UsernamePassword(name, password))
