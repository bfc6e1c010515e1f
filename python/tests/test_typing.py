"""The package is typed: mypy --strict finds nothing in it (it ships py.typed, so programs
that check their own types check their calls into it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "synchub"


def test_mypy_strict_is_clean() -> None:
    try:
        import mypy  # noqa: F401
    except ImportError:
        pytest.fail("mypy is missing: run scripts/install-test-deps (Debian package python3-mypy)",
                    pytrace=False)
    assert (PACKAGE / "py.typed").is_file()
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                          str(PACKAGE)], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
