"""Each bundle runs in a fresh venv holding only its lock (slow: pip installs)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_server import check_completions, free_port, model_name, server

pytestmark = pytest.mark.slow

# (bundle fixture, lock file): apple-metal's macOS lock cannot install here; its Linux CPU
# equivalent carries the same runner code and mlx-lm version.
CASES = [("int4_bundle", "requirements.lock"), ("ov_int4_bundle", "requirements.lock"),
         ("mlx_int4_bundle", "requirements-linux-cpu.lock")]


@pytest.mark.parametrize("fixture, lock", CASES, ids=["onnx", "openvino", "mlx"])
def test_bundle_runs_from_its_lock_alone(fixture, lock, request, tmp_path):
    bundle = request.getfixturevalue(fixture)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--no-deps", "--require-hashes", "-r", str(bundle / lock)], check=True, timeout=900)
    for absent in ("torch", "toolkit"):
        probe = subprocess.run([str(py), "-c", f"import {absent}"], capture_output=True,
                               cwd=tmp_path)
        assert probe.returncode != 0, f"{absent} should not be installed"
    proc = subprocess.run([str(py), str(bundle / "run.py"), "--prompt",
                           "What does json.dumps do?", "--max-tokens", "12"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "tok/s" in proc.stderr
    verify = subprocess.run([str(py), str(bundle / "run.py"), "verify"],
                            capture_output=True, text=True)
    assert verify.returncode == 0 and "files match" in verify.stdout
    # ... and re-measures its parity with nothing else either: the same figures as its build
    report = tmp_path / "device.json"
    check = subprocess.run([str(py), str(bundle / "run.py"), "validate", "--json", str(report)],
                           capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    device, built = (json.loads(p.read_text()) for p in (report, bundle / "parity.json"))
    assert device["verdict"] == "pass" and device["host"]["cpu_flags"]
    assert device["metrics"]["kld_mean"] == pytest.approx(built["metrics"]["kld_mean"], rel=1e-6)
    # The OpenAI-compatible server needs nothing beyond the lock either.
    port = free_port()
    with server([str(py), str(bundle / "run.py"), "serve"], port):
        check_completions(port, model_name(bundle), max_tokens=4)
