"""`phikit demo` (what `make demo` runs) and the doctor / list commands."""

from __future__ import annotations

import pytest

from conftest import phikit


def test_doctor_and_list():
    proc = phikit("doctor", check=0)
    assert "onnx" in proc.stdout and "generic-cpu" in proc.stdout and "runs here" in proc.stdout
    proc = phikit("list", check=0)
    for name in ("tiny-phi3-int4", "phi-3.5-mini-instruct-int4", "generic-cpu", "intel-cpu",
                 "ollama"):
        assert name in proc.stdout


@pytest.mark.slow
def test_demo_builds_validates_and_answers(tmp_path):
    proc = phikit("demo", "--out", tmp_path / "dist", check=0, timeout=1800)
    assert "phikit demo: tiny-phi3" in proc.stdout
    assert "FAIL" not in proc.stdout
    built = sorted(p.name for p in (tmp_path / "dist").iterdir() if p.is_dir())
    native = [f"tiny-phi3-{p}-{t}" for p in ("int4", "int8", "fp32")
              for t in ("generic-cpu", "intel-cpu", "ollama")]
    off_device = ["tiny-phi3-int4-intel-gpu", "tiny-phi3-fp32-apple-metal",
                  "tiny-phi3-int4-raspberry-pi", "tiny-phi3-int4-nvidia-cuda",
                  "tiny-phi3-w8a16-qualcomm-npu"]
    assert built == sorted(native + off_device)
    for line in proc.stdout.splitlines():
        if "apple-metal" in line and "pass" in line:
            assert "mlx" in line
        if "qualcomm-npu" in line and "pass" in line:
            assert "qnn" in line and "HTP" in line
