"""``iotserver users``: add, list, passwd, remove against a temporary user file."""

from __future__ import annotations

import io
import stat
from pathlib import Path

import pytest

from iotserver import cli
from iotserver.security.users import Role, UserDB, load_users


@pytest.fixture
def users_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("IOTSERVER_DATA_DIR", str(tmp_path / "state"))
    return tmp_path / "state" / "users.toml"


def stdin(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(text))


def prompts(monkeypatch: pytest.MonkeyPatch, *answers: str) -> list[str]:
    asked: list[str] = []
    replies = iter(answers)

    def fake_getpass(prompt: str = "") -> str:
        asked.append(prompt)
        return next(replies)

    monkeypatch.setattr("getpass.getpass", fake_getpass)
    return asked


def test_add_with_stdin_and_prompt(users_file: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    stdin(monkeypatch, "correct horse\n")
    assert cli.main(["users", "add", "alice", "--role", "admin", "--password-stdin"]) == 0
    assert "SIGHUP" in capsys.readouterr().out
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(users_file.parent.stat().st_mode) == 0o700
    asked = prompts(monkeypatch, "battery staple", "battery staple")
    assert cli.main(["users", "add", "bob", "--role", "engineer", "--cert-name", "bob",
                     "--cert-name", "bob@plant.local"]) == 0
    assert len(asked) == 2 and "bob" in asked[0]
    db = UserDB(users_file)
    assert db.verify("alice", "correct horse") is not None
    assert db.verify("bob", "battery staple").role is Role.ENGINEER  # type: ignore[union-attr]
    assert db.user_for_certificate("bob@plant.local").name == "bob"  # type: ignore[union-attr]
    assert "correct horse" not in users_file.read_text()


def test_add_refusals(users_file: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    prompts(monkeypatch, "password-one", "password-two")
    assert cli.main(["users", "add", "alice", "--role", "admin"]) == 1
    assert "do not match" in capsys.readouterr().err
    assert not users_file.exists()
    stdin(monkeypatch, "short\n")
    assert cli.main(["users", "add", "alice", "--role", "admin", "--password-stdin"]) == 1
    assert "shorter than 8" in capsys.readouterr().err
    assert cli.main(["users", "add", "alice", "--role", "admin", "--no-password"]) == 1
    assert "--cert-name" in capsys.readouterr().err
    assert cli.main(["users", "add", "bad name", "--role", "admin", "--no-password",
                     "--cert-name", "x"]) == 1
    assert "no spaces" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: unknown role
        cli.main(["users", "add", "alice", "--role", "root"])
    assert cli.main(["users", "add", "plc", "--role", "operator", "--no-password",
                     "--cert-name", "plc"]) == 0
    assert cli.main(["users", "add", "plc", "--role", "operator", "--no-password",
                     "--cert-name", "plc"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert load_users(users_file)["plc"].password_hash is None


def test_list_passwd_remove(users_file: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["users", "list"]) == 0
    assert "does not exist" in capsys.readouterr().out
    stdin(monkeypatch, "first password\n")
    assert cli.main(["users", "add", "zed", "--role", "operator", "--password-stdin"]) == 0
    assert cli.main(["users", "add", "amy", "--role", "engineer", "--no-password",
                     "--cert-name", "amy"]) == 0
    capsys.readouterr()
    assert cli.main(["users", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "role", "password", "certificates"]
    assert lines[1].split() == ["amy", "engineer", "no", "amy"]
    assert lines[2].split() == ["zed", "operator", "yes", "-"]
    assert "scrypt" not in "\n".join(lines)

    stdin(monkeypatch, "second password\n")
    assert cli.main(["users", "passwd", "zed", "--password-stdin"]) == 0
    db = UserDB(users_file)
    assert db.verify("zed", "second password") is not None
    assert db.verify("zed", "first password") is None
    assert cli.main(["users", "passwd", "nobody", "--password-stdin"]) == 1

    assert cli.main(["users", "remove", "amy"]) == 0
    assert set(load_users(users_file)) == {"zed"}
    assert cli.main(["users", "remove", "amy"]) == 1
    assert "no user 'amy'" in capsys.readouterr().err


def test_file_and_config_options(tmp_path: Path, users_file: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = tmp_path / "etc" / "users.toml"
    assert cli.main(["users", "add", "a", "--role", "admin", "--no-password", "--cert-name", "a",
                     "--file", str(explicit)]) == 0
    assert set(load_users(explicit)) == {"a"}
    conf = tmp_path / "server.toml"
    conf.write_text('[server]\ndata_dir = "srv"\nusers_file = "conf-users.toml"\n')
    assert cli.main(["users", "add", "b", "--role", "operator", "--no-password",
                     "--cert-name", "b", "--config", str(conf)]) == 0
    assert set(load_users(tmp_path / "conf-users.toml")) == {"b"}
    assert not users_file.exists()


def test_broken_user_file_is_reported(users_file: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    users_file.parent.mkdir(parents=True)
    users_file.write_text('[users.x]\nrole = "god"\n')
    assert cli.main(["users", "list"]) == 1
    assert "users.x.role" in capsys.readouterr().err
