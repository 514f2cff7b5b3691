"""Runtime module: MLX through mlx-lm (its load / generate_step / samplers).

Copied into bundles beside core.py; imports only mlx, mlx_lm (which brings its HF tokenizer)
and numpy. On Apple silicon it runs on Metal; on Linux `mlx[cpu]` runs the same code on the CPU
(a correctness path, far slower than Metal).
Options: compute_dtype = auto | float16 | bfloat16 | float32. MLX picks its device itself; on
Metal `auto` computes in the model's dtype. On the CPU backend `auto` computes in float32: the
weights keep their exact values (4/8-bit codes; float16 scales widen exactly to float32), only
activations are wider. MLX's CPU kernels have no fast half-precision path (its float16 quantized
matmul is tens of times slower than float32, see bench/runtime.py); the report names the dtype
executed, and compute_dtype=float16 measures the half-precision rounding on a CPU at that cost.

mlx-lm 0.31.3 computes three Phi-3-family traits differently from the model as trained (and as
transformers, the reference, computes it); measured on fp32 tiny fixtures, KLD up to 0.5. The
runner corrects them when it loads a model, with mlx-lm's own building blocks:
  sliding window    phi3.py / phimoe.py build their mask without `window_size`: attention sees
                    the whole context (create_attention_mask has the parameter; it is passed)
  LongRoPE          SuScaledRoPE always rotates with the long factors; the short factors (and
                    short mscale) apply while the sequence is within the original length
  PhiMoE routing    top-2 softmax over the router logits instead of PhiMoE's sparsemixer
With the corrections the same fixtures match transformers to KLD <= 2e-8. `mlx_lm generate
--model DIR` on the bundle's model directory runs without them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence


def _optimised_cpu_blas() -> str | None:
    """On Linux, an OpenBLAS made global before MLX loads: `mlx[cpu]` wheels link netlib's
    reference BLAS, and every float matmul (the lm_head above all) runs through its cblas_sgemm,
    tens of times slower than an optimised one. The dynamic linker resolves libmlx's cblas_*
    symbols in the global scope first, so the library loaded here answers them. None: MLX keeps
    the BLAS it ships with (macOS: Accelerate)."""
    if not sys.platform.startswith("linux") or "mlx.core" in sys.modules:  # too late then
        return None
    name = ctypes.util.find_library("openblas")
    if not name:
        return None
    try:
        ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    return name


CPU_BLAS = _optimised_cpu_blas()  # before the import below: only then does it take effect

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm import load  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models import base as mlx_base  # noqa: E402
from mlx_lm.models import phi3 as mlx_phi3  # noqa: E402
from mlx_lm.models import phimoe as mlx_phimoe  # noqa: E402
from mlx_lm.models.rope_utils import SuScaledRoPE  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

from .core import (DEFAULT_CONTEXT, check_constraint, check_length, generation_eos,  # noqa: E402
                   stop_ids)
from .guidance import MECHANISM, mask_for  # noqa: E402


def _use_window(window: int | None) -> None:
    """The mask function phi3 / phimoe call, with this model's window (None: plain causal).
    Module-level, so it is set again before every forward of this session."""
    mask = (functools.partial(mlx_base.create_attention_mask, window_size=window) if window
            else mlx_base.create_attention_mask)
    mlx_phi3.create_attention_mask = mlx_phimoe.create_attention_mask = mask


def _su_rope_init(self, dims, base=10000.0, max_position_embeddings=131072,
                  original_max_position_embeddings=4096, short_factor=1.0, long_factor=1.0,
                  short_mscale=None, long_mscale=None):
    _SU_INIT(self, dims, base, max_position_embeddings, original_max_position_embeddings,
             short_factor, long_factor, short_mscale, long_mscale)
    freqs = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    factor = max_position_embeddings / original_max_position_embeddings
    derived = 1.0 if factor <= 1.0 else math.sqrt(
        1 + math.log(factor) / math.log(original_max_position_embeddings))
    self._phikit_short = (mx.array(short_factor, dtype=mx.float32) * freqs,
                          short_mscale or derived)
    self._phikit_long = (self._freqs, self._scale)


def _su_rope_call(self, x, offset=0):
    """Short factors while the running length (cached + new tokens) is within the original
    length, as transformers' dynamic LongRoPE update decides (max position id + 1)."""
    short = int(offset) + x.shape[-2] <= self.original_max_position_embeddings
    self._freqs, self._scale = self._phikit_short if short else self._phikit_long
    return _SU_CALL(self, x, offset)


