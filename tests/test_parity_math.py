"""The parity engine's arithmetic: top-K KL against the full KL, the greedy-match count, and
position drift."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from toolkit.parity import common_prefix, drift_symptom, log_softmax, position_drift, topk_kld
from toolkit.runner.logprobs import gathered_kld, gathered_logp, log_normalizer


def full_kl(p_logits, q_logits):
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def topk(logits, k):
    lp = log_softmax(logits)
    ids = np.argsort(-lp, axis=-1)[:, :k]
    return ids, np.take_along_axis(lp, ids, -1)


logit_arrays = arrays(np.float64, (3, 40), elements=st.floats(-8, 8))


@settings(max_examples=80, deadline=None)
@given(logit_arrays, logit_arrays)
def test_full_vocab_topk_equals_kl(p, q):
    ids, lp = topk(p, 40)
    np.testing.assert_allclose(topk_kld(ids, lp, log_softmax(q)), full_kl(p, q), atol=1e-9)


@settings(max_examples=80, deadline=None)
@given(logit_arrays, logit_arrays, st.integers(1, 39))
def test_topk_is_a_lower_bound(p, q, k):
    ids, lp = topk(p, k)
    approx = topk_kld(ids, lp, log_softmax(q))
    assert np.all(approx <= full_kl(p, q) + 1e-9)
    assert np.all(approx >= 0)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, (4, 300), elements=st.floats(-30, 30, width=32)),
       st.floats(-1e3, 1e3), st.integers(1, 300))
def test_gathered_log_probs_match_the_full_log_softmax(logits, offset, k):
    """Validation normalises only the gathered logits (float32 exp and pairwise sum); KLD and NLL
    agree with the float64 log_softmax of the whole row, also for logits far from zero."""
    logits = logits + np.float32(offset)
    full = log_softmax(logits)
    ids = np.argsort(-full, axis=-1, kind="stable")[:, :k]
    normalizer = log_normalizer(logits)
    np.testing.assert_allclose(gathered_logp(logits, normalizer, ids),
                               np.take_along_axis(full, ids, -1), atol=2e-4, rtol=0)
    ref_lp = np.take_along_axis(log_softmax(logits * 0.9), ids, -1)
    np.testing.assert_allclose(gathered_kld(ref_lp, gathered_logp(logits, normalizer, ids)),
                               topk_kld(ids, ref_lp, full), atol=2e-5)


def test_row_stats_in_blocks_over_threads_agree_with_one_pass(monkeypatch):
    """Validation normalises a text's logits in blocks of rows shared among threads; blocks of
    3 rows here (37 rows: a short last block) must give what one float64 pass over the whole
    matrix gives, and the argmax of the first maximum where a row ties."""
    from toolkit.runner import logprobs

    monkeypatch.setattr(logprobs, "_BLOCK_ELEMENTS", 900)
    monkeypatch.setattr(logprobs, "_cpus", lambda: 2)
    logits = np.random.default_rng(1).normal(0, 4, (37, 300)).astype(np.float32)
    logits[5, [7, 200]] = logits[5].max() + 1  # a tie: argmax takes the first
    normalizer, best = logprobs.row_stats(logits)
    x = logits.astype(np.float64)
    np.testing.assert_allclose(normalizer, np.log(np.exp(x).sum(-1)), atol=1e-5, rtol=0)
    assert best.tolist() == logits.argmax(-1).tolist() and best[5] == 7


def test_identical_distributions_give_zero():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 1000)) * 3
    ids, lp = topk(logits, 256)
    assert np.abs(topk_kld(ids, lp, log_softmax(logits))).max() < 1e-12


def test_peaked_reference_topk_close_to_full():
    """With a trained model's peaked distributions, K=256 of 32064 is within 1e-3 of the full KL."""
    rng = np.random.default_rng(1)
    p = rng.normal(size=(8, 32064)) * 4
    q = p + rng.normal(size=p.shape) * 0.1
    ids, lp = topk(p, 256)
    full = full_kl(p, q)
    assert np.all(np.abs(topk_kld(ids, lp, log_softmax(q)) - full) <= 1e-3 + 0.05 * full)


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([5, 6], [5, 6]) == 2


def _drift(klds):
    return position_drift(klds, [np.ones(k.size) for k in klds])


def test_drift_is_flat_where_the_error_does_not_depend_on_position():
    rng = np.random.default_rng(0)
    drift = _drift([rng.exponential(0.006, 128) for _ in range(12)])
    assert len(drift.windows) == 8 and drift.window == 16
    assert drift.worst.ratio < 1.3


def test_drift_says_where_the_error_starts_rising():
    rng = np.random.default_rng(1)
    klds = [rng.exponential(0.006, 128) for _ in range(12)]
    for k in klds:
        k[80:] *= 3
    drift = _drift(klds)
    assert drift.worst.position == 80 and drift.worst.ratio > 2.3
    assert "from position 80 on" in drift_symptom(drift)


def test_long_hard_texts_are_not_drift():
    """Each split compares positions of the same texts: texts that are both longer and harder
    than the others do not pass for a rise with position (a pooled mean would say 1.6x)."""
    rng = np.random.default_rng(2)
    klds = ([rng.exponential(0.002, 64) for _ in range(6)]
            + [rng.exponential(0.01, 128) for _ in range(6)])
    assert _drift(klds).worst.ratio < 1.3


def test_tiny_kld_is_no_drift():
    """fp32 bundles measure KLD ~1e-9: a tenfold rise there is below the floor."""
    klds = [np.full(128, 1e-9) for _ in range(4)]
    for k in klds:
        k[64:] = 1e-8
    assert _drift(klds).worst.ratio < 1.01


def test_the_drift_floor_follows_the_accepted_error():
    """A W8A16-like bundle whose KLD of ~2e-4 doubles mid-text is far inside its bound: no
    drift once the floor is a quarter of the kld_mean bound; a rise past it still is."""
    from toolkit.runner.parity_core import drift_floor

    rng = np.random.default_rng(3)
    klds = [rng.exponential(2e-4, 128) for _ in range(12)]
    for k in klds:
        k[16:] *= 2.5
    assert _drift(klds).worst.ratio > 1.5  # the fixed floor alone calls it drift
    floor = drift_floor({"kld_mean_max": 0.01})
    assert floor == 0.0025 and drift_floor({}) == 1e-4
    from toolkit.runner.parity_core import position_drift as core_drift

    assert core_drift(klds, [np.ones(128)] * 12, floor)["splits"][0]["ratio"] < 1.3
    big = [rng.exponential(0.006, 128) for _ in range(12)]
    for k in big:
        k[64:] *= 3
    assert max(s["ratio"] for s in core_drift(big, [np.ones(128)] * 12,
                                              drift_floor({"kld_mean_max": 0.0128}))
               ["splits"]) > 1.5
