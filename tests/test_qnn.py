"""qualcomm-npu: Olive's static QNN pipeline, validated on the QNN HTP backend (Qualcomm's
simulator on x86_64) with CPU fallback disabled.

Fast tests check the target, the plan, the refusals and the runner's sampler; slow ones build the
W8A16 recipe for real, validate it again through `phikit validate --json`, run the bundle's own
runner, and build a recipe whose MatMuls the HTP refuses (validation must name them)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import REPO, once, phikit
from toolkit.backends import BACKENDS, detect_backend
from toolkit.backends.qnn import BACKEND as QNN
from toolkit.build import make_plan
from toolkit.checkpoint import read_model_info
from toolkit.errors import PhikitError
from toolkit.runner.qnn_rt import _pick
from toolkit.schema import load_recipe, load_target

TARGET = REPO / "targets" / "qualcomm-npu.yaml"
W8A16 = REPO / "recipes" / "tiny-phi3-w8a16.yaml"


def test_target_and_recipe_load():
    target = load_target(TARGET, set(BACKENDS))
    assert (target.device, target.backend, target.execution_provider) == ("npu", "qnn", "qnn")
    assert (target.platform.os, target.platform.arch) == ("windows", "arm64")
    assert target.runtime.options["cpu_fallback"] is False
    (simulator,) = target.runtime.extra_locks["qnn"]
    assert (simulator.platform.os, simulator.platform.arch) == ("linux", "x86_64")
    assert QNN.unavailable() is None, QNN.unavailable()


def test_plan_describes_the_static_pipeline(tmp_path):
    plan = make_plan(str(W8A16), "qualcomm-npu", out=tmp_path / "b")
    line = plan.steps[1]
    for part in ("W8A16 QDQ (per channel)", "calibration tiny-phi3-calibration.txt",
                 "2 slice(s)", "prefill chunk 64", "KV cache 256", "provider qnn"):
        assert part in line, line
    config = QNN.olive_config(REPO / "models" / "tiny-phi3", tmp_path, plan.recipe, plan.info)
    passes = [p["type"] for p in config["passes"].values()]
    assert passes == ["CaptureSplitInfo", "ModelBuilder", "GraphSurgeries", "OnnxFloatToFloat16",
                      "OnnxStaticQuantization", "SplitModel", "StaticLLM"]
    sq = config["passes"]["sq"]
    assert (sq["activation_type"], sq["precision"], sq["per_channel"]) == ("uint16", "uint8", True)
    assert sq["calibration_providers"] == ["CPUExecutionProvider"]
    # calibration comes from the recipe's local text, never a hub dataset
    assert all(d["load_dataset_config"]["data_name"] == "text" for d in config["data_configs"])


def test_w4a16_runs_gptq_per_channel(tmp_path):
    recipe = load_recipe(REPO / "recipes" / "tiny-phi3-w4a16.yaml")
    info = read_model_info(REPO / "models" / "tiny-phi3")
    config = QNN.olive_config(REPO / "models" / "tiny-phi3", tmp_path, recipe, info)
    assert config["passes"]["gptq"] == {"type": "Gptq", "bits": 4, "sym": True, "group_size": -1,
                                        "data_config": "calib_joined"}
    assert config["passes"]["mq"]["type"] == "MatMulNBitsToQDQ"


@pytest.mark.parametrize("change, reason", [
    ({"quantization": {"precision": "fp32"}}, "int4 (W4A16) or int8 (W8A16)"),
    ({"quantization": {"calibration": None}}, "needs calibration text"),
    ({"context_length": None}, "fixed KV cache"),
    ({"context_length": 32}, "shorter than the prefill chunk"),
    ({"context_length": 4096}, "must not exceed the sliding window 2047"),
])
def test_refusals(change, reason):
    recipe = load_recipe(W8A16)
    quant = recipe.quantization.model_copy(update=change.pop("quantization", {}))
    recipe = recipe.model_copy(update={"quantization": quant, **change})
    target = load_target(TARGET, set(BACKENDS))
    info = read_model_info(REPO / "models" / "tiny-phi3")
    assert reason in (QNN.support(info, target, recipe) or "")


def test_unknown_option_names_the_field():
    recipe = load_recipe(W8A16)
    quant = recipe.quantization.model_copy(update={"options": {"qnn": {"chunks": 32}}})
    with pytest.raises(PhikitError, match="unknown QNN option 'chunks'") as e:
        QNN.options(recipe.model_copy(update={"quantization": quant}))
    assert e.value.field == "quantization.options.qnn"


def test_refused_before_conversion_with_exit_2(tmp_path):
    """The LongRoPE fixture is not measured through Olive's rotary surgery: refused up front."""
    recipe = tmp_path / "r.yaml"
    text = W8A16.read_text().replace("../models/tiny-phi3", str(REPO / "models" /
                                                                 "tiny-phi3-longrope"))
    text = text.replace("../evalsets/", str(REPO / "evalsets") + "/")
    recipe.write_text(text)
    proc = phikit("build", recipe, "--target", "qualcomm-npu", "--out", tmp_path / "b", check=2)
    assert "sliding window" in proc.stderr + proc.stdout or "LongRoPE" in proc.stderr + proc.stdout
    assert not (tmp_path / "b").exists()


