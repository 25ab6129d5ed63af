"""node-opcua, a second OPC UA stack, driven by small node scripts that print one JSON line.

scripts/bootstrap.sh installs the pinned ``node-opcua-client`` into ``.interop/nodeopcua``
(git-ignored); ``IOTSERVER_NODE_OPCUA_DIR`` names another folder holding ``node_modules``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

from iotserver.security import pki

_REPO_NODE_DIR = Path(__file__).resolve().parents[2] / ".interop" / "nodeopcua"
NODE_DIR = Path(os.environ.get("IOTSERVER_NODE_OPCUA_DIR") or (
    _REPO_NODE_DIR if _REPO_NODE_DIR.is_dir() else "/tmp/nodeopcua"))


def available() -> bool:
    return shutil.which("node") is not None and (
        NODE_DIR / "node_modules" / "node-opcua-client").is_dir()


#: Skip condition for node-opcua tests: under CI=true a missing peer is a failure, not a skip.
NODE_MISSING = not available() and os.environ.get("CI") != "true"


def node_client_pki(tmp_path: Path, tls: Path, *, with_crl: bool) -> list[str]:
    """A node-opcua PKI that trusts our ca.pem (and ca.crl), and a client certificate from
    our CA, which the server trusts: [pki folder, certificate file, key file]."""
    ca_cert, ca_key = pki.load_cert(tls / "ca.pem"), pki.load_key(tls / "ca.key")
    cert, key = pki.issue_opcua_app_cert(ca_cert, ca_key, "urn:test:nodeopcua",  # type: ignore[arg-type]
                                         common_name="nodeopcua-test", dns_names=["localhost"],
                                         ip_addresses=[])
    pki.write_cert_pem(cert, tmp_path / "client.pem", force=True)
    pki.write_key_pem(key, tmp_path / "client.key", force=True)
    node_pki = tmp_path / "node-pki"
    (node_pki / "trusted" / "certs").mkdir(parents=True, exist_ok=True)
    (node_pki / "trusted" / "crl").mkdir(parents=True, exist_ok=True)
    shutil.copy(tls / "ca.pem", node_pki / "trusted" / "certs" / "ca.pem")  # as docs/opcua.md
    if with_crl:
        shutil.copy(tls / "ca.crl", node_pki / "trusted" / "crl" / "ca.crl")
    return [str(node_pki), str(tmp_path / "client.pem"), str(tmp_path / "client.key")]


async def run_node(script: Path, args: list[str], timeout: float = 90) -> dict[str, Any]:
    """Run a node script to its end (bounded) and return the last JSON line it printed."""
    proc = await asyncio.create_subprocess_exec(
        "node", "--security-revert=CVE-2023-46809", str(script), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "NODE_PATH": str(NODE_DIR / "node_modules")})
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    assert lines, out.decode()[-2000:]
    result: dict[str, Any] = json.loads(lines[-1])
    return result
