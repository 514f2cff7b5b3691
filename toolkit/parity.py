"""Parity engine: a runner Session (the candidate) against a cached Reference, on the same tokens.

Metrics
  kld_*            KL(reference || candidate) per position, over the reference's top-K tokens plus
                   one tail bucket (a lower bound of the full KL; exact when the tail is empty)
  top1             share of positions where both pick the same most likely token
  ppl_ratio        candidate perplexity / reference perplexity on the actual next tokens
  greedy_match     tokens generated greedily before the first divergence, per prompt
  token_agreement  share of eval rows the candidate tokenizes exactly like the reference
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .evalset import EvalSet
from .reference import Reference
from .runner.core import Sampling, Session, chat_ids
from .schema import Thresholds

# (threshold field, metric key, "max" or "min")
CHECKS = [
    ("kld_mean_max", "kld_mean", "max"),
    ("kld_p99_max", "kld_p99", "max"),
    ("top1_min", "top1", "min"),
    ("ppl_ratio_max", "ppl_ratio", "max"),
    ("greedy_match_mean_min", "greedy_match_mean", "min"),
    ("token_agreement_min", "token_agreement", "min"),
]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def topk_kld(ref_ids: np.ndarray, ref_logp: np.ndarray, cand_logp: np.ndarray) -> np.ndarray:
    """Per-position KL(ref || cand) over the reference's top-K tokens + one tail bucket."""
    p = np.exp(ref_logp.astype(np.float64))  # [T, K]
    q_logp = np.take_along_axis(cand_logp, ref_ids.astype(np.int64), axis=-1)  # [T, K]
    kl = (p * (ref_logp - q_logp)).sum(axis=-1)
    p_tail = np.clip(1.0 - p.sum(axis=-1), 0.0, 1.0)
    q_tail = np.clip(1.0 - np.exp(q_logp).sum(axis=-1), 1e-12, 1.0)
    tail = np.where(p_tail > 1e-9, p_tail * (np.log(np.maximum(p_tail, 1e-300)) - np.log(q_tail)),
                    0.0)
    return np.maximum(kl + tail, 0.0)


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _mismatch(session: Session, row_id: str, cand: list[int], ref: list[int]) -> dict[str, Any]:
    """Where the candidate's tokenizer first differs, with the text pieces on both sides."""
    i = common_prefix(cand, ref)
    return {"id": row_id, "first_difference": i,
            "reference_tokens": ref[i:i + 4], "candidate_tokens": cand[i:i + 4],
            "context": session.detokenize(ref[max(0, i - 4):i + 4])}


