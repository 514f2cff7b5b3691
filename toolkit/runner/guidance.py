"""Constrained decoding for runtimes that hand the runner their logits (llama.cpp, MLX): a
token mask from llguidance, the grammar engine ONNX Runtime GenAI builds in, so that three
runtimes read a JSON Schema the same way. Imports llguidance and numpy only, and only when a
runtime that uses it is asked for a constraint.

A runtime calls `mask_for(model_dir, eos, vocab)` once (None when llguidance is not
installed: the runtime then reports that it cannot constrain), then per generation
`mask.start(constraint)` and, before sampling each token, `state.masked(logits, generated)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

MECHANISM = "llguidance token mask"


def available() -> bool:
    """Whether llguidance is installed (found, not imported: most sessions never need it)."""
    import importlib.util

    return importlib.util.find_spec("llguidance") is not None


class GuidanceMask:
    """llguidance's tokenizer view of the bundle's tokenizer.json (every bundle carries it),
    built at the first constrained generation (about 0.1 s for a 32k vocabulary), so that a
    session that is never asked for one never imports llguidance."""

    def __init__(self, tokenizer_json: Path, eos: Sequence[int], vocab: int):
        self.path, self.eos, self.vocab = tokenizer_json, list(eos), vocab
        self.tokenizer = None

    def start(self, constraint: Any) -> "GuidanceState":
        from llguidance import LLMatcher, LLTokenizer

        if self.tokenizer is None:
            # llguidance 1.6 takes one EOS id: any of the model's ends generation the same way
            self.tokenizer = LLTokenizer(str(self.path), n_vocab=self.vocab,
                                         eos_token=self.eos[0] if self.eos else None)

        try:
            matcher = LLMatcher(self.tokenizer,
                                LLMatcher.grammar_from_json_schema(constraint.schema_text()))
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"the schema cannot be enforced: {e}") from None
        if matcher.is_error():
            raise ValueError(f"the schema cannot be enforced: {matcher.get_error()}")
        return GuidanceState(matcher, self.vocab)


class GuidanceState:
    """One generation's matcher: consumes what was generated, says what may come next."""

    def __init__(self, matcher: Any, vocab: int):
        import numpy as np

        self.np, self.matcher, self.vocab, self.seen = np, matcher, vocab, 0

    def allowed(self, generated: Sequence[int]) -> Any:
        """A bool array over the vocabulary: the tokens the grammar allows after `generated`
        (this generation's tokens so far; those not yet consumed are consumed first)."""
        np = self.np
        for token in generated[self.seen:]:
            self.matcher.consume_token(int(token))
        self.seen = len(generated)
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[:self.vocab].astype(bool)

    def masked(self, logits: Any, generated: Sequence[int]) -> Any:
        """`logits` (numpy, last axis the vocabulary) with disallowed tokens at -inf."""
        allowed = self.allowed(generated)
        n = min(logits.shape[-1], allowed.shape[0])
        out = logits.copy()
        out[..., :n][..., ~allowed[:n]] = -self.np.inf
        out[..., n:] = -self.np.inf
        return out


def mask_for(model_dir: Path, eos: Sequence[int], vocab: int) -> GuidanceMask | None:
    """The mask for this model, or None where llguidance is not installed."""
    if not available() or not (Path(model_dir) / "tokenizer.json").is_file():
        return None
    return GuidanceMask(Path(model_dir) / "tokenizer.json", eos, vocab)


def pick(logits: Any, sampling: Any, rng: Any) -> int:
    """The next token from one position's (masked) logits, as the runtimes sample: greedy at
    temperature 0, else softmax at the temperature over top_k and top_p. For a runtime whose
    own sampler cannot take a mask (OpenVINO GenAI's pipeline)."""
    import numpy as np

    if sampling.temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / sampling.temperature
    order = np.argsort(-scaled)
    if sampling.top_k:
        order = order[:sampling.top_k]
    order = order[np.isfinite(scaled[order])]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), sampling.top_p) + 1)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(len(order), p=probs)])
