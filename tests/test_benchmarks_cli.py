"""The benchmark scripts stay runnable as the library changes: ``python -m benchmarks --help`` imports every
script (a renamed or moved library name breaks it at once), and each script's own ``--help`` parses.

Glossary:
    script   a module of ``benchmarks/`` run as ``python -m benchmarks.<name>`` (``_harness`` and
             ``_text_models`` are shared helpers, ``_plots`` the figures)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_"))


def _help(module: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_python_m_benchmarks_imports_every_script():
    proc = _help("benchmarks")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--only" in proc.stdout and "--quick" in proc.stdout


@pytest.mark.extended
@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "__main__"])
def test_every_benchmark_script_parses_its_arguments(script):
    proc = _help(f"benchmarks.{script}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