def evaluate(session: Session, ref: Reference, evalset: EvalSet, thresholds: Thresholds,
             max_new_tokens: int, progress=None) -> dict[str, Any]:
    rows = {r.id: r for r in evalset.rows}
    kld_all, top1_all, ref_nll, cand_nll = [], [], [], []
    per_text, tokenizer_mismatches = [], []
    for t in ref.texts:
        ids = t.ids.tolist()
        cand_logp = log_softmax(np.asarray(session.logits(ids)))
        if cand_logp.shape[0] != len(ids):
            raise ValueError(f"candidate returned logits for {cand_logp.shape[0]} of {len(ids)} "
                             "positions")
        kld = topk_kld(t.topk_ids, t.topk_logp, cand_logp)
        top1 = cand_logp.argmax(axis=-1) == t.topk_ids[:, 0]
        nll = -cand_logp[np.arange(len(ids) - 1), t.ids[1:].astype(np.int64)]
        kld_all.append(kld)
        top1_all.append(top1)
        ref_nll.append(-t.next_logp.astype(np.float64))
        cand_nll.append(nll)
        cand_tok = session.tokenize(rows[t.id].value)[: len(ids)]
        if cand_tok != ids:
            tokenizer_mismatches.append(_mismatch(session, t.id, cand_tok, ids))
        worst = int(kld.argmax())
        per_text.append({"id": t.id, "tokens": len(ids), "kld_mean": float(kld.mean()),
                         "kld_max": float(kld.max()), "kld_max_position": worst,
                         "top1": float(top1.mean()),
                         "top1_by_position": top1.astype(int).tolist()})
        if progress:
            progress()

    per_prompt = []
    for p in ref.prompts:
        row = rows[p.id]
        prompt = p.prompt_ids.tolist()
        cand_prompt = (chat_ids(session, row.messages) if row.kind == "messages"
                       else session.tokenize(row.value))
        if cand_prompt != prompt:
            tokenizer_mismatches.append(_mismatch(session, p.id, cand_prompt, prompt))
        cand = list(session.generate(prompt, Sampling(max_new_tokens=max_new_tokens)))
        ref_ids = p.greedy_ids.tolist()
        match = common_prefix(cand, ref_ids)
        per_prompt.append({"id": p.id, "match": match, "candidate_ids": cand,
                           "reference_tokens": len(ref_ids),
                           "candidate_tokens": len(cand), "exact": cand == ref_ids,
                           "reference_text": session.detokenize(ref_ids),
                           "candidate_text": session.detokenize(cand)})
        if progress:
            progress()

    kld = np.concatenate(kld_all) if kld_all else np.zeros(0)
    metrics: dict[str, Any] = {"positions": int(kld.size), "texts": len(ref.texts),
                               "prompts": len(ref.prompts)}
    if kld.size:
        ref_ppl = math.exp(float(np.concatenate(ref_nll).mean()))
        cand_ppl = math.exp(float(np.concatenate(cand_nll).mean()))
        metrics.update({
            "kld_mean": float(kld.mean()), "kld_median": float(np.median(kld)),
            "kld_p99": float(np.percentile(kld, 99)), "kld_max": float(kld.max()),
            "top1": float(np.concatenate(top1_all).mean()),
            "ppl_reference": ref_ppl, "ppl_candidate": cand_ppl,
            "ppl_ratio": cand_ppl / ref_ppl, "ppl_delta": cand_ppl - ref_ppl,
            "kld_histogram": np.histogram(np.log10(np.maximum(kld, 1e-8)),
                                          bins=np.arange(-8, 2.5, 0.5))[0].tolist(),
        })
    if per_prompt:
        matches = [p["match"] for p in per_prompt]
        metrics.update({"greedy_match_mean": float(np.mean(matches)),
                        "greedy_match_min": int(min(matches)),
                        "greedy_exact": float(np.mean([p["exact"] for p in per_prompt]))})
    n_rows = len(ref.texts) + len(ref.prompts)
    metrics["token_agreement"] = 1.0 - len(tokenizer_mismatches) / n_rows if n_rows else 1.0

    checks = []
    for field, key, kind in CHECKS:
        bound = getattr(thresholds, field)
        if bound is None or key not in metrics:
            continue
        value = metrics[key]
        ok = value <= bound if kind == "max" else value >= bound
        checks.append({"metric": key, "measured": value, "bound": bound, "kind": kind,
                       "passed": bool(ok), "detail": "" if ok else _symptom(key, per_text,
                                                                            per_prompt,
                                                                            tokenizer_mismatches)})
    return {
        "verdict": "pass" if all(c["passed"] for c in checks) else "fail",
        "checks": checks,
        "metrics": metrics,
        "thresholds": thresholds.model_dump(),
        "texts": per_text,
        "prompts": per_prompt,
        "tokenizer_mismatches": tokenizer_mismatches,
        # the round-trip of the reference's token ids through the candidate's tokenizer
        "tokenizer": {"rows": n_rows, "identical": n_rows - len(tokenizer_mismatches),
                      "chat_rows": sum(1 for p in ref.prompts if rows[p.id].kind == "messages")},
        "candidate": session.info(),
        "reference": {k: v for k, v in ref.meta.items() if k not in ("text_ids", "prompt_ids",
                                                                       "stopped")},
        "evalset": {"file": evalset.path.name, "sha256": evalset.sha256},
    }


def _symptom(metric: str, per_text: list, per_prompt: list, mismatches: list) -> str:
    """Where a failed metric is worst, so a person knows where to look."""
    if metric.startswith("kld") or metric in ("top1", "ppl_ratio"):
        worst = max(per_text, key=lambda t: t["kld_mean"])
        return (f"worst text {worst['id']!r}: mean KLD {worst['kld_mean']:.4f}, max "
                f"{worst['kld_max']:.3f} at position {worst['kld_max_position']}, top-1 "
                f"{worst['top1']:.3f}")
    if metric == "greedy_match_mean":
        worst = min(per_prompt, key=lambda p: p["match"])
        return (f"prompt {worst['id']!r} diverged after {worst['match']} tokens: reference "
                f"{worst['reference_text'][:60]!r} vs candidate {worst['candidate_text'][:60]!r}")
    if metric == "token_agreement":
        m = mismatches[0]
        return (f"{len(mismatches)} rows tokenized differently; first: {m['id']!r} at token "
                f"{m['first_difference']} in {m['context']!r}: reference {m['reference_tokens']}"
                f" vs candidate {m['candidate_tokens']}")
    return ""


def format_checks(report: dict[str, Any]) -> list[str]:
    out = []
    for c in report["checks"]:
        op = "<=" if c["kind"] == "max" else ">="
        mark = "ok  " if c["passed"] else "FAIL"
        line = f"{mark} {c['metric']:<18} {c['measured']:.4f} (needs {op} {c['bound']})"
        out.append(line + (f"  {c['detail']}" if c["detail"] else ""))
    return out
