"""Qualcomm NPU (QNN HTP): Olive's static-LLM pipeline, the way Microsoft builds Phi for it.

Olive (microsoft/olive-recipes, Phi-3.5-mini aitk/phi3_5_qnn_config.json) chains CaptureSplitInfo
-> GPTQ -> ModelBuilder -> MatMulNBitsToQDQ -> GraphSurgeries -> fp16 GroupQueryAttention ->
OnnxStaticQuantization (16-bit activations, 8-bit weights) -> SplitModel -> StaticLLM. Microsoft's
recipe calibrates on CUDA with a hub dataset; phikit calibrates on the CPU from the recipe's local
text, uses Olive's own CPU GPTQ (`Gptq`, not the CUDA-only `GptqModel`), and then fixes every
shape the HTP compiles statically (KV cache = the recipe's context_length, prefill chunk, one-token
step) in `_fix_shapes`.

Olive 0.13's ModelBuilder pass imports onnxruntime_genai.models.quantized_model, which the 0.18
builder the onnx backend uses no longer has: olive_genai.py finds (or installs) the older
release in a directory of its own that only the Olive subprocess sees.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, ClassVar, Literal

from pydantic import Field

from ..checkpoint import ModelInfo, read_model_info
from ..paths import EVALSETS_DIR
from ..schema import BackendOptions, Recipe, Target
from . import olive_genai
from .common import BackendDefaults, first_import_error, provider_runtime_options, run_tool, versions

# Tokenizer and generation files the runner reads beside the graphs.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json", "special_tokens_map.json", "config.json")
SURGERIES = ["RemoveRopeMultiCache", "AttentionMaskToSequenceLengths",
             "SimplifiedLayerNormToL2Norm"]


class QnnOptions(BackendOptions):
    label: ClassVar[str] = "QNN"
    chunk: int | None = Field(None, gt=0)  # prefill chunk (tokens per graph call)
    slices: int | None = Field(None, gt=0)  # the decoder split into this many graphs
    activation_type: Literal["uint16", "uint8"] | None = None
    calibration_samples: int | None = Field(None, gt=0)


class QnnBackend(BackendDefaults):
    name = "qnn"
    home_target = "qualcomm-npu"
    # the NPU runs static, calibrated W8A16 graphs (measured on Qualcomm's HTP simulator)
    demo_recipe = "tiny-phi3-w8a16"
    # 2: the KV-cache dtype in qnn_pipeline.json is read from the graph
    revision = 2
    runtime_module = "qnn_rt"
    tool = "olive run (QNN static LLM passes)"
    exact_tokenizer = False  # the checkpoint's tokenizer.json is used as it is

    @property
    def install(self) -> str:
        from ..installing import pip_install_hint

        return pip_install_hint("phikit[qnn]")

    def unavailable(self) -> str | None:
        # no onnxruntime-genai for Olive yet is fine: convert() installs the pinned one
        return first_import_error("olive", "onnxruntime", "onnxruntime_qnn", "datasets",
                                  "tokenizers")

    options_model = QnnOptions

    def options(self, recipe: Recipe, info: ModelInfo | None = None) -> dict:
        """quantization.options.qnn with phikit's defaults filled in (slices: one per 8
        layers of this model)."""
        given = super().options(recipe).given()
        layers = info.num_layers if info else 32
        return {"chunk": 64, "slices": max(1, layers // 8), "activation_type": "uint16",
                "calibration_samples": 32, **given}

    def support(self, info: ModelInfo | None, target: Target, recipe: Recipe) -> str | None:
        quant = recipe.quantization
        if quant.precision not in ("int4", "int8"):
            return "the HTP runs quantized graphs: int4 (W4A16) or int8 (W8A16) weights"
        if quant.calibration is None:
            return ("static quantization of the activations needs calibration text "
                    "(quantization.calibration)")
        if recipe.context_length is None:
            return "the HTP compiles a fixed KV cache: set context_length"
        opts = self.options(recipe, info)
        if recipe.context_length < opts["chunk"]:
            return f"context_length {recipe.context_length} is shorter than the prefill chunk {opts['chunk']}"
        if info is None:
            return None
        if info.architecture != "Phi3ForCausalLM":
            return f"Olive's static LLM passes are validated here for Phi3ForCausalLM only, not {info.architecture}"
        if info.head_size % 16:
            return f"head size {info.head_size} is not a multiple of 16 (GroupQueryAttention)"
        if info.sliding_window and info.sliding_window < recipe.context_length:
            return (f"the static graphs attend over the whole KV cache: context_length "
                    f"{recipe.context_length} must not exceed the sliding window {info.sliding_window}")
        if info.longrope and recipe.context_length > info.original_max_positions:
            return (f"LongRoPE: Olive's RemoveRopeMultiCache keeps the short-factor rotary cache "
                    f"only, so the static graphs serve at most the original length "
                    f"{info.original_max_positions} (context_length {recipe.context_length})")
        if opts["slices"] > info.num_layers:
            return f"slices {opts['slices']} > {info.num_layers} layers"
        return None

    def recognizes(self, path: Path) -> bool:
        return (path / "qnn_pipeline.json").is_file()

    def olive_config(self, source: Path, work: Path, recipe: Recipe, info: ModelInfo) -> dict:
        quant, opts = recipe.quantization, self.options(recipe, info)
        text = {"data_name": "text", "data_files": str(quant.calibration), "split": "train"}
        samples = int(opts["calibration_samples"])
        data = [
            {"name": "calib_joined", "type": "HuggingfaceContainer", "load_dataset_config": text,
             "pre_process_data_config": {"strategy": "join", "add_special_tokens": False,
                                         "max_seq_len": 256, "max_samples": max(1, samples // 2)}},
            {"name": "calib_lines", "type": "HuggingfaceContainer", "load_dataset_config": text,
             "pre_process_data_config": {"strategy": "line-by-line", "add_special_tokens": True,
                                         "max_seq_len": opts["chunk"] * 2,
                                         "max_samples": samples}},
        ]
        passes: dict[str, dict] = {
            "cs": {"type": "CaptureSplitInfo", "num_splits": opts["slices"],
                   "unique_embeds_lm_head_splits": True}}
        if quant.precision == "int4":
            # GPTQ per output channel (block_size -1) as Microsoft's recipe; the lm_head stays
            # float here and becomes 8-bit per channel in static quantization (the 4-bit
            # block-quantized lm_head of a plain builder run is rejected by the HTP)
            passes["gptq"] = {"type": "Gptq", "bits": 4, "sym": quant.symmetric,
                              "group_size": quant.block_size, "data_config": "calib_joined"}
            passes["mb"] = {"type": "ModelBuilder", "precision": "int4",
                            "int4_nodes_to_exclude": ["/lm_head/MatMul"]}
            passes["mq"] = {"type": "MatMulNBitsToQDQ", "use_int4": True, "add_zero_point": True,
                            "save_as_external_data": True}
        else:  # W8A16: float graph, weights quantized per channel with the activations
            passes["mb"] = {"type": "ModelBuilder", "precision": "fp32"}
        passes.update({
            "gs": {"type": "GraphSurgeries", "surgeries": [{"surgeon": s} for s in SURGERIES],
                   "save_as_external_data": True},
            "f16": {"type": "OnnxFloatToFloat16", "op_include_list": ["GroupQueryAttention"],
                    "keep_io_types": ["logits"], "save_as_external_data": True},
            "sq": {"type": "OnnxStaticQuantization", "data_config": "calib_lines",
                   "activation_type": opts["activation_type"], "precision": "uint8",
                   "per_channel": True, "calibration_providers": ["CPUExecutionProvider"],
                   "quant_preprocess": True, "save_as_external_data": True,
                   "op_types_to_exclude": ["GatherBlockQuantized", "GroupQueryAttention",
                                           "MatMulNBits"]},
            "sp": {"type": "SplitModel"},
            "st": {"type": "StaticLLM", "batch_size": 1, "context_length": opts["chunk"]},
        })
        return {"input_model": {"type": "HfModel", "model_path": str(source)},
                "systems": {"local": {"type": "LocalSystem", "accelerators": [
                    {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
                "data_configs": data, "passes": passes, "host": "local", "target": "local",
                "log_severity_level": 1, "output_dir": str(work / "olive-out"),
                "cache_dir": str(work / "olive-cache"), "no_artifacts": True,
                "evaluate_input_model": False}

    def convert(self, source: Path, out: Path, recipe: Recipe, target: Target,
                log: Callable[[str], None]) -> None:
        info = read_model_info(source)
        work = out.parent / f"{out.name}.olive"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            config = work / "olive_config.json"
            config.write_text(json.dumps(self.olive_config(source, work, recipe, info), indent=2))
            genai_dir = olive_genai.ensure(log)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                p for p in (str(genai_dir), os.environ.get("PYTHONPATH")) if p)}
            if Path(source).is_dir():
                env["HF_HUB_OFFLINE"] = "1"  # local checkpoint and local calibration text
            run_tool([sys.executable, "-m", "olive", "run", "--config", str(config)], log,
                     "Olive (QNN static LLM passes)", work / "olive-out" / "genai_config.json",
                     env=env)
            from .qnn_static import fix_shapes

            fix_shapes(work / "olive-out", out, recipe.context_length, source, TOKENIZER_FILES)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def describe(self, recipe: Recipe, target: Target, info: ModelInfo | None = None) -> str:
        quant, opts = recipe.quantization, self.options(recipe, info)
        scheme = "W{}A{}".format(4 if quant.precision == "int4" else 8,
                                 16 if opts["activation_type"] == "uint16" else 8)
        method = "GPTQ, " if quant.precision == "int4" else ""
        per = "per channel" if quant.block_size == -1 else f"block {quant.block_size}"
        calib = quant.calibration.name if quant.calibration else "none"
        return (f"{scheme} QDQ ({method}{per}), calibration {calib}, {opts['slices']} slice(s), "
                f"prefill chunk {opts['chunk']}, KV cache {recipe.context_length}, "
                f"provider {target.execution_provider}")

    def runtime_options(self, target: Target, recipe: Recipe) -> dict:
        return provider_runtime_options(target)

    def matrix_form(self, info: ModelInfo, precision: str) -> tuple[dict, dict]:
        """The NPU compiles static, calibrated graphs: per-channel weights, calibration text,
        and a KV cache within the window and the original length (Microsoft's Phi-3.5 QNN
        models serve 4096 tokens at most)."""
        return ({"precision": precision, "block_size": -1,
                 "calibration": EVALSETS_DIR / "tiny-phi3-calibration.txt"},
                {"context_length": min(info.sliding_window or 4096, info.original_max_positions,
                                       4096)})

    def host_notes(self, cpu: dict) -> list[str]:
        return [] if cpu["machine"] in ("arm64", "aarch64") else [
            "Qualcomm's HTP simulator on this CPU"]

    def toolchain(self) -> dict[str, str]:
        out = versions("olive-ai", "onnxruntime", "onnxruntime-qnn", "onnx", "transformers",
                       "torch", "datasets")
        # the pin, installed or not yet: the same cache key before and after the install
        have = olive_genai.found()
        out["onnxruntime-genai (Olive)"] = (olive_genai.installed_version(have) if have else None) \
            or olive_genai.version()
        return out


BACKEND = QnnBackend()
