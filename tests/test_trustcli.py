"""``iotserver certs list`` / ``trust`` / ``untrust`` over the OPC UA PKI folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from iotserver import cli
from iotserver.opcua.security import TrustList
from iotserver.security import pki


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    """Two refused clients, as the server stores them (TrustList.reject)."""
    pki_dir = tmp_path / "pki"
    trust = TrustList(pki_dir)
    for name in ("UaExpert@host", "Ignition"):
        ca, _ = pki.create_ca(name)  # any self-signed certificate will do
        assert trust.reject(ca) is not None
    return pki_dir


def run(capsys: pytest.CaptureFixture[str], pki_dir: Path, *args: str) -> tuple[int, str, str]:
    code = cli.main(["certs", *args, "--opcua-pki", str(pki_dir)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list_trust_untrust(pki_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, pki_dir, "list")
    assert code == 0
    lines = [ln for ln in out.splitlines() if ln.startswith("rejected")]
    assert len(lines) == 2 and any("UaExpert@host" in ln for ln in lines), out
    thumb = next(ln for ln in lines if "Ignition" in ln).split()[1]

    code, out, _ = run(capsys, pki_dir, "trust", thumb[:8])
    assert code == 0 and "trusted: Ignition" in out, out
    assert [p.name.split(" ")[0] for p in (pki_dir / "trusted" / "certs").iterdir()] == \
        ["Ignition"]
    assert TrustList(pki_dir).check(pki.load_cert(
        next((pki_dir / "trusted" / "certs").iterdir()))) == 0

    code, out, _ = run(capsys, pki_dir, "trust", "UaExpert@host")
    assert code == 0 and not list((pki_dir / "rejected" / "certs").iterdir())

    code, out, _ = run(capsys, pki_dir, "untrust", "Ignition")
    assert code == 0
    assert [p.name.split(" ")[0] for p in (pki_dir / "rejected" / "certs").iterdir()] == \
        ["Ignition"]


def test_unknown_or_ambiguous_selector_is_one_line(pki_dir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, pki_dir, "trust", "nobody")
    assert code == 1
    assert err == "iotserver certs: no rejected certificate matches 'nobody' " \
                  "('iotserver certs list' shows them)\n"
    code, _, err = run(capsys, pki_dir, "trust", "ABC")  # too short for a thumbprint
    assert code == 1 and "no rejected certificate" in err
    assert len(list((pki_dir / "rejected" / "certs").iterdir())) == 2  # nothing moved


def test_list_of_an_empty_pki(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, tmp_path / "none", "list")
    assert code == 0 and out.startswith("no client certificates in")
