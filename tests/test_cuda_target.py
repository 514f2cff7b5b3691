"""nvidia-cuda: the target, the plan, the runner's provider fallback, and (slow) the real build.

No GPU here: the runner finds the CUDA execution provider unavailable (onnxruntime-genai without
its CUDA library) and runs the same graph on the CPU execution provider, which takes the fp16
graphs the builder writes for cuda; validation says so. A graph the CPU provider cannot run
fails with "needs CUDA" (exit 2), checked here with a stand-in for onnxruntime_genai."""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import shutil
import sys

import pytest

from conftest import REPO, TINY, build_bundle, phikit
from toolkit.backends import BACKENDS
from toolkit.backends.onnx import BACKEND as ONNX
from toolkit.build import make_plan
from toolkit.errors import PhikitError
from toolkit.runner import ortgenai
from toolkit.runner.core import BundleError, open_session
from toolkit.schema import load_target

TARGET = REPO / "targets" / "nvidia-cuda.yaml"


def test_target_loads():
    t = load_target(TARGET, set(BACKENDS))
    assert (t.device, t.backend, t.execution_provider) == ("gpu", "onnx", "cuda")
    assert set(t.precisions) == {"int4", "int8", "fp16"}
    assert (t.platform.os, t.platform.arch) == ("linux", "x86_64")


def test_lock_pins_the_cuda_runtime_of_the_builder_version():
    """The graph is made by the installed builder; the device runs the CUDA build of the same
    ONNX Runtime GenAI version (constraints.txt pins the CPU one)."""
    packages = load_target(TARGET, set(BACKENDS)).runtime.packages["onnx"]
    pins = dict(p.split("==") for p in packages if "==" in p)  # tokenizers: any version
    assert pins["onnxruntime-genai-cuda"] == md.version("onnxruntime-genai")
    assert "onnxruntime-gpu" in pins
    # the CPU builds install the same Python modules: never both in one venv
    assert not {"onnxruntime", "onnxruntime-genai"} & set(pins)


@pytest.mark.parametrize("precision", ["int4", "fp16"])
def test_plan_builds_for_cuda_without_the_cpu_defaults(precision, tmp_path):
    plan = make_plan(f"recipes/tiny-phi3-{precision}.yaml", "nvidia-cuda", out=tmp_path / "b")
    assert "provider cuda" in plan.steps[1]
    cmd = ONNX.builder_command(TINY, tmp_path / "o", plan.recipe, plan.target, tmp_path / "c",
                               plan.info)
    assert cmd[cmd.index("-e") + 1] == "cuda" and cmd[cmd.index("-p") + 1] == precision
    # accuracy_level 4 and a pruned lm_head are measured CPU defaults, not applied for cuda
    assert not any(a.startswith(("accuracy_level=", "prune_lm_head=")) for a in cmd)
    assert ONNX.runtime_options(plan.target, plan.recipe)["execution_provider"] == "cuda"


def test_fp16_still_refused_on_cpu(tmp_path):
    with pytest.raises(PhikitError, match="fp16"):
        make_plan("recipes/tiny-phi3-fp16.yaml", "generic-cpu", out=tmp_path / "b")


def test_list_shows_the_target():
    proc = phikit("list", check=0)
    assert re.search(r"nvidia-cuda\s.*gpu.*onnx.*cuda", proc.stdout)


# -- the runner's provider decision, with a stand-in for onnxruntime_genai ------------------------

class FakeOg:
    """og.Config / og.Model / og.Tokenizer / og.GeneratorParams as far as the runner's set-up
    uses them. A Model fails for each provider named in `broken` the way ORT GenAI does
    (RuntimeError)."""

    __version__ = "0.18.0"

    def __init__(self, broken: dict[str, str]):
        self.broken, self.models = broken, []
        og = self

        class Config:
            def __init__(self, path):
                self.providers = ["from-genai-config"]

            def overlay(self, text):
                json.loads(text)

            def clear_providers(self):
                self.providers = []

            def append_provider(self, name):
                self.providers.append(name)

            def set_provider_option(self, name, key, value):
                pass

        class Model:
            def __init__(self, config):
                provider = config.providers[-1] if config.providers else "cpu"
                if provider in og.broken:
                    raise RuntimeError(og.broken[provider] + "\nsecond line")
                self.provider = provider
                og.models.append(provider)

        class GeneratorParams:  # a build without guidance: no set_guidance
            pass

        self.Config, self.Model, self.Tokenizer = Config, Model, lambda model: object()
        self.GeneratorParams = GeneratorParams


CUDA_MISSING = ("Cuda interface not available: Failed to load library: /x/site-packages/"
                "onnxruntime_genai/libonnxruntime-genai-cuda.so: cannot open shared object file")


