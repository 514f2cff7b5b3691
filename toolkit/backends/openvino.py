"""OpenVINO: convert with optimum-intel (`optimum-cli export openvino`, NNCF weight compression).

The plain path is exactly the CLI users know. Data-aware compression (AWQ, scale estimation,
mixed int4/int8 by sensitivity) needs calibration text; the CLI only takes hub dataset names,
so phikit runs optimum-intel's Python API with the recipe's local text instead (same NNCF code).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, ClassVar, Literal

from pydantic import Field

from ..checkpoint import ModelInfo
from ..errors import PhikitError
from ..schema import BackendOptions, Recipe, Target
from .common import BackendDefaults, Honest, describe_quantization, first_import_error, run_tool, versions

ARCHITECTURES = {"Phi3ForCausalLM", "PhiMoEForCausalLM"}
DEVICES = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU"}
# Recipe options (quantization.options.openvino) and the CLI flags they become.
FLAGS = {"ratio": "--ratio", "all_layers": "--all-layers", "backup_precision": "--backup-precision",
         "awq": "--awq", "scale_estimation": "--scale-estimation", "gptq": "--gptq",
         "sensitivity_metric": "--sensitivity-metric", "num_samples": "--num-samples",
         "group_size_fallback": "--group-size-fallback"}
DATA_AWARE = {"awq", "scale_estimation", "gptq"}
STREAMED_EXPORT = "toolkit.backends.openvino_stream"


class OpenVinoOptions(BackendOptions):
    """optimum-cli export openvino's weight-compression flags (FLAGS)."""
    label: ClassVar[str] = "OpenVINO"
    ratio: float | None = Field(None, gt=0, le=1)
    all_layers: bool | None = None
    backup_precision: Literal["none", "int8_sym", "int8_asym"] | None = None
    awq: bool | None = None
    scale_estimation: bool | None = None
    gptq: bool | None = None
    sensitivity_metric: str | None = None
    num_samples: int | None = Field(None, gt=0)
    group_size_fallback: Literal["error", "ignore", "adjust"] | None = None