def test_sampler_greedy_and_seeded():
    logits = np.array([0.1, 3.0, 0.2, 2.9], dtype=np.float32)
    greedy = SimpleNamespace(temperature=0.0, top_k=0, top_p=1.0)
    assert _pick(logits, greedy, np.random.default_rng(0)) == 1
    sampled = SimpleNamespace(temperature=1.0, top_k=2, top_p=1.0)
    picks = {_pick(logits, sampled, np.random.default_rng(s)) for s in range(40)}
    assert picks == {1, 3}  # top-k 2 keeps exactly the two best


# --- the real pipeline on the HTP simulator ---------------------------------------------------

@pytest.fixture(scope="module")
def npu_bundle(dist):
    # `phikit demo` (tests/test_demo.py, earlier in a full run) builds this recipe for this target
    # into dist/demo: its bundle is the same build, and the HTP simulator's validation is the
    # slowest of the suite
    demo = dist / "demo" / "tiny-phi3-w8a16-qualcomm-npu"
    if (demo / "manifest.json").exists():
        return demo
    out = dist / "tiny-phi3-w8a16-qualcomm-npu"
    with once(out):  # a demo in another worker waits on the validation cache, then reuses it
        if not (out / "manifest.json").exists():
            phikit("build", W8A16, "--target", "qualcomm-npu", "--out", out, check=0,
                   timeout=1800)
    return out


@pytest.mark.slow
def test_validate_records_the_htp_backend_without_fallback(npu_bundle, tmp_path):
    # the build's own validation (the simulator is the slowest runtime here: not run twice)
    report = json.loads((npu_bundle / "parity.json").read_text())
    cand = report["candidate"]
    assert report["verdict"] == "pass"
    assert cand["execution_provider"] == "QNNExecutionProvider"
    assert cand["qnn_backend"] == "htp" and cand["cpu_fallback"] is False
    assert "simulator" in cand["device"]
    # every node of every graph on QNN: fallback is off, so anything else could not have opened
    assert set(cand["nodes_by_provider"]) == {"QNNExecutionProvider"}
    graphs = cand["nodes_by_graph"]
    assert {"embeddings_chunk", "embeddings_token", "context_0", "context_1", "iterator_0",
            "iterator_1", "lm_head_chunk", "lm_head_token"} == set(graphs)
    assert all(g["QNNExecutionProvider"] > 0 for g in graphs.values())
    assert report["metrics"]["kld_mean"] < 0.01 and report["metrics"]["top1"] > 0.9
    assert any("simulator" in n for n in report["notes"])
    # the readable report says where it ran and that nothing could fall back
    from toolkit.report import bundle_facts
    from toolkit.report.model import ParityReport

    runtime = bundle_facts(ParityReport.read(report), None)["runtime"]
    assert "QNN HTP" in runtime and "CPU fallback off" in runtime, runtime


