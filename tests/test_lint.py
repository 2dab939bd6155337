"""`ruff check` with the rules in pyproject.toml (ruff is pinned in requirements-test.txt)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean():
    ruff = pytest.importorskip("ruff", reason="ruff is not installed (requirements-test.txt pins it)")
    del ruff
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
