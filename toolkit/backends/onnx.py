"""ONNX Runtime GenAI: convert with its model builder (onnxruntime_genai.models.builder)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Callable, ClassVar

from ..artifact_checks import ArtifactFacts, Fact, eos_list, transformers_file_facts
from ..checkpoint import ModelInfo, read_model_info
from ..schema import BackendOptions, Recipe, Target
from .common import (BackendDefaults, Honest, describe_quantization, first_import_error, provider_runtime_options,
                     run_tool, versions)

# Architectures whose published config the 0.18 builder converts, as it names them.
# Phi3V: without exclude_embeds the builder writes the language model with its embeddings as a
# plain "phi3" text model (builder.py create_model) - a text-only bundle; images are dropped.
ARCHITECTURES = {"Phi3ForCausalLM", "PhiMoEForCausalLM", "Phi3SmallForCausalLM",
                 "Phi3VForCausalLM"}
MOE_REFUSAL = (
    "ONNX Runtime GenAI 0.18's builder stops on PhiMoE with 'The longrope RoPE style is not "
    "currently supported' (its Phi3MoELongRoPEModel lacks Phi3MiniLongRoPEModel's LongRoPE "
    "set-up) after forcing --execution_provider cuda; patched past that (and past its "
    "transformers-4 module names), ONNX Runtime's CPU MoE/QMoE kernels ignore PhiMoE's "
    "sparsemixer routing (use_sparse_mixer): KLD 0.09-0.64 on an fp32 tiny PhiMoE")
STREAMED_BUILDER = "toolkit.backends.onnx_stream"
# Execution providers the builder targets, as phikit target files name them.
PROVIDERS = {"cpu": "cpu", "cuda": "cuda", "dml": "dml", "webgpu": "webgpu"}
BUILDER_PRECISION = {"int4": "int4", "int8": "int8", "fp16": "fp16", "fp32": "fp32"}


# The nodes the builder's prune_lm_head puts between the final norm and the lm_head MatMul:
# Gather(axis 1, index -1) then Unsqueeze(axis 1), keeping the last position only
PRUNE_NODES = ("/lm_head/prune/Gather", "/lm_head/prune/Unsqueeze")


def write_all_logits_graph(out: Path) -> Path | None:
    """Beside a decoder whose lm_head the builder pruned, the same graph without the pruning
    (the runner's all_logits_file): teacher-forced logits then take one prefill, where the
    pruned graph gives them one token at a time through the decode path, a pass per token.
    Only the graph is written; its weights stay the decoder's external data file. No
    pruning, no file."""
    import onnx

    decoder = out / json.loads((out / "genai_config.json").read_text())["model"]["decoder"][
        "filename"]
    model = onnx.load(str(decoder), load_external_data=False)
    graph = model.graph
    found = {node.name: node for node in graph.node if node.name in PRUNE_NODES}
    if len(found) != len(PRUNE_NODES):
        return None
    gather, unsqueeze = (found[name] for name in PRUNE_NODES)
    for node in graph.node:
        node.input[:] = [gather.input[0] if name == unsqueeze.output[0] else name
                         for name in node.input]
    graph.node.remove(gather)
    graph.node.remove(unsqueeze)
    logits = next(o for o in graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].dim_param = "sequence_length"  # was 1
    from ..runner.ortgenai import all_logits_file  # the runner's name for it (imports the runtime)

    path = out / all_logits_file(decoder.name)
    onnx.save(model, str(path))
    return path


class OnnxOptions(BackendOptions):
    label: ClassVar[str] = "ONNX"
    # passed to the ORT GenAI builder's --extra_options as they are (they win over phikit's)
    extra_options: dict[str, str | int | float | bool] = {}


class OnnxBackend(BackendDefaults):
    name = "onnx"
    options_model = OnnxOptions
    home_target = "generic-cpu"
    # Bumped when phikit asks the builder for something different with the same recipe, so
    # cached conversions made before are not reused.
    revision = 3
    runtime_module = "ortgenai"
    tool = "onnxruntime_genai.models.builder"
    # the runner tokenizes with the checkpoint's tokenizer.json (runner/hf_tokens.py): any row
    # tokenized otherwise than by transformers is a defect
    exact_tokenizer = True
    # tiny-phi3's recipes on its eval set (bench/honest_bounds.py): the default bounds' base
    honest = {
        "int4": Honest(kld_mean=0.00663, kld_p99=0.033, top1=0.9113, ppl_ratio=0.9968,
                       greedy_match_mean=7.05, kld_p999=0.0475),
        "int8": Honest(kld_mean=5.33e-05, kld_p99=0.000232, top1=0.9922, ppl_ratio=1.0002,
                       greedy_match_mean=24.3, kld_p999=0.000348),
        "fp32": Honest(kld_mean=3.22e-10, kld_p99=7.29e-09, top1=1, ppl_ratio=1,
                       greedy_match_mean=27.6, kld_p999=1.3e-08),
    }

    def unavailable(self) -> str | None:
        return first_import_error("onnxruntime_genai", "onnxruntime", "onnx_ir", "onnxscript",
                                  "transformers")

    def default_block_size(self, precision: str, target: Target) -> int:
        """int4 on the CPU provider of an x86-64 target: 128. MLAS runs MatMulNBits with int8
        activations (accuracy level 4) through a kernel per block length, and on x86 its
        block-32 kernel decodes and prefills slower than its block-128 one (bench/runtime.py's
        onnx-int4-block32 engine); 128 is also the block of Microsoft's own CPU int4
        Phi-3.5-mini. ARM targets keep 32: their kernels are others, unmeasured for speed, and
        the tiny fixture's perplexity ratio under them passed its default bound at 32 and not
        at 128. int8 and the GPU providers keep the builder's 32."""
        x86_cpu = target.execution_provider == "cpu" and target.platform.arch == "x86_64"
        return 128 if precision == "int4" and x86_cpu else 32

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
        if info.architecture == "PhiMoEForCausalLM":
            return MOE_REFUSAL
        if info.architecture == "Phi3SmallForCausalLM" and target.execution_provider != "cuda":
            return ("Phi-3-small's block-sparse attention becomes ONNX Runtime's SparseAttention "
                    "operator, which has a CUDA kernel only")
        return None

    def recognizes(self, path: Path) -> bool:
        return (path / "genai_config.json").is_file()

    def artifact_facts(self, model_dir: Path) -> ArtifactFacts:
        """genai_config.json besides the transformers files: ORT GenAI's KV cache size and
        generation limit, and the EOS set it stops on."""
        out = transformers_file_facts(model_dir)
        try:
            cfg = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            out.notes.append(f"genai_config.json does not read: {e}")
            return out
        model, search = cfg.get("model", {}), cfg.get("search", {})
        name = "genai_config.json"
        if "context_length" in model:
            out.facts.append(Fact(name, "model.context_length", model["context_length"],
                                  "context"))
        if "max_length" in search:
            out.facts.append(Fact(name, "search.max_length", search["max_length"], "context"))
        if "eos_token_id" in model:
            out.facts.append(Fact(name, "model.eos_token_id", eos_list(model["eos_token_id"]),
                                  "eos_set"))
        return out

    def extra_options(self, recipe: Recipe, target: Target,
                      info: ModelInfo | None = None) -> dict[str, object]:
        """The builder's --extra_options: the recipe's fields, phikit's measured CPU defaults,
        then the recipe's raw `quantization.options.onnx.extra_options` (which win).

        CPU defaults (measured side by side by bench/runtime.py; figures in
        docs/benchmarks.md):
        - accuracy_level 4 (int8 activations in MatMulNBits) decodes faster than the builder's
          0 (fp32 activations) at an unchanged KLD;
        - prune_lm_head: without it the graph computes lm_head (vocab 32064) for every prompt
          position, which makes prefill several times slower."""
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
        # The runner's teacher-forced logits then come from the all-logits graph written beside
        # it (write_all_logits_graph), in one prefill as the reference computes them: with
        # LongRoPE that matters, since a full-sequence forward rotates every position with the
        # long factors once it passes the original length, while one token at a time keeps the
        # short factors in the KV cache for the positions before it.
        if target.execution_provider == "cpu":
            extra["prune_lm_head"] = "true"
        if info and info.sliding_window:
            # with layer_types (see _staged_source) the builder gives GroupQueryAttention its
            # local_window_size; its windowed KV cache would cap every cache at window + 16 and
            # fail on longer runs, so the full cache is kept and the window lives in attention
            extra["windowed_kv_cache"] = "false"
        if recipe.trust_remote_code:  # the builder's own switch for AutoConfig/AutoTokenizer
            extra["hf_remote"] = "true"
        extra.update(self.options(recipe).extra_options)
        return extra

    @staticmethod
    def _staged_source(source: Path, info: ModelInfo, staged: Path) -> Path:
        """The 0.18 builder windows only the layers its config marks `sliding_attention` in
        `layer_types`, which Phi-3's published config has no field for: without it every
        attention node gets local_window_size -1 (the window silently dropped) while
        genai_config still caps the KV cache at the window, so runs past window + 16 tokens
        fail. A copy of the checkpoint (links to its files) whose config.json says every layer
        is windowed, as the Phi-3 architecture is, gives the builder what it keys on."""
        window = info.sliding_window
        if window is None:
            return source
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        for item in source.iterdir():
            if item.name != "config.json":
                (staged / item.name).symlink_to(item.resolve())
        config = dict(info.raw, layer_types=["sliding_attention"] * info.num_layers)
        (staged / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return staged

    def builder_command(self, source: Path, out: Path, recipe: Recipe, target: Target,
                        cache_dir: Path, info: ModelInfo | None = None) -> list[str]:
        quant = recipe.quantization
        extra = self.extra_options(recipe, target, info)
        # the builder's own command line, with its weights mapped and quantized one MatMul at
        # a time (onnx_stream.py): the same model, in a fraction of the memory
        cmd = [sys.executable, "-m", STREAMED_BUILDER, "-i", str(source), "-o", str(out),
               "-p", BUILDER_PRECISION[quant.precision],
               "-e", PROVIDERS[target.execution_provider], "-c", str(cache_dir)]
        if extra:
            cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra.items())]
        return cmd

    def convert(self, source: Path, out: Path, recipe: Recipe, target: Target,
                log: Callable[[str], None]) -> None:
        cache_dir = out.parent / f"{out.name}.hf-cache"
        info = read_model_info(source)
        staged = self._staged_source(source, info, out.parent / f"{out.name}.source")
        cmd = self.builder_command(staged, out, recipe, target, cache_dir, info)
        try:
            run_tool(cmd, log, "the ONNX Runtime GenAI builder", out / "genai_config.json")
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)
            if staged != source:
                shutil.rmtree(staged, ignore_errors=True)
        write_all_logits_graph(out)
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

    def describe(self, recipe: Recipe, target: Target, info: ModelInfo | None = None) -> str:
        extra = self.extra_options(recipe, target, info)
        tuned = [f"{k}={extra[k]}" for k in ("accuracy_level", "prune_lm_head",
                                              "windowed_kv_cache") if k in extra]
        if info and info.sliding_window:
            tuned.append(f"layer_types: sliding_attention (window {info.sliding_window})")
        return describe_quantization(recipe, target) + (f", {', '.join(tuned)}" if tuned else "")

    def runtime_options(self, target: Target, recipe: Recipe) -> dict:
        return provider_runtime_options(target)

    def host_notes(self, cpu: dict) -> list[str]:
        return [f"CPU execution provider kernels for {cpu['class']}"]

    def toolchain(self) -> dict[str, str]:
        # the CUDA builds (-cuda, -gpu) install the same modules under other names
        return versions("onnxruntime-genai", "onnxruntime-genai-cuda", "onnxruntime",
                        "onnxruntime-gpu", "onnx", "onnx-ir", "onnxscript", "transformers", "torch")


BACKEND = OnnxBackend()
