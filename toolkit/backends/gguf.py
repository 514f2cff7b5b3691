"""GGUF (llama.cpp): convert with llama.cpp's own `convert_hf_to_gguf.py`, quantize with its own
quantizer (`llama_model_quantize`), both from the pinned llama-cpp-python source package: the
`gguf` extra compiles its bindings, and llama_cpp_source.py finds (or fetches) its converter.

Types. The recipe's precision/block/symmetry map onto llama.cpp's fixed-block types when they
mean the same thing (int4 block 32 symmetric = Q4_0, asymmetric = Q4_1; int8 block 32 = Q8_0);
any other type is named explicitly (`quantization.options.gguf.type: Q4_K_M`). llama.cpp decides
per tensor (K-quants keep some tensors at higher precision; rows not divisible by 256 fall back
to a 32-block type) and says so in its own log.

Calibration. With `quantization.calibration`, an importance matrix is computed from that local
text (gguf_quantize.py says how) and guides every type; IQ1/IQ2/IQ3_XXS types require one.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Callable, ClassVar

from pydantic import Field

from ..checkpoint import ModelInfo
from ..errors import PhikitError
from ..schema import BackendOptions, Recipe, Target
from . import llama_cpp_source
from .common import BackendDefaults, Honest, first_import_error, run_tool, versions

# Architectures whose published config the pinned converter maps (class name -> gguf-py arch).
ARCHITECTURES = {"Phi3ForCausalLM": "PHI3", "PhiMoEForCausalLM": "PHIMOE"}
# llama.cpp file types phikit offers (llama_ftype names without the LLAMA_FTYPE_MOSTLY_ prefix).
TYPES = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S",
         "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS",
         "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS", "IQ1_S", "IQ1_M"}
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"}
# Unquantized precisions: written by the converter directly.
OUTTYPES = {"fp16": "f16", "fp32": "f32"}
# The converter's intermediate file keeps the checkpoint's own float type (no rounding twice).
INTERMEDIATE = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
MODEL_FILE = "model.gguf"
# Files copied beside the GGUF: the runner reads the special tokens' strip flags and the EOS set
# from them (see runner/llamacpp_rt.py); they also document the source tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


class GgufOptions(BackendOptions):
    label: ClassVar[str] = "GGUF"
    type: str | None = None  # a llama.cpp file type (Q4_K_M, IQ2_XS, ...): checked by support()
    imatrix_chunk_tokens: int = Field(512, gt=0)  # importance matrix: tokens per chunk
    imatrix_max_chunks: int = Field(64, gt=0)


class GgufBackend(BackendDefaults):
    name = "gguf"
    home_target = "ollama"
    runtime_module = "llamacpp_rt"
    tool = "llama.cpp convert_hf_to_gguf.py + llama_model_quantize"
    float_intermediate = True  # the converter's float GGUF, which the quantizer reads
    # phikit writes the tokenizer into the GGUF (and a tokenizer.model when the checkpoint has
    # none), so any tokenization difference is a conversion defect: validation requires all rows.
    exact_tokenizer = True
    # tiny-phi3's recipes on its eval set (bench/honest_bounds.py): the default bounds' base
    honest = {
        "int4": Honest(kld_mean=0.00322, kld_p99=0.0147, top1=0.9431, ppl_ratio=0.9952,
                       greedy_match_mean=14.2, kld_p999=0.0294),
        "int8": Honest(kld_mean=5.77e-05, kld_p99=0.000282, top1=0.9916, ppl_ratio=1.0007,
                       greedy_match_mean=21.9, kld_p999=0.000566),
        "fp32": Honest(kld_mean=2.09e-08, kld_p99=2.39e-07, top1=1, ppl_ratio=1,
                       greedy_match_mean=27.6, kld_p999=5.32e-07),
    }

    @property
    def install(self) -> str:
        from ..installing import pip_install_hint

        return (pip_install_hint("phikit[gguf]") + " (compiles llama.cpp: minutes); the "
                "converter is fetched on the first build, or PHIKIT_LLAMA_CPP=<llama.cpp tree>")

    def unavailable(self) -> str | None:
        # no converter yet is fine: convert() fetches the pinned one (llama_cpp_source.ensure)
        # google.protobuf: sentencepiece's model proto, which spm.py writes tokenizer.model with
        return (first_import_error("llama_cpp", "sentencepiece", "google.protobuf", "jinja2")
                or llama_cpp_source.installed_version_note())

    options_model = GgufOptions

    def file_type(self, recipe: Recipe) -> str | None:
        """The llama.cpp type name (None for fp16/fp32, which the converter writes itself)."""
        quant = recipe.quantization
        explicit = self.options(recipe).type
        if explicit is not None:
            return str(explicit).upper()
        if quant.precision in OUTTYPES:
            return None
        if quant.block_size != 32:
            raise _NoType(f"llama.cpp's {quant.precision} types use blocks of 32 (K-quants: 256 "
                          f"in 8 sub-blocks of 32); the recipe asks for {quant.block_size}. Set "
                          "block_size 32 or name a type in quantization.options.gguf.type "
                          "(e.g. Q4_K_M)")
        if quant.precision == "int4":
            return "Q4_0" if quant.symmetric else "Q4_1"
        if not quant.symmetric:
            raise _NoType("llama.cpp has no asymmetric 8-bit weight type (Q8_0 is symmetric)")
        return "Q8_0"

    def support(self, info: ModelInfo | None, target: Target, recipe: Recipe) -> str | None:
        quant = recipe.quantization
        try:
            ftype = self.file_type(recipe)
        except _NoType as e:
            return str(e)
        if ftype is not None and ftype not in TYPES:
            return f"unknown llama.cpp type {ftype!r} (known: {', '.join(sorted(TYPES))})"
        if ftype is not None and quant.precision in OUTTYPES:
            return f"type {ftype} is a quantized type; the recipe's precision is {quant.precision}"
        if ftype in NEEDS_IMATRIX and quant.calibration is None:
            return (f"{ftype} needs an importance matrix: give quantization.calibration "
                    "(a local text file)")
        if quant.calibration is not None and ftype is None:
            return "calibration applies to quantized types only"
        if target.device != "cpu":
            return f"phikit builds llama.cpp bundles for CPU targets only (target device {target.device!r})"
        if info is not None:
            if info.architecture not in ARCHITECTURES:
                return f"the pinned llama.cpp converter does not map {info.architecture}"
            return self.model_support(info, recipe)
        return None

    @staticmethod
    def model_support(info: ModelInfo, recipe: Recipe) -> str | None:
        """What llama.cpp computes differently from the model as trained (measured on fp32
        tiny fixtures against transformers; llama.cpp sources named as pinned)."""
        if info.architecture == "PhiMoEForCausalLM":
            return ("llama.cpp runs PhiMoE through its Phi-3 graph: RMSNorm where PhiMoE has "
                    "LayerNorm, renormalized top-2 softmax routing instead of sparsemixer, and "
                    "the derived attention factor instead of the published mscale "
                    "(src/models/phi3.cpp): KLD 0.12-0.86 on an fp32 tiny PhiMoE")
        if recipe.quantization.calibration is not None and info.architecture != "Phi3ForCausalLM":
            return ("phikit's importance matrix maps dense Phi-3 layers only "
                    f"({info.architecture} has expert tensors)")
        if info.longrope:
            return ("llama.cpp picks LongRoPE's long or short factors by context size (n_ctx > "
                    f"{info.original_max_positions} -> long factors for every position, even "
                    "of short prompts; src/llama-model.cpp), not by sequence length as the "
                    "model was trained: KLD 0.075 on short texts of an fp32 tiny LongRoPE Phi-3")
        cap = GgufBackend.max_context(info)
        if cap is not None:
            need = max(recipe.context_length or info.max_positions, recipe.eval.max_tokens)
            if need > cap:
                return (f"llama.cpp disables Phi-3's sliding window (src/models/phi3.cpp), so "
                        f"past {info.sliding_window} tokens attention would see the whole "
                        f"context: a GGUF bundle serves at most {cap} tokens; set "
                        f"context_length (and eval.max_tokens) <= {cap} (this recipe needs "
                        f"{need})")
        return None

    def artifact_facts(self, model_dir: Path):
        """The GGUF's metadata and the Modelfile Ollama serves it with (gguf_facts.py)."""
        from .gguf_facts import gguf_facts  # noqa: PLC0415

        return gguf_facts(model_dir, llama_cpp_source.ensure() / "gguf-py")  # fetched if absent

    @staticmethod
    def max_context(info: ModelInfo) -> int | None:
        # llama.cpp's Phi-3 graph has no sliding window: only the window's own span is as trained
        return info.sliding_window + 1 if info.sliding_window else None

    def recognizes(self, path: Path) -> bool:
        return len(list(path.glob("*.gguf"))) == 1

    def convert(self, source: Path, out: Path, recipe: Recipe, target: Target,
                log: Callable[[str], None]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        work = out.parent / f"{out.name}.gguf-work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            checkpoint = self._with_tokenizer_model(source, work / "checkpoint", log)
            ftype = self.file_type(recipe)
            config = json.loads((source / "config.json").read_text())
            if ftype is None:
                outtype = OUTTYPES[recipe.quantization.precision]
            else:
                outtype = INTERMEDIATE.get(str(config.get("torch_dtype") or config.get("dtype")),
                                           "f16")
            float_file = (out / MODEL_FILE) if ftype is None else (work / f"model-{outtype}.gguf")
            tree = llama_cpp_source.ensure(log)
            run_tool([sys.executable, str(tree / llama_cpp_source.CONVERTER),
                      str(checkpoint), "--outfile", str(float_file), "--outtype", outtype],
                     log, "llama.cpp's convert_hf_to_gguf.py", float_file)
            if ftype is not None:
                self._quantize(float_file, out / MODEL_FILE, ftype, source, recipe, target,
                               config, tree, log)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, out / name)
        write_modelfile(out, recipe, source)

    def _with_tokenizer_model(self, source: Path, staged: Path, log) -> Path:
        """The checkpoint as the converter needs it: with a SentencePiece tokenizer.model. If the
        checkpoint has none, a view of it (symlinks) gets one made from tokenizer.json."""
        if (source / "tokenizer.model").is_file():
            return source
        from ..spm import UnsupportedTokenizer, write_tokenizer_model

        staged.mkdir()
        for item in source.iterdir():
            (staged / item.name).symlink_to(item.resolve())
        try:
            write_tokenizer_model(source, staged / "tokenizer.model")
        except (UnsupportedTokenizer, OSError, KeyError) as e:
            raise PhikitError(f"the checkpoint has no tokenizer.model and phikit cannot make one "
                              f"from tokenizer.json: {e}", file=source) from None
        log("tokenizer.model written from tokenizer.json (BPE merge ranks as scores)")
        return staged

    def _quantize(self, float_file: Path, out_file: Path, ftype: str, source: Path,
                  recipe: Recipe, target: Target, config: dict, tree: Path, log) -> None:
        opts = self.options(recipe)
        spec: dict = {"input": str(float_file), "output": str(out_file),
                      "ftype": f"LLAMA_FTYPE_MOSTLY_{ftype}",
                      "threads": 0 if target.runtime.threads == "auto" else target.runtime.threads}
        if recipe.quantization.calibration is not None:
            spec["imatrix"] = {"source": str(source),
                               "calibration": str(recipe.quantization.calibration),
                               "gguf_py": str(tree / "gguf-py"),
                               "gguf_arch": ARCHITECTURES[config["architectures"][0]],
                               "chunk_tokens": opts.imatrix_chunk_tokens,
                               "max_chunks": opts.imatrix_max_chunks}
        run_tool([sys.executable, "-m", "toolkit.backends.gguf_quantize", json.dumps(spec)], log,
                 f"llama.cpp's quantizer ({ftype})", out_file,
                 cwd=Path(__file__).resolve().parents[2])

    def describe(self, recipe: Recipe, target: Target, info: ModelInfo | None = None) -> str:
        ftype = self.file_type(recipe)
        how = (f"{ftype} (llama.cpp type; from {recipe.quantization.precision}, block "
               f"{recipe.quantization.block_size})" if ftype else
               f"{OUTTYPES[recipe.quantization.precision]} (unquantized)")
        if recipe.quantization.calibration is not None:
            how += f", importance matrix from {recipe.quantization.calibration.name}"
        return how + ", Modelfile for Ollama"

    def runtime_options(self, target: Target, recipe: Recipe) -> dict:
        return {"threads": target.runtime.threads, "context_length": recipe.context_length,
                **target.runtime.options}

    def toolchain(self) -> dict[str, str]:
        source = llama_cpp_source.source_line()
        out = versions("llama-cpp-python", "sentencepiece", "transformers", "torch")
        if source:
            out["llama.cpp converter"] = source
        return out


