"""OpenVINO (intel-cpu, intel-gpu) and MLX (apple-metal) through the same Protocol (slow)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import TINY, phikit, small_recipe

pytestmark = pytest.mark.slow


def parity(bundle):
    return json.loads((bundle / "manifest.json").read_text())["parity"]["metrics"]


def run_py(bundle, *args):
    return subprocess.run([sys.executable, str(bundle / "run.py"), "--prompt",
                           "What does json.dumps do?", "--max-tokens", "12", *args],
                          capture_output=True, text=True, timeout=600)


# --- OpenVINO -------------------------------------------------------------------------------

def test_openvino_int4_validates_and_runs(ov_int4_bundle, tmp_path):
    """Validated again holding one compiled copy of the model at a time (what a model too large
    for two gets): the figures are the build's, measured with both copies."""
    report_path = tmp_path / "r.json"
    phikit("validate", ov_int4_bundle, "--option", "one_compiled_copy=true", "--json",
           report_path, check=0)
    report = json.loads(report_path.read_text())
    assert report["candidate"]["runtime"] == "openvino"
    assert report["candidate"]["one_compiled_copy"] is True
    built = json.loads((ov_int4_bundle / "parity.json").read_text())
    assert built["candidate"]["one_compiled_copy"] is False
    for metric in ("kld_mean", "top1", "greedy_match_mean", "decode_agreement", "eos_agreement"):
        assert report["metrics"][metric] == pytest.approx(built["metrics"][metric], abs=1e-9)
    assert report["metrics"]["token_agreement"] == 1.0
    proc = run_py(ov_int4_bundle)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
    assert (ov_int4_bundle / "model" / "openvino_tokenizer.xml").is_file()
    assert "openvino-genai==" in (ov_int4_bundle / "requirements.lock").read_text()


def test_openvino_sanity_ordering(ov_int4_bundle, ov_int8_bundle):
    assert parity(ov_int8_bundle)["kld_mean"] < parity(ov_int4_bundle)["kld_mean"]


def test_openvino_bare_ir_from_optimum_cli(tmp_path):
    out = tmp_path / "ir"
    subprocess.run([str(__import__("pathlib").Path(sys.executable).parent / "optimum-cli"),
                    "export", "openvino", "-m", str(TINY), "--task", "text-generation-with-past",
                    "--weight-format", "int4", "--sym", "--group-size", "32", str(out)],
                   check=True, capture_output=True)
    report_path = tmp_path / "r.json"
    phikit("validate", out, "--reference", TINY, "--json", report_path, check=0)
    assert json.loads(report_path.read_text())["artifact"] == "bare openvino"