@pytest.fixture
def model_dir(tmp_path):
    genai = {"model": {"context_length": 2048, "vocab_size": 32064, "eos_token_id": [32000],
                       "decoder": {"session_options": {"provider_options": [
                           {"cuda": {"enable_cuda_graph": "0"}}]}}}}
    (tmp_path / "genai_config.json").write_text(json.dumps(genai))
    shutil.copy(REPO / "models" / "tiny-phi3" / "tokenizer.json", tmp_path)  # the runner reads it
    return tmp_path


def test_cuda_unavailable_falls_back_to_cpu_and_says_so(monkeypatch, model_dir, capsys):
    og = FakeOg({"cuda": CUDA_MISSING})
    monkeypatch.setattr(ortgenai, "og", og)
    session = ortgenai.open_session(model_dir, {"execution_provider": "cuda", "threads": 2})
    assert og.models == ["cpu"]
    info = session.info()
    assert info["execution_provider"] == "cpu" and info["requested_execution_provider"] == "cuda"
    (note,) = info["notes"]
    assert "built for cuda" in note and "CPU execution provider on the same graph" in note
    assert "libonnxruntime-genai-cuda.so" in note and "/x/" not in note  # file name, no path
    assert "second line" not in note
    assert "running the same graph on the CPU execution provider" in capsys.readouterr().err


def test_provider_defaults_to_the_one_genai_config_names(monkeypatch, model_dir):
    """A bare builder directory (no manifest options) runs on the provider it was built for."""
    og = FakeOg({})
    monkeypatch.setattr(ortgenai, "og", og)
    info = ortgenai.open_session(model_dir, {}).info()
    assert og.models == ["cuda"] and info["execution_provider"] == "cuda"
    assert info["notes"] == []


def test_cpu_requested_runs_cpu_even_for_a_cuda_config(monkeypatch, model_dir):
    og = FakeOg({"cuda": CUDA_MISSING})
    monkeypatch.setattr(ortgenai, "og", og)
    info = ortgenai.open_session(model_dir, {"execution_provider": "cpu"}).info()
    assert og.models == ["cpu"] and info["notes"] == []


def test_graph_the_cpu_provider_cannot_run_needs_cuda(monkeypatch, model_dir):
    og = FakeOg({"cuda": CUDA_MISSING, "cpu": "Could not find an implementation for "
                 "SparseAttention(1) node with name 'attn'"})
    monkeypatch.setattr(ortgenai, "og", og)
    with pytest.raises(BundleError, match=r"needs CUDA: the cuda execution provider does not "
                       r"start here \(Cuda interface.*\) and the CPU execution provider cannot "
                       r"run this graph \(Could not find an implementation for SparseAttention"):
        open_session("ortgenai", model_dir, {"execution_provider": "cuda"})


def test_validate_exits_2_with_needs_cuda(monkeypatch, model_dir, capsys):
    """Through the CLI: the open fails before any reference is computed, exit 2, one line."""
    from toolkit import cli

    monkeypatch.setattr(ortgenai, "og", FakeOg({"cuda": CUDA_MISSING, "cpu": "no CPU kernel"}))
    # validation runs the runtime in a child process, which the fake cannot reach: open it in
    # this one (the message and exit code are the CLI's either way)
    from toolkit import validate
    from toolkit.runner.core import open_session

    monkeypatch.setattr(validate, "local_session",
                        lambda module, model_dir, options, runner=None: open_session(
                            module, model_dir, options))
    monkeypatch.setattr(sys, "argv", ["phikit", "validate", str(model_dir), "--reference",
                                      str(TINY)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "needs CUDA" in err and "no CPU kernel" in err and "Traceback" not in err


# -- the real builder and runtime ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int4", "fp16"])
def test_build_for_cuda_then_validate_on_the_cpu_provider(precision, dist, tmp_path):
    bundle = build_bundle(dist, precision, "nvidia-cuda")
    genai = json.loads((bundle / "model" / "genai_config.json").read_text())
    (options,) = genai["model"]["decoder"]["session_options"]["provider_options"]
    assert "cuda" in options
    lock = (bundle / "requirements.lock").read_text()
    assert f"onnxruntime-genai-cuda=={md.version('onnxruntime-genai')}" in lock
    assert "onnxruntime-gpu==" in lock
    assert not re.search(r"^(onnxruntime|onnxruntime-genai|nvidia-[\w-]+)==", lock, re.M)
    assert not (bundle / "wheels").exists()  # the lock only: onnxruntime-gpu alone is 256 MB

    report_path = tmp_path / "r.json"
    proc = phikit("validate", bundle, "--json", report_path, check=0)
    report = json.loads(report_path.read_text())
    assert report["verdict"] == "pass"
    candidate = report["candidate"]
    assert (candidate["execution_provider"], candidate["requested_execution_provider"]) == (
        "cpu", "cuda")
    assert any("CPU execution provider on the same graph" in n for n in report["notes"])
    assert "CPU execution provider on the same graph" in " ".join(proc.stdout.split())
    # figures from the CPU provider (tiny-phi3: int4 KLD mean 0.0064, fp16 7e-7)
    assert report["metrics"]["kld_mean"] < (0.02 if precision == "int4" else 1e-5)
