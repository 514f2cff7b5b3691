"""What a bundle carries to re-measure parity without the checkpoint: the reference (transformers'
top-K log-probs per position, next-token log-probs, greedy continuations, metadata) and the
eval rows. Standard library + numpy; shipped in every bundle beside parity_core.py."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REFERENCE_FILE = "eval/reference.npz"  # in a bundle, beside its eval set; hashed in the manifest

@dataclass
class TextRef:
    id: str
    ids: np.ndarray  # [T] int32
    topk_ids: np.ndarray  # [T, K] int32
    topk_logp: np.ndarray  # [T, K] float32
    next_logp: np.ndarray  # [T-1] float32


@dataclass
class PromptRef:
    id: str
    prompt_ids: np.ndarray  # [P] int32
    greedy_ids: np.ndarray  # [G] int32, EOS excluded
    stopped: bool  # ended on an EOS token rather than max_new_tokens


@dataclass
class Reference:
    texts: list[TextRef]
    prompts: list[PromptRef]
    meta: dict


def save_reference(path: Path, ref: Reference) -> None:
    """One .npz: per text its ids, top-K ids and log-probs and next-token log-probs, per prompt
    its ids and greedy continuation, and the metadata as JSON. Written beside, then renamed: a
    killed run never leaves half a file under the final name."""
    arrays = {}
    for i, t in enumerate(ref.texts):
        arrays.update({f"t{i}_ids": t.ids, f"t{i}_topk_ids": t.topk_ids,
                       f"t{i}_topk_logp": t.topk_logp, f"t{i}_next_logp": t.next_logp})
    for i, p in enumerate(ref.prompts):
        arrays.update({f"p{i}_prompt": p.prompt_ids, f"p{i}_greedy": p.greedy_ids})
    meta = {**ref.meta, "text_ids": [t.id for t in ref.texts],
            "prompt_ids": [p.id for p in ref.prompts], "stopped": [p.stopped for p in ref.prompts]}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def load_reference(path: Path) -> Reference:
    # allow_pickle stays off: object arrays in a file from outside are refused, never unpickled
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        texts = [TextRef(tid, z[f"t{i}_ids"], z[f"t{i}_topk_ids"], z[f"t{i}_topk_logp"],
                         z[f"t{i}_next_logp"]) for i, tid in enumerate(meta["text_ids"])]
        prompts = [PromptRef(pid, z[f"p{i}_prompt"], z[f"p{i}_greedy"], meta["stopped"][i])
                   for i, pid in enumerate(meta["prompt_ids"])]
    return Reference(texts, prompts, meta)


@dataclass(frozen=True)
class EvalRow:
    id: str
    kind: str  # text | prompt | messages
    value: str | tuple  # text / prompt, or messages as a tuple of (role, content)

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.value]


def read_eval_rows(path: Path) -> dict[str, EvalRow]:
    """A bundle's eval set (JSONL; phikit checked it when it built the bundle, and the manifest
    hashes it): rows by id. ValueError names the line of a malformed one."""
    rows = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            kind = next(k for k in ("text", "prompt", "messages") if k in obj)
            value = obj[kind]
            if kind == "messages":
                value = tuple((m["role"], m["content"]) for m in value)
            rows[str(obj["id"])] = EvalRow(str(obj["id"]), kind, value)
        except (ValueError, TypeError, KeyError, StopIteration):
            raise ValueError(f"{path}:{n}: not an eval row") from None
    return rows