def test_intel_gpu_validated_on_cpu_says_so(dist, tmp_path):
    out = tmp_path / "gpu"
    proc = phikit("build", "recipes/tiny-phi3-int4.yaml", "--target", "intel-gpu", "--out", out,
                  check=0)
    assert "not present on this machine" in proc.stdout.replace("\n", " ")
    report = json.loads((out / "parity.json").read_text())
    assert report["candidate"]["requested_device"] == "GPU"
    assert report["candidate"]["device"] == "CPU"
    # the target's f16 hint is for the GPU: the CPU fallback is given only what this CPU's host
    # table chose (nothing, or a protection such as bf16 where the CPU computes fp16 natively),
    # and the compiled model says it executes something other than the GPU's f16
    candidate = report["candidate"]
    chosen = candidate["options_in_force"]["inference_precision"]["value"]
    hint = candidate["properties"].get("INFERENCE_PRECISION_HINT")
    assert hint == (chosen if chosen in ("f32", "bf16", "f16") else None), candidate
    assert hint != "f16" and candidate["executed_precision"]["inference"] in ("f32", "bf16")
    assert any("inference_precision f16 is for GPU" in n for n in report["notes"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runtime"]["options"]["device"] == "GPU"


# --- MLX ------------------------------------------------------------------------------------

def test_mlx_int4_validates_and_runs(mlx_int4_bundle, tmp_path):
    # the build validated it through the bundle's runner (a second validation of quantized MLX
    # costs minutes on Linux's CPU kernels; test_lock_venv validates an MLX bundle again)
    report = json.loads((mlx_int4_bundle / "parity.json").read_text())
    assert report["verdict"] == "pass"
    assert any("Metal path is not exercised" in n for n in report["notes"]), report["notes"]
    assert report["candidate"]["runtime"] == "mlx-lm"
    assert report["candidate"]["quantization"]["bits"] == 4
    proc = run_py(mlx_int4_bundle)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
    mac_lock = (mlx_int4_bundle / "requirements.lock").read_text()
    assert "macos/arm64" in mac_lock and "mlx-lm==" in mac_lock
    assert "mlx-cpu==" in (mlx_int4_bundle / "requirements-linux-cpu.lock").read_text()


def test_mlx_sanity_ordering(mlx_int4_bundle, mlx_int8_bundle):
    assert parity(mlx_int8_bundle)["kld_mean"] < parity(mlx_int4_bundle)["kld_mean"]


def test_mlx_bundle_opens_in_mlx_lm_generate_unchanged(mlx_int4_bundle):
    proc = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model",
                           str(mlx_int4_bundle / "model"), "--prompt", "Hello",
                           "--max-tokens", "4"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_mlx_bare_dir_from_mlx_lm_convert(tmp_path):
    # unquantized: this is about a directory mlx_lm wrote being recognized and validated; MLX's
    # quantized CPU kernels are validated on the int4 bundle above
    out = tmp_path / "mlx"
    subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(TINY),
                    "--mlx-path", str(out)], check=True, capture_output=True)
    report_path = tmp_path / "r.json"
    phikit("validate", out, "--reference", TINY, "--recipe", small_recipe(tmp_path),
           "--json", report_path, check=0, timeout=1800)
    report = json.loads(report_path.read_text())
    assert report["artifact"] == "bare mlx" and report["metrics"]["prompts"] >= 2


# (bundle fixture, file removed or None, config change, what the message must name)
BROKEN = [
    ("ov_int4_bundle", "openvino_tokenizer.xml", None, "openvino_tokenizer.xml"),
    ("ov_int4_bundle", None, {"vocab_size": 32000}, "do not match"),
    ("mlx_int4_bundle", "tokenizer.json", None, "tokenizer.json"),
    ("mlx_int4_bundle", None, {"hidden_size": 256}, "mlx_rt cannot open this model"),
]


@pytest.mark.parametrize("fixture, remove, change, message", BROKEN,
                         ids=["ov-no-tokenizer", "ov-config", "mlx-no-tokenizer", "mlx-config"])
def test_broken_model_dirs_are_refused(fixture, remove, change, message, request, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(request.getfixturevalue(fixture) / "model", broken)
    if remove:
        (broken / remove).unlink()
    if change:
        config = json.loads((broken / "config.json").read_text())
        (broken / "config.json").write_text(json.dumps({**config, **change}))
    proc = phikit("validate", broken, "--reference", TINY)
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_openvino_data_aware_from_local_calibration_text(ov_int4_bundle, tmp_path):
    """AWQ + scale estimation + ratio 0.8 from the recipe's own text file (no hub dataset)."""
    out = tmp_path / "awq"
    phikit("build", "recipes/tiny-phi3-int4-awq.yaml", "--target", "intel-cpu", "--out", out,
           check=0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["quantization"]["calibration"].endswith("tiny-phi3-calibration.txt")
    assert parity(out)["kld_mean"] < parity(ov_int4_bundle)["kld_mean"]


def test_calibrated_recipe_refused_by_backends_without_calibration():
    for target in ("generic-cpu", "apple-metal"):
        proc = phikit("build", "recipes/tiny-phi3-int4-awq.yaml", "--target", target,
                      "--dry-run")
        assert proc.returncode == 2 and "quantizes without calibration data" in proc.stderr
