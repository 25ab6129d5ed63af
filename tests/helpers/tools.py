"""Where the tests find the commands they start.

Our own entry points (``twistd``, ``iotserver``) come from the Python that runs the tests: the
bin directory of ``sys.executable`` (``.venv/bin`` after ``scripts/bootstrap.sh``), never the
first one on PATH, which may belong to another Python without iotserver (Debian's /usr/bin).
"""

from __future__ import annotations

import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def our(tool: str) -> str:
    """Path of one of our console scripts (``twistd``, ``iotserver``) beside ``sys.executable``."""
    path = BIN / tool
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: run the tests with the Python iotserver is installed in "
            "(.venv/bin/python -m pytest after scripts/bootstrap.sh)")
    return str(path)


def twistd(*args: str) -> list[str]:
    """``twistd -n --reactor=asyncio --pidfile= iotserver ARGS`` from this Python's bin."""
    return [our("twistd"), "-n", "--reactor=asyncio", "--pidfile=", "iotserver", *args]