class _NoType(ValueError):
    pass


# Phi-3's chat format, rendered without the whitespace transformers strips after its special
# tokens (rstrip: true), so Ollama's llama.cpp tokenizes exactly the ids the model was trained on.
# BOS is not in the template: Ollama adds it (the GGUF says add_bos_token).
PHI3_TEMPLATE = ('{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>{{ end -}}'
                 '<|assistant|>')
STOPS = ("<|end|>", "<|endoftext|>")


def write_modelfile(out: Path, recipe: Recipe, source: Path) -> Path:
    """An Ollama Modelfile beside the GGUF: `ollama create NAME -f Modelfile` in that folder.
    Sampling defaults come from the checkpoint's generation_config.json when it samples, else
    greedy (what validation measured)."""
    gen = {}
    if (source / "generation_config.json").is_file():
        gen = json.loads((source / "generation_config.json").read_text())
    params = {"temperature": gen.get("temperature", 0.0) if gen.get("do_sample") else 0.0}
    if gen.get("do_sample"):
        params.update({k: gen[k] for k in ("top_p", "top_k") if k in gen})
    if recipe.context_length:
        params["num_ctx"] = recipe.context_length
    origin = Path(recipe.source).name if Path(recipe.source).is_dir() else recipe.source
    lines = [f"# {recipe.name}: made by phikit from {origin}",
             f"FROM ./{MODEL_FILE}",
             f'TEMPLATE """{PHI3_TEMPLATE}"""']
    lines += [f'PARAMETER stop "{s}"' for s in STOPS]
    lines += [f"PARAMETER {k} {v}" for k, v in params.items()]
    path = out / "Modelfile"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


BACKEND = GgufBackend()
