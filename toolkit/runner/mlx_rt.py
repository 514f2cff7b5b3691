"""Runtime module: MLX through mlx-lm (its load / generate_step / samplers).

Copied into bundles beside core.py; imports only mlx, mlx_lm (which brings its HF tokenizer)
and numpy. On Apple silicon it runs on Metal; on Linux `mlx[cpu]` runs the same code on the CPU
(a correctness path: about 200x slower than Metal).
Options: seed handling only; MLX picks its device itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from .core import check_length, generation_eos

REQUIRED = ("config.json", "tokenizer.json", "tokenizer_config.json")


class MlxSession:
    def __init__(self, model_dir: Path, options: dict[str, Any]):
        missing = [f for f in REQUIRED if not (model_dir / f).is_file()]
        if missing or not list(model_dir.glob("*.safetensors")):
            raise ValueError(f"{model_dir}: not an mlx-lm model directory (missing "
                             f"{', '.join(missing) or '*.safetensors'})")
        self.model, self.tokenizer = load(str(model_dir))
        config = json.loads((model_dir / "config.json").read_text())
        self.eos_token_ids = (generation_eos(model_dir, config.get("eos_token_id"))
                              or tuple(sorted(self.tokenizer.eos_token_ids)))
        self.context_length = int(config.get("max_position_embeddings", 4096))
        self.quantization = config.get("quantization")

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(t) for t in ids])

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        check_length(len(ids), self.context_length)
        out = self.model(mx.array([list(ids)]))[0].astype(mx.float32)
        return np.array(out)

    def generate(self, ids: Sequence[int], sampling) -> Iterator[int]:
        check_length(len(ids) + 1, self.context_length)
        if sampling.seed is not None:
            mx.random.seed(int(sampling.seed))
        sampler = make_sampler(temp=sampling.temperature, top_p=sampling.top_p,
                               top_k=sampling.top_k or 0)
        stop = set(self.eos_token_ids) | set(sampling.stop_token_ids)
        max_new = max(1, min(sampling.max_new_tokens, self.context_length - len(ids)))
        for token, _ in generate_step(mx.array(list(ids)), self.model, max_tokens=max_new,
                                      sampler=sampler):
            token = int(token)
            if token in stop:
                return
            yield token

    def info(self) -> dict[str, Any]:
        device = str(mx.default_device())
        notes = ["measured with MLX's CPU backend; the Metal path is not exercised here"] \
            if "cpu" in device.lower() else []
        return {"runtime": "mlx-lm", "version": mx.__version__, "device": device,
                "quantization": self.quantization, "context_length": self.context_length,
                "notes": notes}


def open_session(model_dir: Path, options: dict[str, Any]) -> MlxSession:
    return MlxSession(model_dir, options)
