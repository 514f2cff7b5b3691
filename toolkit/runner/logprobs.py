"""Log-probabilities and the top-K KL divergence of parity (standard library + numpy; shipped in
every bundle beside parity_core.py)."""

from __future__ import annotations

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def log_normalizer(logits: np.ndarray) -> np.ndarray:
    """log(sum(exp(logits))) per position, in float64: a logit minus it is that token's log-prob.
    Validation turns only the positions' gathered logits into log-probs, never the whole
    [positions, vocabulary] matrix: normalising all of it in float64 cost as much as the
    candidate's forward pass on a small model. exp and the sum run in float32: numpy sums a
    contiguous row pairwise, so the error stays ~1e-7 nats (far below any bound), and a float64
    accumulator would triple the sum's cost for nothing."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    top = logits.max(axis=-1, keepdims=True)
    shifted = np.subtract(logits, top)
    np.exp(shifted, out=shifted)
    return top[..., 0].astype(np.float64) + np.log(shifted.sum(axis=-1).astype(np.float64))


def gathered_logp(logits: np.ndarray, normalizer: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Log-probs of `ids` ([T, K]) at each position, from logits and their log_normalizer."""
    picked = np.take_along_axis(np.asarray(logits), ids.astype(np.int64), axis=-1)
    return picked.astype(np.float64) - normalizer[:, None]


def topk_kld(ref_ids: np.ndarray, ref_logp: np.ndarray, cand_logp: np.ndarray) -> np.ndarray:
    """Per-position KL(ref || cand) over the reference's top-K tokens + one tail bucket."""
    q_logp = np.take_along_axis(cand_logp, ref_ids.astype(np.int64), axis=-1)  # [T, K]
    return gathered_kld(ref_logp, q_logp)


def gathered_kld(ref_logp: np.ndarray, q_logp: np.ndarray) -> np.ndarray:
    """topk_kld from the candidate's log-probs already gathered at the reference's top-K ids."""
    p = np.exp(ref_logp.astype(np.float64))  # [T, K]
    q_logp = q_logp.astype(np.float64)
    kl = (p * (ref_logp - q_logp)).sum(axis=-1)
    p_tail = np.clip(1.0 - p.sum(axis=-1), 0.0, 1.0)
    q_tail = np.clip(1.0 - np.exp(q_logp).sum(axis=-1), 1e-12, 1.0)
    tail = np.where(p_tail > 1e-9, p_tail * (np.log(np.maximum(p_tail, 1e-300)) - np.log(q_tail)),
                    0.0)
    return np.maximum(kl + tail, 0.0)
