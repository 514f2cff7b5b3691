"""Shared fixtures. Slow fixtures build real bundles once per session with the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "models" / "tiny-phi3"


def phikit(*args: str, check: int | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess: exit codes and stderr are what users see."""
    proc = subprocess.run([sys.executable, "-m", "toolkit.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})
    if check is not None:
        assert proc.returncode == check, (
            f"phikit {' '.join(map(str, args))} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def dist(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist")


def _build(dist: Path, precision: str, target: str = "generic-cpu") -> Path:
    out = dist / f"tiny-phi3-{precision}-{target}"
    if not (out / "manifest.json").exists():
        phikit("build", f"recipes/tiny-phi3-{precision}.yaml", "--target", target, "--out", out,
               check=0)
    return out


@pytest.fixture(scope="session")
def int4_bundle(dist) -> Path:
    return _build(dist, "int4")


@pytest.fixture(scope="session")
def int8_bundle(dist) -> Path:
    return _build(dist, "int8")


@pytest.fixture(scope="session")
def fp32_bundle(dist) -> Path:
    return _build(dist, "fp32")
