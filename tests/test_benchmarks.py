"""Every benchmark answers ``--help`` without starting, and offers ``--quick``; the in-process
micro benchmarks also complete a ``--quick`` run. No timing is asserted (README: the suite never
asserts speed): only that they run and print their comparison."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted(p.relative_to(ROOT).as_posix()
                    for p in (ROOT / "benchmarks").rglob("bench_*.py"))
# in-process and a few seconds with --quick: (script, a line its table must hold)
QUICK = {
    "benchmarks/bench_modbus_codec.py": "pymodbus",
    "benchmarks/bench_mqtt_codec.py": "paho",
    "benchmarks/bench_ring.py": "period/raw",
    "benchmarks/bench_store.py": "vs dict floor",
    "benchmarks/bench_signals.py": "samples/s",
}


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_every_benchmark_is_listed() -> None:
    assert len(BENCHMARKS) >= 13 and set(QUICK) <= set(BENCHMARKS)


@pytest.mark.parametrize("script", BENCHMARKS)
def test_help_does_not_start_the_benchmark(script: str) -> None:
    res = _run(script, "--help")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("usage: "), res.stdout  # nothing printed before the usage
    assert "--quick" in res.stdout and res.stderr == "", res.stdout + res.stderr
    assert len(res.stdout.splitlines()) < 60, res.stdout  # the help, not a benchmark's output


@pytest.mark.parametrize("script", sorted(QUICK))
def test_quick_run_prints_the_comparison(script: str) -> None:
    res = _run(script, "--quick")
    assert res.returncode == 0, res.stdout + res.stderr
    assert QUICK[script] in res.stdout, res.stdout
