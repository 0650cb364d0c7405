"""The code is clean under ruff and mypy (configured in pyproject.toml): part of the test suite, so that
the README's one test command (and so ``.ci/run``) checks it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False)


def test_ruff_is_clean():
    done = _run("ruff", "check", "wsurgery", "tests", "scripts")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_is_clean():
    done = _run("mypy", "--no-error-summary")
    assert done.returncode == 0, done.stdout + done.stderr
