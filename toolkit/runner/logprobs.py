"""Log-probabilities and the top-K KL divergence of parity (standard library + numpy; shipped in
every bundle beside parity_core.py)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def log_normalizer(logits: np.ndarray) -> np.ndarray:
    """log(sum(exp(logits))) per position, in float64: a logit minus it is that token's log-prob."""
    return row_stats(logits)[0]


def row_stats(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position of [positions, vocabulary] logits: log_normalizer and the argmax, in one pass
    over the matrix. Validation turns only the positions' gathered logits into log-probs, never
    the whole matrix: normalising all of it in float64 cost as much as the candidate's forward
    pass on a small model. exp and the sum run in float32 (numpy sums a contiguous row
    pairwise, so the error stays ~1e-7 nats, far below any bound) over blocks of rows a few MB
    large, which stay in cache between the max, the exp and the sum (a whole 4096-token text's
    matrix is 0.5 GB), and the blocks are shared among the CPUs: numpy releases the GIL in its
    loops, and the runtime is idle meanwhile."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    rows = logits.reshape(-1, logits.shape[-1])
    normalizer, argmax = np.empty(rows.shape[0]), np.empty(rows.shape[0], dtype=np.int64)
    step = max(1, _BLOCK_ELEMENTS // max(rows.shape[1], 1))

    def block(lo: int) -> None:
        part = rows[lo:lo + step]
        best = part.argmax(axis=-1)
        top = np.take_along_axis(part, best[:, None], axis=-1)
        shifted = np.subtract(part, top)
        np.exp(shifted, out=shifted)
        argmax[lo:lo + step] = best
        normalizer[lo:lo + step] = (top[:, 0].astype(np.float64)
                                    + np.log(shifted.sum(axis=-1).astype(np.float64)))

    starts = range(0, rows.shape[0], step)
    workers = min(len(starts), _cpus())
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(block, starts))
    else:
        for lo in starts:
            block(lo)
    shape = logits.shape[:-1]
    return normalizer.reshape(shape), argmax.reshape(shape)


_BLOCK_ELEMENTS = 1 << 20  # 4 MB of float32 logits per block


def _cpus() -> int:
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 8))
    except AttributeError:  # not on Linux
        return max(1, min(os.cpu_count() or 1, 8))


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


def chosen_and_top(logits: np.ndarray, ids, top: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row of `logits` (one position's prediction): the log-probability of ids[i], and the
    `top` most likely tokens with theirs (the server's logprobs / top_logprobs)."""
    logp = log_softmax(np.asarray(logits, dtype=np.float32))
    out = []
    for row, token in zip(logp, ids):
        best = np.argpartition(-row, top)[:top] if top else np.empty(0, dtype=np.int64)
        best = best[np.argsort(-row[best])]
        out.append((float(row[int(token)]), [(int(b), float(row[b])) for b in best]))
    return out