def _sparsemixer_top2(scores: mx.array, jitter_eps: float) -> tuple[mx.array, mx.array]:
    """PhiMoE's sparsemixer at inference (top-2): each expert's weight is a softmax over the
    logits within `2 * jitter_eps` (relative) of that expert's logit, the first expert masked
    out for the second pick. Returns (weights [.., 2], indices [.., 2])."""
    neg_inf = mx.array(-mx.inf, dtype=scores.dtype)
    weights, indices, masked_scores = [], [], scores
    for _ in range(2):
        top = mx.max(masked_scores, axis=-1, keepdims=True)
        index = mx.argmax(masked_scores, axis=-1, keepdims=True)
        factor = mx.maximum(mx.abs(scores), top)
        within = mx.where((top - scores) / factor > 2 * jitter_eps, neg_inf, masked_scores)
        weights.append(mx.take_along_axis(mx.softmax(within, axis=-1, precise=True), index, -1))
        indices.append(index)
        masked_scores = mx.where(mx.arange(scores.shape[-1]) == index, neg_inf, masked_scores)
    return mx.concatenate(weights, axis=-1), mx.concatenate(indices, axis=-1)


def _phimoe_block_call(self, x: mx.array) -> mx.array:
    weights, indices = _sparsemixer_top2(self.gate(x).astype(mx.float32),
                                         getattr(self, "phikit_jitter_eps", 0.01))
    y = self.switch_mlp(x, mx.stop_gradient(indices))
    return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)


_SU_INIT, _SU_CALL = SuScaledRoPE.__init__, SuScaledRoPE.__call__
if not hasattr(SuScaledRoPE, "_phikit_corrected"):  # once per process
    SuScaledRoPE.__init__, SuScaledRoPE.__call__ = _su_rope_init, _su_rope_call
    SuScaledRoPE._phikit_corrected = True
    mlx_phimoe.PhiMoESparseMoeBlock.__call__ = _phimoe_block_call

REQUIRED = ("config.json", "tokenizer.json", "tokenizer_config.json")
COMPUTE_DTYPES = ("float16", "bfloat16", "float32")


def _floating_dtype(model) -> str:
    """The dtype most of the model's floating parameters are stored in."""
    from mlx.utils import tree_flatten

    sizes: dict[str, int] = {}
    for _, value in tree_flatten(model.parameters()):
        if mx.issubdtype(value.dtype, mx.floating):
            name = str(value.dtype).rsplit(".", 1)[-1]
            sizes[name] = sizes.get(name, 0) + value.size
    return max(sizes, key=sizes.get) if sizes else "float32"


def _compute_dtype(option: Any, stored: str) -> str:
    value = str(option).lower()
    if value == "auto":
        return "float32" if "cpu" in str(mx.default_device()).lower() else stored
    if value not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype: {option!r} is not auto or one of "
                         f"{', '.join(COMPUTE_DTYPES)}")
    return value


