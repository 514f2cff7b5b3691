"""ONNX Runtime GenAI: convert with its model builder (onnxruntime_genai.models.builder)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Callable

from ..checkpoint import ModelInfo
from ..schema import Recipe, Target
from .common import describe_quantization, first_import_error, run_tool, versions

# Architectures whose published config the 0.18 builder converts, as it names them.
ARCHITECTURES = {"Phi3ForCausalLM", "PhiMoEForCausalLM"}
# Execution providers the builder targets, as phikit target files name them.
PROVIDERS = {"cpu": "cpu", "cuda": "cuda", "dml": "dml", "webgpu": "webgpu"}
BUILDER_PRECISION = {"int4": "int4", "int8": "int8", "fp16": "fp16", "fp32": "fp32"}


class OnnxBackend:
    name = "onnx"
    runtime_module = "ortgenai"
    tool = "onnxruntime_genai.models.builder"
    exact_tokenizer = False  # the checkpoint's tokenizer files are used as they are

    def unavailable(self) -> str | None:
        return first_import_error("onnxruntime_genai", "onnxruntime", "onnx_ir", "onnxscript",
                                  "transformers")

    def support(self, info: ModelInfo | None, target: Target, recipe: Recipe) -> str | None:
        quant = recipe.quantization
        if target.execution_provider not in PROVIDERS:
            return f"the builder has no execution provider {target.execution_provider!r}"
        if quant.precision == "fp16" and target.execution_provider == "cpu":
            return "fp16 ONNX models need a GPU execution provider; use fp32 or int8 on CPU"
        if quant.precision in ("int4", "int8") and quant.block_size == -1:
            return "the builder quantizes block-wise only (block_size 16..256)"
        if quant.calibration is not None:
            return ("the ONNX Runtime GenAI builder quantizes without calibration data; this recipe asks for "
                    "data-aware quantization (quantization.calibration)")
        if info is None:
            return None
        if info.architecture not in ARCHITECTURES:
            return f"the ONNX Runtime GenAI builder does not convert {info.architecture}"
        if info.head_size % 16:
            return (f"head size {info.head_size} is not a multiple of 16 "
                    "(ORT GroupQueryAttention kernels need it)")
        return None

    def recognizes(self, path: Path) -> bool:
        return (path / "genai_config.json").is_file()

    def extra_options(self, recipe: Recipe, target: Target) -> dict[str, object]:
        """The builder's --extra_options: the recipe's fields, phikit's measured CPU defaults,
        then the recipe's raw `quantization.options.onnx.extra_options` (which win).

        CPU defaults (bench/runtime.py, Phi-3-mini shapes, this 2-core machine):
        - accuracy_level 4 (int8 activations in MatMulNBits) decoded 1.28x faster than the
          builder's 0 (fp32 activations), tiny-phi3 KLD unchanged (0.00642 vs 0.00640);
        - prune_lm_head: without it the graph computes lm_head (vocab 32064) for every prompt
          position, which made ONNX prefill several times slower than OpenVINO and llama.cpp.
          The runner then measures teacher-forced logits through the decode path."""
        quant = recipe.quantization
        extra: dict[str, object] = {}
        if quant.precision in ("int4", "int8"):
            extra["block_size"] = quant.block_size
            extra["is_symmetric"] = str(quant.symmetric).lower()
            level = quant.accuracy_level
            if level is None and target.execution_provider == "cpu":
                level = 4
            if level is not None:
                extra["accuracy_level"] = level
        if target.execution_provider == "cpu":
            extra["prune_lm_head"] = "true"
        extra.update(quant.options.get(self.name, {}).get("extra_options", {}))
        return extra

    def builder_command(self, source: Path, out: Path, recipe: Recipe, target: Target,
                        cache_dir: Path) -> list[str]:
        quant = recipe.quantization
        extra = self.extra_options(recipe, target)
        cmd = [sys.executable, "-m", self.tool, "-i", str(source), "-o", str(out),
               "-p", BUILDER_PRECISION[quant.precision],
               "-e", PROVIDERS[target.execution_provider], "-c", str(cache_dir)]
        if extra:
            cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra.items())]
        return cmd

    def convert(self, source: Path, out: Path, recipe: Recipe, target: Target,
                log: Callable[[str], None]) -> None:
        cache_dir = out.parent / f"{out.name}.hf-cache"
        cmd = self.builder_command(source, out, recipe, target, cache_dir)
        try:
            run_tool(cmd, log, "the ONNX Runtime GenAI builder", out / "genai_config.json")
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)
        self._tune(out, target, recipe)

    def _tune(self, out: Path, target: Target, recipe: Recipe) -> None:
        """genai_config.json for the device: the target's thread count (the runtime's default
        ran on one thread on 2-core Linux, half the speed; 'auto' is resolved by the runner on
        the device, so the config then carries none) and the recipe's context length (the KV
        cache ORT GenAI allocates)."""
        path = out / "genai_config.json"
        cfg = json.loads(path.read_text())
        if target.runtime.threads != "auto":
            cfg["model"]["decoder"].setdefault("session_options", {})[
                "intra_op_num_threads"] = int(target.runtime.threads)
        if recipe.context_length:
            cfg["model"]["context_length"] = recipe.context_length
            cfg.setdefault("search", {})["max_length"] = recipe.context_length
        path.write_text(json.dumps(cfg, indent=4) + "\n")

    def describe(self, recipe: Recipe, target: Target) -> str:
        extra = self.extra_options(recipe, target)
        tuned = [f"{k}={extra[k]}" for k in ("accuracy_level", "prune_lm_head") if k in extra]
        return describe_quantization(recipe, target) + (f", {', '.join(tuned)}" if tuned else "")

    def runtime_options(self, target: Target, recipe: Recipe) -> dict:
        return {"threads": target.runtime.threads, "execution_provider": target.execution_provider,
                **target.runtime.options}

    def toolchain(self) -> dict[str, str]:
        return versions("onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir", "onnxscript",
                     "transformers", "torch")


BACKEND = OnnxBackend()
