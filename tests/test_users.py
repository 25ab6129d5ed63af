from __future__ import annotations

import stat
from pathlib import Path

import pytest

from iotserver.security.users import (
    Role, User, UserDB, UserFileError, check_password, hash_password, load_users, save_users,
)


def test_hash_is_salted_and_verifies() -> None:
    a, b = hash_password("s3cret"), hash_password("s3cret")
    assert a != b and a.startswith("scrypt$") and "s3cret" not in a
    assert check_password("s3cret", a) and not check_password("s3cret!", a)
    assert not check_password("x", "scrypt$bad") and not check_password("x", "md5$1$2$3$4$5")


def test_save_load_round_trip_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    save_users(path, [
        User("alice", Role.ENGINEER, hash_password("pw"), ("alice", "alice@example.com")),
        User("bob.smith", Role.OPERATOR, hash_password("pw2")),
    ])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    db = UserDB(path)
    assert db.verify("alice", "pw") == db.get("alice")
    assert db.verify("alice", "wrong") is None and db.verify("nobody", "pw") is None
    assert db.user_for_certificate("alice@example.com").name == "alice"  # type: ignore[union-attr]
    assert db.get("bob.smith").role is Role.OPERATOR  # type: ignore[union-attr]
    assert not Role.OPERATOR.can_write and Role.ENGINEER.can_write


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[users.a]\npassword = "plain"\n', "never a clear-text password"),
        ('[users.a]\nrole = "god"\n', "users.a.role"),
        ('[users.a]\nrol = "admin"\n', "users.a.rol: unknown key"),
        ('[people.a]\n', "unknown key 'people'"),
        ('[users.a\n', "users.toml"),
    ],
)
def test_bad_user_files(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "users.toml"
    path.write_text(text)
    with pytest.raises(UserFileError) as info:
        load_users(path)
    assert words in str(info.value)


def test_user_without_password_cannot_log_in(tmp_path: Path) -> None:
    db = UserDB(users={"c": User("c", Role.ADMIN, None, ("c",))})
    assert db.verify("c", "") is None and db.user_for_certificate("c") is not None