class MlxSession:
    def __init__(self, model_dir: Path, options: dict[str, Any]):
        missing = [f for f in REQUIRED if not (model_dir / f).is_file()]
        if missing or not list(model_dir.glob("*.safetensors")):
            raise ValueError(f"{model_dir}: not an mlx-lm model directory (missing "
                             f"{', '.join(missing) or '*.safetensors'})")
        self.model, self.tokenizer = load(str(model_dir))
        config = json.loads((model_dir / "config.json").read_text())
        self.stored_dtype = _floating_dtype(self.model)
        self.compute_dtype = _compute_dtype(options.get("compute_dtype", "auto"),
                                            self.stored_dtype)
        if self.compute_dtype != self.stored_dtype:
            self.model.set_dtype(getattr(mx, self.compute_dtype))
        window = config.get("sliding_window")
        self.window = int(window) if window and window < config.get(
            "max_position_embeddings", 1 << 62) else None
        for layer in getattr(self.model, "layers", None) or self.model.model.layers:
            moe = getattr(layer, "block_sparse_moe", None)
            if moe is not None:
                moe.phikit_jitter_eps = float(config.get("router_jitter_noise", 0.01))
        self.eos_token_ids = (generation_eos(model_dir, config.get("eos_token_id"))
                              or tuple(sorted(self.tokenizer.eos_token_ids)))
        self.context_length = int(config.get("max_position_embeddings", DEFAULT_CONTEXT))
        self.quantization = config.get("quantization")
        # mlx-lm has logits processors but no grammar engine: llguidance's mask through one
        self.guidance = mask_for(model_dir, self.eos_token_ids, int(config["vocab_size"]))
        self.constrains = MECHANISM if self.guidance else None

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(t) for t in ids])

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)

    def logits(self, ids: Sequence[int], start: int = 0) -> np.ndarray:
        check_length(len(ids), self.context_length)
        _use_window(self.window)
        out = self.model(mx.array([list(ids)]))[0, start:].astype(mx.float32)
        return np.array(out)

    def generate(self, ids: Sequence[int], sampling) -> Iterator[int]:
        check_length(len(ids) + 1, self.context_length)
        check_constraint(self, sampling)
        processors = None
        if sampling.constraint is not None:
            state, calls = self.guidance.start(sampling.constraint), [0]

            def constrain(tokens: mx.array, logits: mx.array) -> mx.array:
                # mlx-lm passes what went through this step's calls (the prefill's last prompt
                # token on, not the whole prompt): call k ends with the k tokens generated
                k, calls[0] = calls[0], calls[0] + 1
                allowed = state.allowed(tokens.tolist()[len(tokens) - k:] if k else [])
                n = logits.shape[-1]
                keep = np.zeros(n, dtype=bool)
                keep[:min(n, allowed.shape[0])] = allowed[:n]
                return mx.where(mx.array(keep), logits, -math.inf)

            processors = [constrain]
        if sampling.seed is not None:
            mx.random.seed(int(sampling.seed))
        sampler = make_sampler(temp=sampling.temperature, top_p=sampling.top_p,
                               top_k=sampling.top_k or 0)
        stop = stop_ids(self, sampling)
        max_new = max(1, min(sampling.max_new_tokens, self.context_length - len(ids)))
        _use_window(self.window)
        for token, _ in generate_step(mx.array(list(ids)), self.model, max_tokens=max_new,
                                      sampler=sampler, logits_processors=processors):
            token = int(token)
            if token in stop:
                return
            yield token

    def info(self) -> dict[str, Any]:
        device = str(mx.default_device())
        cpu = "cpu" in device.lower()
        notes = ["measured with MLX's CPU backend; the Metal path is not exercised here"] \
            if cpu else []
        if self.compute_dtype != self.stored_dtype:
            notes.append(f"computed in {self.compute_dtype} (the model stores "
                         f"{self.stored_dtype}; on Metal it computes in {self.stored_dtype}): "
                         "MLX's CPU backend has no fast half-precision kernels; "
                         f"--option compute_dtype={self.stored_dtype} measures that rounding")
        if self.window or any(isinstance(m, SuScaledRoPE) for _, m in self.model.named_modules()):
            notes.append("phikit's runner corrects mlx-lm's sliding window / LongRoPE short "
                         "factors / PhiMoE routing (toolkit/runner/mlx_rt.py)")
        blas = {"cpu_blas": CPU_BLAS or "the BLAS MLX ships with"} if cpu else {}
        return {"runtime": "mlx-lm", "version": mx.__version__, "device": device, **blas,
                "quantization": self.quantization, "context_length": self.context_length,
                "executed_precision": {"activations": self.compute_dtype,
                                       "stored": self.stored_dtype},
                "notes": notes}


def open_session(model_dir: Path, options: dict[str, Any]) -> MlxSession:
    return MlxSession(model_dir, options)
