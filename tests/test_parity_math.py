"""The parity engine's arithmetic: top-K KL against the full KL, and the greedy-match count."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from toolkit.parity import common_prefix, log_softmax, topk_kld


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