class OpenVinoBackend(BackendDefaults):
    name = "openvino"
    home_target = "intel-cpu"
    runtime_module = "openvino_rt"
    tool = "optimum-cli export openvino"
    float_intermediate = True  # optimum-intel saves the float IR, then NNCF compresses it
    exact_tokenizer = False  # optimum-intel converts the tokenizer; its drift is reported, not fatal
    # The CPU plugin picks its numerics per CPU: bf16 inference where the CPU has AVX512-BF16
    # or AMX, int8 activations in groups of 32 (dynamic quantization) where it has VNNI, f32
    # and float activations elsewhere. An int8 bundle measures 2.8e-5 KLD one way and 1.1e-4
    # the other, so bounds from one CPU failed honest bundles on the next.
    honest_numerics = {
        "f32, float activations (no bf16, no VNNI)": {
            "inference_precision": "f32", "dynamic_quantization_group_size": 0},
        "f32, int8 activations per 32 (VNNI without bf16)": {
            "inference_precision": "f32", "dynamic_quantization_group_size": 32},
        "bf16, int8 activations per 32 (AVX512-BF16 or AMX, VNNI)": {
            "inference_precision": "bf16", "dynamic_quantization_group_size": 32},
    }
    # tiny-phi3's recipes on its eval set (bench/honest_bounds.py), the worst of
    # honest_numerics: the default bounds' base
    honest = {
        "int4": Honest(kld_mean=0.00213, kld_p99=0.0103, top1=0.9551, ppl_ratio=0.9924,
                       greedy_match_mean=14.6, kld_p999=0.0162),
        "int8": Honest(kld_mean=7.98e-05, kld_p99=0.000361, top1=0.9908, ppl_ratio=1.0009,
                       greedy_match_mean=21.6, kld_p999=0.000601),
        "fp32": Honest(kld_mean=3.22e-10, kld_p99=7.23e-09, top1=1, ppl_ratio=1,
                       greedy_match_mean=27.6, kld_p999=1.29e-08),
    }

    def unavailable(self) -> str | None:
        return first_import_error("openvino", "openvino_genai", "openvino_tokenizers",
                                  "optimum.intel", "nncf")

    options_model = OpenVinoOptions

    def given(self, recipe: Recipe) -> dict:
        return self.options(recipe).given()

    def support(self, info: ModelInfo | None, target: Target, recipe: Recipe) -> str | None:
        quant = recipe.quantization
        opts = self.given(recipe)
        if DATA_AWARE & {k for k, v in opts.items() if v} and quant.calibration is None:
            return "AWQ / scale estimation / GPTQ need quantization.calibration (a local text file)"
        if quant.precision != "int4" and (DATA_AWARE | {"ratio"}) & set(opts):
            return "ratio / AWQ / scale estimation apply to int4 only"
        if target.device not in DEVICES:
            return f"no OpenVINO device for {target.device!r}"
        if info is not None and info.architecture == "Phi3VForCausalLM":
            return ("optimum-intel exports Phi3V as image-text-to-text (OpenVINO GenAI's "
                    "VLMPipeline); phikit's OpenVINO runner and validator are text-only")
        if info is not None and info.architecture not in ARCHITECTURES:
            return f"optimum-intel has no OpenVINO export config for {info.architecture}"
        return None

    def recognizes(self, path: Path) -> bool:
        return (path / "openvino_model.xml").is_file()

    def cli_command(self, source: Path, out: Path, recipe: Recipe) -> list[str]:
        quant = recipe.quantization
        cmd = ["optimum-cli", "export", "openvino", "-m", str(source),
               "--task", "text-generation-with-past", "--weight-format", quant.precision]
        if recipe.trust_remote_code:
            cmd.append("--trust-remote-code")
        if quant.precision in ("int4", "int8"):
            if quant.symmetric:
                cmd.append("--sym")
            if quant.precision == "int4":
                cmd += ["--group-size", str(quant.block_size)]
        for key, value in self.given(recipe).items():
            if value is True:
                cmd.append(FLAGS[key])
            elif value not in (False, None):
                cmd += [FLAGS[key], str(value)]
        return cmd + [str(out)]

    def convert(self, source: Path, out: Path, recipe: Recipe, target: Target,
                log: Callable[[str], None]) -> None:
        quant = recipe.quantization
        if quant.calibration is not None and quant.precision == "int4":
            spec = {"source": str(source), "out": str(out), "calibration": str(quant.calibration),
                    "bits": 4, "sym": quant.symmetric, "group_size": quant.block_size,
                    **self.given(recipe)}
            cmd = [sys.executable, "-m", "toolkit.backends.openvino_calibrated", json.dumps(spec)]
        else:
            # optimum-cli's own command line, with the weights mapped and their pages given back
            # as the export moves past them (openvino_stream.py): the same files, in less memory
            cmd = [sys.executable, "-m", STREAMED_EXPORT, *self.cli_command(source, out,
                                                                            recipe)[1:]]
        run_tool(cmd, log, "optimum-intel export", out / "openvino_model.xml",
                 cwd=Path(__file__).resolve().parents[2])
        if not (out / "openvino_tokenizer.xml").is_file():
            raise PhikitError("optimum-intel wrote no openvino_tokenizer.xml (is "
                              "openvino-tokenizers installed?)")

    def describe(self, recipe: Recipe, target: Target, info: ModelInfo | None = None) -> str:
        return describe_quantization(recipe, target)

    def runtime_options(self, target: Target, recipe: Recipe) -> dict:
        options = {"device": DEVICES[target.device], "threads": target.runtime.threads,
                   **target.runtime.options}
        if recipe.quantization.precision == "fp32":
            # OpenVINO's CPU plugin computes in bf16 by default where the CPU has it; an fp32
            # bundle promises fp32 math.
            options["inference_precision"] = "f32"
        return options

    def host_notes(self, cpu: dict) -> list[str]:
        fp16 = "avx512_fp16" in cpu["features"]
        return [("f16 hints run in fp16 here (AVX512-FP16)" if fp16 else
                 "f16 hints fall back to f32 here (no native fp16)"),
                "a GPU target without a GPU runs on CPU at the precision the CPU's host table "
                "gives (its f16 hint is dropped; the report names the executed precision)"]

    def toolchain(self) -> dict[str, str]:
        return versions("optimum-intel", "optimum", "openvino", "openvino-genai",
                     "openvino-tokenizers", "nncf", "transformers", "torch")


BACKEND = OpenVinoBackend()
