"""The reference: transformers in fp32 on CPU, run once per (checkpoint, eval set, settings).

What is kept per teacher-forced text: the token ids, the reference's top-K log-probs at every
position (float32) and the log-prob of the actual next token (perplexity). Per prompt: the prompt
ids and the greedy continuation (EOS stripped, and whether it stopped). It ships in every bundle
(eval/reference.npz), so its size counts: K=256 costs 8 bytes x 256 per position before
compression (the Phi-3-mini recipes' 16k positions: 32 MB, about 1% of an int4 bundle).

KL over the top-K tokens plus one tail bucket is a lower bound of the full KL (merging tokens
never raises it). How far below depends on the tail mass: on tiny-phi3 (a flat distribution,
perplexity ~150) its int4 ONNX bundle measures 0.00642 at K=256 against a full-vocabulary
0.00745 (-14%; K=64: -21%); a peaked model (perplexity 5-10) leaves far less in the tail. The
bounds are set on the same measure, so they compare like with like.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .checkpoint import cache_lock, cache_root, checkpoint_digest
from .evalset import EvalRow, EvalSet
from .runner.reference_data import (PromptRef, Reference, TextRef,  # noqa: F401
                                    load_reference, save_reference)

TOP_K = 256
SETTINGS_VERSION = 3  # bump when what is stored changes (2: landmarks, 3: decoded texts)


def reference_key(digest: str, evalset: EvalSet, max_tokens: int, max_new_tokens: int,
                  dtype: str = "float32", context_tokens: int | None = None) -> str:
    # the installed version, read without importing transformers (seconds, on every cache hit)
    from importlib.metadata import version

    settings = {"checkpoint": digest, "evalset": evalset.sha256, "rows": [r.id for r in evalset.rows],
                "max_tokens": max_tokens, "max_new_tokens": max_new_tokens, "dtype": dtype,
                "top_k": TOP_K, "transformers": version("transformers"),
                "version": SETTINGS_VERSION}
    if any(r.reach_context for r in evalset.rows):  # other sets keep their cached references
        settings["context_tokens"] = context_tokens
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def prompt_ids(tokenizer, row: EvalRow) -> list[int]:
    """Reference tokenization, as a transformers user gets it."""
    if row.kind == "messages":
        out = tokenizer.apply_chat_template(row.messages, add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        return list(out["input_ids"] if isinstance(out, dict) else out)
    return tokenizer(row.value)["input_ids"]


def position_landmarks(config) -> dict[str, int]:
    """Positions where a converter's long-context handling starts to matter: the sliding window
    (attention stops seeing the oldest tokens) and, with LongRoPE, the original length (past it
    the long factors apply). Those past max_position_embeddings cannot be reached."""
    limit = getattr(config, "max_position_embeddings", None) or 1 << 62
    marks = {}
    window = getattr(config, "sliding_window", None)
    if window and window < limit:
        marks["sliding_window"] = int(window)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    original = (getattr(config, "original_max_position_embeddings", None)
                or rope.get("original_max_position_embeddings"))
    if rope.get("rope_type", rope.get("type")) == "longrope" and original and original < limit:
        marks["original_length"] = int(original)
    return marks





def compute_reference(checkpoint: Path, evalset: EvalSet, max_tokens: int, max_new_tokens: int,
                      progress=None, dtype: str = "float32",
                      trust_remote_code: bool = False, map_weights: bool = True,
                      context_tokens: int | None = None) -> Reference:
    """The reference's figures. In the checkpoint's own dtype (e.g. `eval.reference_dtype:
    bfloat16` for a bf16 checkpoint) the weights are memory-mapped, not loaded
    (mapped_weights.py): process memory holds activations only and a checkpoint larger than the
    machine's memory runs, the kernel paging its weights in and out. The figures are the same
    either way (tests/test_mapped_weights.py)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), trust_remote_code=trust_remote_code)
    model, weights = None, "loaded"
    if map_weights and not trust_remote_code:
        from .mapped_weights import mapped_model

        try:  # in the checkpoint's own dtype the weights need no copy: the file's pages serve
            model = mapped_model(Path(checkpoint), buffers="cpu", dtype=getattr(torch, dtype))
            weights = "memory-mapped"
        except (ValueError, OSError):
            pass  # another dtype, or not safetensors: loaded as transformers loads it
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=getattr(torch, dtype),
                                                     trust_remote_code=trust_remote_code)
    model.eval()
    try:
        gen_cfg = GenerationConfig.from_pretrained(str(checkpoint))
        eos = gen_cfg.eos_token_id
    except OSError:
        eos = model.config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    texts, prompts, decoded = [], [], []
    with torch.inference_mode():
        for row in evalset.texts:
            cut = context_tokens if row.reach_context and context_tokens else max_tokens
            ids = tokenizer(row.value)["input_ids"][:cut]
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            top = torch.topk(logp, TOP_K, dim=-1)
            nxt = logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
            decoded.append(tokenizer.decode(ids, skip_special_tokens=True))
            texts.append(TextRef(row.id, np.asarray(ids, np.int32), top.indices.numpy().astype(
                np.int32), top.values.numpy().astype(np.float32), nxt.numpy().astype(np.float32)))
            if progress:
                progress()
        for row in evalset.prompts:
            ids = prompt_ids(tokenizer, row)
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                 dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos_ids or None,
                                 pad_token_id=tokenizer.pad_token_id or 0)
            new = out[0, len(ids):].tolist()
            stopped = bool(new) and new[-1] in eos_ids
            prompts.append(PromptRef(row.id, np.asarray(ids, np.int32),
                                     np.asarray(new[:-1] if stopped else new, np.int32), stopped))
            if progress:
                progress()
    meta = {"engine": "transformers", "dtype": dtype, "device": "cpu", "weights": weights,
            "eos_token_ids": eos_ids, "landmarks": position_landmarks(model.config),
            "bos_token_id": tokenizer.bos_token_id, "decoded": decoded,
            "seconds": round(time.perf_counter() - start, 2)}
    return Reference(texts, prompts, meta)


def load_or_compute(checkpoint: Path, evalset: EvalSet, max_tokens: int, max_new_tokens: int,
                    progress_factory=None, dtype: str = "float32",
                    trust_remote_code: bool = False,
                    before_compute: Callable[[], None] | None = None,
                    context_tokens: int | None = None) -> tuple[Reference, bool]:
    """(reference, was_cached). `progress_factory()` makes a per-row callback and
    `before_compute()` may refuse (raise), both only when the reference has to be computed."""
    digest = checkpoint_digest(checkpoint)
    key = reference_key(digest, evalset, max_tokens, max_new_tokens, dtype, context_tokens)
    path = cache_root() / "reference" / f"{key}.npz"
    with cache_lock(f"reference-{key[:32]}"):
        if path.is_file():
            try:
                return load_reference(path), True
            except (OSError, ValueError, KeyError):
                path.unlink(missing_ok=True)  # corrupt entry: recompute
        if before_compute is not None:
            before_compute()
        ref = compute_reference(checkpoint, evalset, max_tokens, max_new_tokens,
                                progress_factory() if progress_factory else None, dtype,
                                trust_remote_code, context_tokens=context_tokens)
        gc.collect()  # the transformers model is garbage now; free it before the candidate loads
        ref.meta.update({"checkpoint_sha256": digest, "key": key})
        save_reference(path, ref)
    return ref, False
