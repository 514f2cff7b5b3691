"""The bundle runs in a fresh venv holding only its requirements.lock (slow: pip installs)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bundle_runs_from_its_lock_alone(int4_bundle, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--require-hashes", "-r", str(int4_bundle / "requirements.lock")],
                   check=True, timeout=900)
    for absent in ("torch", "transformers", "toolkit"):
        probe = subprocess.run([str(py), "-c", f"import {absent}"], capture_output=True,
                               cwd=tmp_path)
        assert probe.returncode != 0, f"{absent} should not be installed"
    proc = subprocess.run([str(py), str(int4_bundle / "run.py"), "--prompt",
                           "What does json.dumps do?", "--max-tokens", "12"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "tok/s" in proc.stderr
    verify = subprocess.run([str(py), str(int4_bundle / "run.py"), "verify"],
                            capture_output=True, text=True)
    assert verify.returncode == 0 and "files match" in verify.stdout
