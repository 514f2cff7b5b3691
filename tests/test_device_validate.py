"""`python run.py validate`: a bundle re-measures parity wherever it runs, from what it carries
(issue 18). The lock-only venvs run it too (test_lock_venv.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from defects.formats import copy_bundle, edit_json, rehash_manifest
from defects.planters import Ctx, onnx_wrong_eos
from toolkit.artifact_checks import STATIC_METRICS
from toolkit.report.model import ParityReport

pytestmark = pytest.mark.slow


def run_validate(bundle, tmp_path):
    report = tmp_path / "device.json"
    proc = subprocess.run([sys.executable, str(bundle / "run.py"), "validate", "--json",
                           str(report)], capture_output=True, text=True, timeout=900,
                          cwd=tmp_path)
    return proc, (json.loads(report.read_text()) if report.is_file() else None)


def test_the_device_measures_what_the_build_measured(int4_bundle, tmp_path):
    proc, report = run_validate(int4_bundle, tmp_path)
    assert proc.returncode == 0, proc.stderr
    typed = ParityReport.read(report)  # the build's format: phikit's reports read it
    built = ParityReport.read(json.loads((int4_bundle / "parity.json").read_text()))
    # the build's static checks compare the artifact with the checkpoint, which a device lacks
    parity = [c for c in built.checks if c.metric not in STATIC_METRICS]
    assert len(parity) < len(built.checks)
    assert typed.passed and [c.metric for c in typed.checks] == [c.metric for c in parity]
    for c, b in zip(typed.checks, parity):  # the same runtime on the same CPU
        assert c.measured == pytest.approx(b.measured, rel=1e-6, abs=1e-12), c.metric
        assert c.bound == b.bound
    assert {"cpu", "cpu_flags", "os", "machine"} <= set(typed.host)
    assert "PASS" in proc.stderr and typed.host["cpu"] in proc.stderr


def test_a_broken_bundle_fails_on_the_device(int4_bundle, tmp_path):
    bundle = copy_bundle(int4_bundle, tmp_path / "b")
    onnx_wrong_eos(Ctx(bundle / "model", {}))
    rehash_manifest(bundle)
    proc, report = run_validate(bundle, tmp_path)
    assert proc.returncode == 1, proc.stderr
    failed = {c["metric"] for c in report["checks"] if not c["passed"]}
    assert "eos_agreement" in failed and "FAIL eos_agreement" in proc.stderr


def test_a_bundle_without_a_reference_says_so(int4_bundle, tmp_path):
    bundle = copy_bundle(int4_bundle, tmp_path / "b")
    edit_json(bundle / "manifest.json", lambda m: m.pop("reference_file"))
    rehash_manifest(bundle)
    proc, report = run_validate(bundle, tmp_path)
    assert proc.returncode == 2 and report is None
    assert "carries no reference" in proc.stderr and "Traceback" not in proc.stderr
