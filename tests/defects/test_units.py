"""Fast checks of the pieces the slow suite relies on: the decode self-consistency check in
parity.py, the planters' arithmetic, and the manifest re-write (no conversion, no runtime)."""

from __future__ import annotations

import json

import numpy as np

from toolkit.parity import DECODE_TOLERANCE, _decode_problem, log_softmax
from toolkit.runner.core import verify_bundle

from .formats import copy_bundle, rehash_manifest
from .planters import DEFECTS, PLANTERS, REGISTRY, WRITTEN, drop_end, two_bit_fake_quant, two_bit_nibbles


class _Session:
    def detokenize(self, ids):
        return " ".join(map(str, ids))


def _own_logp(preferred: list[int], vocab: int = 8, margin: float = 2.0):
    """Teacher-forced log-probs from the last prompt position on (what validation asks the
    runtime for) whose best next token after the prompt + i generated tokens is preferred[i],
    `margin` nats ahead of the rest."""
    logits = np.zeros((len(preferred) + 1, vocab))
    for i, tok in enumerate(preferred):
        logits[i, tok] = margin
    return log_softmax(logits)


def test_decode_check_accepts_the_runtimes_own_greedy_choices():
    cand = [4, 5, 6]
    assert _decode_problem(_Session(), cand, _own_logp(cand)) is None
    assert _decode_problem(_Session(), [], _own_logp([])) is None


def test_decode_check_accepts_near_ties():
    cand = [4, 5]
    own = _own_logp([4, 6], margin=DECODE_TOLERANCE / 2)  # 6 ahead of 5 by less than a tie
    assert _decode_problem(_Session(), cand, own) is None


def test_decode_check_names_the_first_disagreeing_step():
    cand = [4, 5, 6]
    own = _own_logp([4, 7, 6])  # the full forward pass prefers 7 at step 2
    problem = _decode_problem(_Session(), cand, own)
    assert problem and "generated token 2 is 5" in problem and "ranks 7" in problem
    assert "1 of 3 steps" in problem


def test_two_bit_codes_have_four_levels_on_the_same_grid():
    codes = np.arange(256, dtype=np.uint8)  # every pair of nibbles
    cut = two_bit_nibbles(codes)
    assert set(np.unique(cut & 0xF)) == set(np.unique(cut >> 4)) == {2, 6, 10, 14}
    # each code moves at most 2 steps, to the middle of its bin of 4
    assert np.abs((cut & 0xF).astype(int) - (codes & 0xF)).max() <= 2
    words = two_bit_nibbles(np.array([0x01234567, 0x89ABCDEF], dtype=np.uint32))
    assert {(int(w) >> s) & 0xF for w in words for s in range(0, 32, 4)} == {2, 6, 10, 14}


def test_two_bit_fake_quant_has_four_levels_per_group():
    w = np.random.default_rng(0).normal(size=(6, 64)).astype(np.float32)
    q = two_bit_fake_quant(w)
    assert q.dtype == w.dtype and q.shape == w.shape
    for group in q.reshape(6, 2, 32).reshape(-1, 32):
        assert len(np.unique(group)) <= 4
    assert np.abs(q - w).max() < np.abs(w).max()


def test_drop_end_removes_every_end_token():
    template = "{{'<|user|>\n' + m + '<|end|>\n'}}{{'<|assistant|>\n'}}"
    assert "<|end|>" not in drop_end(template) and "<|user|>" in drop_end(template)


def test_rehashed_manifest_verifies(tmp_path):
    bundle = tmp_path / "b"
    (bundle / "model").mkdir(parents=True)
    (bundle / "model" / "w.bin").write_bytes(b"honest")
    (bundle / "manifest.json").write_text(json.dumps({"format": "phikit-bundle/1", "files": {}}))
    rehash_manifest(bundle)
    verify_bundle(bundle)
    copy = copy_bundle(bundle, tmp_path / "copy")
    (copy / "model" / "w.bin").write_bytes(b"planted")
    (copy / "model" / "new.bin").write_bytes(b"added")
    rehash_manifest(copy)
    assert set(verify_bundle(copy)["files"]) == {"model/w.bin", "model/new.bin"}
    verify_bundle(bundle)  # the original is untouched


def test_registry_covers_every_defect_and_backend():
    assert set(PLANTERS) == {(d, b) for d in DEFECTS for b in REGISTRY}
    assert set(WRITTEN) <= set(PLANTERS), "a planter for a defect or backend nobody registered"
