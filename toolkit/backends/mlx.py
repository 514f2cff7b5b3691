"""MLX: convert with mlx-lm (`python -m mlx_lm convert`), 4/8-bit affine or mixed presets."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, ClassVar

from ..checkpoint import ModelInfo
from ..schema import BackendOptions, Recipe, Target
from .common import BackendDefaults, Honest, describe_quantization, first_import_error, run_tool, versions

ARCHITECTURES = {"Phi3ForCausalLM", "PhiMoEForCausalLM", "Phi3SmallForCausalLM"}
GROUP_SIZES = {32, 64, 128}
BITS = {"int4": 4, "int8": 8}
DTYPES = {"fp16": "float16", "fp32": "float32"}
PRESETS = {"mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"}


class MlxOptions(BackendOptions):
    label: ClassVar[str] = "MLX"
    quant_predicate: str | None = None  # an mlx-lm mixed-precision preset: checked by support()


class MlxBackend(BackendDefaults):
    name = "mlx"
    home_target = "apple-metal"
    # off the Mac the demo runs MLX's Linux CPU backend, whose quantized kernels are slow
    off_device_precision = "fp32"
    runtime_module = "mlx_rt"
    tool = "mlx_lm convert"
    exact_tokenizer = False  # the checkpoint's tokenizer files are used as they are
    # tiny-phi3's recipes on its eval set (bench/honest_bounds.py): the default bounds' base
    honest = {
        "int4": Honest(kld_mean=0.00604, kld_p99=0.0238, top1=0.905, ppl_ratio=1.004,
                       greedy_match_mean=7.13),
        "int8": Honest(kld_mean=1.93e-05, kld_p99=7.04e-05, top1=0.9974, ppl_ratio=0.9996,
                       greedy_match_mean=21.6),
        "fp32": Honest(kld_mean=1.09e-09, kld_p99=2.53e-08, top1=1, ppl_ratio=1,
                       greedy_match_mean=27.8),
    }

    def unavailable(self) -> str | None:
        return first_import_error("mlx.core", "mlx_lm")

    options_model = MlxOptions

    def preset(self, recipe: Recipe) -> str | None:
        return self.options(recipe).quant_predicate

    def support(self, info: ModelInfo | None, target: Target, recipe: Recipe) -> str | None:
        quant = recipe.quantization
        preset = self.preset(recipe)
        if preset is not None and preset not in PRESETS:
            return f"unknown mlx-lm quant_predicate {preset!r} (known: {', '.join(sorted(PRESETS))})"
        if quant.precision in BITS and quant.block_size not in GROUP_SIZES:
            return f"mlx-lm group sizes are 32, 64 or 128 (recipe has {quant.block_size})"
        if quant.calibration is not None:
            return ("mlx_lm convert quantizes without calibration data; this recipe asks for "
                    "data-aware quantization (quantization.calibration)")
        if info is not None and info.architecture == "Phi3VForCausalLM":
            return "mlx-lm is text-only: Phi3V's image model is mlx-vlm's, which phikit does not drive"
        if info is not None and info.architecture not in ARCHITECTURES:
            return f"mlx-lm has no model class for {info.architecture}"
        return None

    def recognizes(self, path: Path) -> bool:
        """mlx_lm.convert output: safetensors + config.json, and no other runtime's files."""
        return ((path / "config.json").is_file() and any(path.glob("*.safetensors"))
                and not (path / "genai_config.json").exists()
                and not (path / "openvino_model.xml").exists())

    def command(self, source: Path, out: Path, recipe: Recipe) -> list[str]:
        quant = recipe.quantization
        cmd = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(source),
               "--mlx-path", str(out)]
        if recipe.trust_remote_code:
            cmd.append("--trust-remote-code")
        if quant.precision in BITS:
            # MLX's affine quantization always stores a scale and a bias per group, so the
            # recipe's `symmetric` does not apply (the plan says so).
            cmd += ["-q", "--q-bits", str(BITS[quant.precision]),
                    "--q-group-size", str(quant.block_size)]
            if preset := self.preset(recipe):
                cmd += ["--quant-predicate", preset]
        else:
            cmd += ["--dtype", DTYPES[quant.precision]]
        return cmd

    def convert(self, source: Path, out: Path, recipe: Recipe, target: Target,
                log: Callable[[str], None]) -> None:
        cmd = self.command(source, out, recipe)
        run_tool(cmd, log, "mlx_lm convert", out / "config.json")
        (out / "README.md").unlink(missing_ok=True)  # mlx-lm's hub card, not part of the model

    def describe(self, recipe: Recipe, target: Target, info: ModelInfo | None = None) -> str:
        return describe_quantization(recipe, target)

    def runtime_options(self, target: Target, recipe: Recipe) -> dict:
        return dict(target.runtime.options)

    def host_notes(self, cpu: dict) -> list[str]:
        return [] if cpu["machine"] in ("arm64", "aarch64") else [
            "MLX's Linux CPU backend (slow for quantized kernels; Metal only on macOS)"]

    def toolchain(self) -> dict[str, str]:
        return versions("mlx-lm", "mlx", "transformers")


BACKEND = MlxBackend()
