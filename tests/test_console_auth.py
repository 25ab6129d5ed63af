"""Console authentication pieces without SSH: authorized_keys reading, the password checker."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

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


def _key_credentials(key: Any, user: bytes, signed: bool, peer: str) -> Any:
    from twisted.cred.credentials import SSHPrivateKey

    blob = key.public().blob()
    sig_data = b"session data to sign"
    creds = SSHPrivateKey(user, b"ssh-ed25519", blob, sig_data,
                          key.sign(sig_data) if signed else None)
    creds.peer = peer  # what the console's per-connection portal sets
    return creds


@pytest_twisted.ensureDeferred
async def test_key_checker_probe_login_throttle_and_audit(tmp_path: Path) -> None:
    from twisted.conch.error import ValidPublicKey
    from twisted.conch.ssh import keys
    from twisted.internet import task

    from iotserver.console.service import KeyChecker
    from iotserver.security.login import LoginConfig, Logins

    good, bad = (keys.Key.fromFile(str(p)) for p in (
        _keygen(tmp_path / "good"), _keygen(tmp_path / "bad")))
    path = tmp_path / "authorized_keys"
    path.write_bytes((tmp_path / "good.pub").read_bytes())
    path.chmod(0o600)
    seen: list[tuple[Any, ...]] = []

    class Audit:
        def login(self, *args: Any) -> None:
            seen.append(args)

    core = SimpleNamespace(users=UserDB(users={}))
    core.logins = Logins(lambda: core.users, task.Clock(), LoginConfig(free_failures=1),
                         audit=Audit())
    checker = KeyChecker(AuthorizedKeysFile(path), core)
    # a probe of an authorized key: "yes, sign with it" (not a refusal, not audited)
    with pytest.raises(ValidPublicKey):
        await checker.requestAvatarId(_key_credentials(good, b"admin", False, "10.0.0.1"))
    # a probe of another key: refused, but not a failed login
    with pytest.raises(UnauthorizedLogin):
        await checker.requestAvatarId(_key_credentials(bad, b"admin", False, "10.0.0.1"))
    assert seen == []
    assert await checker.requestAvatarId(
        _key_credentials(good, b"admin", True, "10.0.0.1")) == b"admin"
    assert [s[4] for s in seen] == ["ok"]
    # signed attempts with an unauthorized key are failures; then the throttle refuses
    for _ in range(2):
        with pytest.raises(UnauthorizedLogin):
            await checker.requestAvatarId(_key_credentials(bad, b"admin", True, "10.6.6.6"))
    with pytest.raises(UnauthorizedLogin):
        await checker.requestAvatarId(_key_credentials(good, b"admin", True, "10.6.6.6"))
    assert [s[4] for s in seen] == ["ok", "failed", "failed", "throttled"]
    # from another address the good key still works
    assert await checker.requestAvatarId(
        _key_credentials(good, b"admin", True, "10.0.0.2")) == b"admin"


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path