@pytest.mark.slow
def test_bundle_graphs_are_static_and_locked_for_both_platforms(npu_bundle):
    import onnx

    model = npu_bundle / "model"
    assert detect_backend(model) is QNN
    spec = json.loads((model / "qnn_pipeline.json").read_text())
    for name in spec["graphs"].values():
        graph = onnx.load(str(model / name), load_external_data=False).graph
        for value in [*graph.input, *graph.output]:
            dims = value.type.tensor_type.shape.dim
            assert all(d.dim_value > 0 for d in dims), (name, value.name)
    assert spec["kv_shape"][2] == 256 and spec["chunk"] == 64
    win = (npu_bundle / "requirements.lock").read_text()
    sim = (npu_bundle / "requirements-linux-x86_64-htp-simulator.lock").read_text()
    assert "windows/arm64" in win and "onnxruntime-qnn==" in win and "win_arm64" in win
    assert "--no-deps" in win and "huggingface-hub" not in win
    assert "linux/x86_64" in sim and "onnxruntime-qnn==" in sim


@pytest.mark.slow
def test_bundle_runner_generates_on_the_htp(npu_bundle):
    proc = subprocess.run([sys.executable, "run.py", "--prompt", "The capital of France is",
                           "--max-tokens", "8"], cwd=npu_bundle, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_longrope_served_up_to_the_original_length_only():
    info = read_model_info(REPO / "models" / "tiny-phi3-longrope")
    info = type(info)(**{**info.__dict__, "raw": {**info.raw, "sliding_window": None}})
    recipe = load_recipe(REPO / "recipes" / "tiny-phi3-longrope-w8a16.yaml")
    target = load_target(TARGET, set(BACKENDS))
    assert QNN.support(info, target, recipe) is None
    longer = recipe.model_copy(update={"context_length": 128})
    assert "short-factor rotary cache only" in QNN.support(info, target, longer)


@pytest.mark.slow
@pytest.mark.longest
def test_longrope_short_factors_kept(dist):
    """Olive's RemoveRopeMultiCache must keep the SHORT-factor cache (the one LongRoPE uses
    below the original length): long factors there would give KLD ~0.075."""
    out = dist / "tiny-phi3-longrope-w8a16-qualcomm-npu"
    phikit("build", "recipes/tiny-phi3-longrope-w8a16.yaml", "--target", "qualcomm-npu",
           "--out", out, check=0, timeout=1800)
    parity = json.loads((out / "parity.json").read_text())
    assert parity["metrics"]["kld_mean"] < 0.005
    assert parity["candidate"]["cpu_fallback"] is False


@pytest.mark.slow
def test_op_the_htp_cannot_run_fails_validation_naming_it(tmp_path):
    out = tmp_path / "block32"
    proc = phikit("build", "recipes/tiny-phi3-w4a16-block32.yaml", "--target", "qualcomm-npu",
                  "--out", out, timeout=1800)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "CPU fallback disabled" in text and "MatMul" in text, text
    assert "Traceback" not in text
    assert not out.exists() and not (tmp_path / "block32.failed").exists()


@pytest.mark.slow
def test_htp_and_cpu_ep_agree_on_every_prefill_shape(npu_bundle):
    """Padded first chunk (QNN pads left, the CPU kernel right), exact chunk, shifted partial
    chunk: the same graphs on both providers give the same distributions."""
    from toolkit.parity import log_softmax
    from toolkit.runner.qnn_rt import QnnSession

    htp = QnnSession(npu_bundle / "model", {"threads": 1})
    cpu = QnnSession(npu_bundle / "model", {"threads": 1, "execution_provider": "cpu"})
    assert cpu.info()["execution_provider"] == "CPUExecutionProvider"
    ids = htp.tokenize((REPO / "evalsets" / "tiny-phi3-calibration.txt").read_text()[:2000])
    for n in (20, 64, 100):
        p, q = (log_softmax(s.logits(ids[:n]).astype(np.float64)) for s in (htp, cpu))
        assert p.shape == (n, 32064)
        kld = (np.exp(p) * (p - q)).sum(-1)
        assert kld.mean() < 1e-3, (n, kld.mean())
