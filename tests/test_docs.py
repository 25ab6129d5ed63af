"""Configuration examples in docs/ must be valid: users copy them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from iotserver import config

DOCS = Path(__file__).resolve().parent.parent / "docs"


def toml_blocks() -> list[tuple[str, int, str]]:
    out = []
    for doc in sorted(DOCS.glob("*.md")):
        text = doc.read_text()
        for m in re.finditer(r"```toml\n(.*?)```", text, re.S):
            if "# not a full config" not in m.group(1):  # a fragment of a larger file
                out.append((doc.name, text[: m.start()].count("\n") + 1, m.group(1)))
    return out


@pytest.mark.parametrize(("doc", "line", "block"), toml_blocks(),
                         ids=[f"{d}:{n}" for d, n, _ in toml_blocks()])
def test_toml_examples_parse(doc: str, line: int, block: str, tmp_path: Path) -> None:
    # Examples reference files that exist on the user's machine, not here.
    block = re.sub(r'^(\s*(cert|key|ca|users_file|authorized_keys|host_key)\s*=).*$', r"",
                   block, flags=re.M)
    config.parse(block, source=f"{doc}:{line}", base_dir=tmp_path)
