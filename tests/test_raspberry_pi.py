"""raspberry-pi: aarch64 lock, memory budget, and parity on the target ISA under qemu (slow)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import REPO, once, phikit, small_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pi_bundle(dist) -> Path:
    out = dist / "tiny-phi3-int4-raspberry-pi"
    with once(out):
        if not (out / "manifest.json").exists():
            phikit("build", "recipes/tiny-phi3-int4.yaml", "--target", "raspberry-pi", "--out",
                   out, "--with-wheels", check=0)
    return out


def test_lock_and_wheels_are_for_aarch64(pi_bundle):
    lock = (pi_bundle / "requirements.lock").read_text()
    assert "linux/aarch64" in lock and "onnxruntime-genai==0.18.0" in lock
    wheels = sorted(p.name for p in (pi_bundle / "wheels").glob("*.whl"))
    assert any(w.startswith("onnxruntime_genai-0.18.0") and "aarch64" in w for w in wheels)
    assert not any("x86_64" in w for w in wheels)
    config = json.loads((pi_bundle / "model" / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 4


def test_memory_budget_refuses_with_both_numbers(tmp_path):
    text = (REPO / "targets" / "raspberry-pi.yaml").read_text().replace(
        "memory_budget_mb: 6144", "memory_budget_mb: 10")
    target = tmp_path / "small-pi.yaml"
    target.write_text(text)
    proc = phikit("build", "recipes/tiny-phi3-int4.yaml", "--target", target, "--dry-run")
    assert proc.returncode == 2
    message = " ".join(proc.stderr.split())
    assert "needs about 13 MB" in message and "KV cache 8 MB at 2048 tokens" in message
    assert "memory budget is 10 MB" in message


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("debootstrap")
                    or not Path("/usr/bin/qemu-aarch64-static").exists(),
                    reason="needs root, debootstrap and qemu-user-static (.ci/run installs them)")
@pytest.mark.xdist_group("aarch64-binfmt")  # not while the binfmt test unregisters qemu
@pytest.mark.longest
def test_parity_on_emulated_aarch64(pi_bundle, tmp_path):
    report_path = tmp_path / "r.json"
    # 6 rows (2 texts, 2 prompts, 2 chats): qemu runs the aarch64 kernels ~40x slower than
    # native
    proc = phikit("validate", pi_bundle, "--emulate", "aarch64", "--json", report_path,
                  "--recipe", small_recipe(tmp_path, limit=6), timeout=3000)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(report_path.read_text())
    assert report["candidate"]["emulated_arch"] == "aarch64"
    assert report["verdict"] == "pass"
    emu = report["emulation"]
    assert emu["arch"] == "aarch64" and len(emu["prompts"]) == report["metrics"]["prompts"]
    print(f"\naarch64 (emulated): KLD mean {report['metrics']['kld_mean']:.5f}, top-1 "
          f"{report['metrics']['top1']:.4f}, greedy match vs reference "
          f"{report['metrics']['greedy_match_mean']:.1f}, vs x86 "
          f"{emu['greedy_match_vs_native_mean']:.1f}; setup {emu['setup_seconds']} s, "
          f"total {report['timing']}")
