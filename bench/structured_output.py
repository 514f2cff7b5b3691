"""Structured output: schema-valid answers / requests, and tokens/s constrained vs unconstrained,
per CPU runtime, side by side in one run.

For each runtime (ONNX Runtime GenAI, OpenVINO, llama.cpp, MLX), on one artifact converted by
phikit from a random checkpoint with Phi-3-mini's layer shapes (bench/shapes.py), through the
runner's own Session (what `run.py serve` drives):
  valid     answers to a Pydantic-style schema with bounded fields (maxLength, minimum/maximum,
            maxItems, enum), greedy and sampled at temperature 1 with several seeds, each checked
            with jsonschema: must be every one (a random model held to nothing breaks them all)
  rates     tokens/s of the same number of tokens after the same prompt, unconstrained and
            constrained (a schema of one long string, so that the grammar never ends first),
            measured in rounds, each round in a rotated order on the same loaded session;
            the median of each, and their ratio (goal: constrained >= 0.9 x unconstrained)
Ratios from one run; not timed assertions.

Usage: python bench/structured_output.py [--layers 2] [--tokens 64] [--rounds 5]
                                         [--backends onnx,openvino,gguf,mlx]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from shapes import shape_artifacts  # noqa: E402

from toolkit.runner.core import Constraint, Sampling, open_session  # noqa: E402

PROMPT = [1] + list(range(1000, 1031))  # 32 plain vocabulary ids
RECORD = {"type": "object", "additionalProperties": False,
          "required": ["title", "score", "tags", "done"],
          "properties": {"title": {"type": "string", "maxLength": 24},
                         "score": {"type": "integer", "minimum": 0, "maximum": 100},
                         "tags": {"type": "array", "maxItems": 3,
                                  "items": {"enum": ["red", "green", "blue"]}},
                         "done": {"type": "boolean"}}}
SAMPLINGS = [{"temperature": 0.0}, *({"temperature": 1.0, "seed": s} for s in range(1, 8))]


def validity(session, prompts: list[list[int]]) -> tuple[int, int]:
    """(schema-valid answers, requests) over prompts x SAMPLINGS."""
    import jsonschema

    valid = total = 0
    for prompt in prompts:
        for sampling in SAMPLINGS:
            out = session.generate(prompt, Sampling(max_new_tokens=256,
                                                    constraint=Constraint(RECORD), **sampling))
            text = session.detokenize(list(out))
            total += 1
            try:
                jsonschema.validate(json.loads(text), RECORD)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                print(f"  invalid: {text[:120]!r}")
    return valid, total


def rate(session, n: int, constrained: bool) -> float:
    # minLength past what n tokens can spell: the grammar ends no generation early
    long_text = Constraint({"type": "object", "required": ["text"], "additionalProperties": False,
                            "properties": {"text": {"type": "string", "minLength": 64 * n}}})
    sampling = Sampling(max_new_tokens=n, stop_token_ids=(),
                        constraint=long_text if constrained else None)
    start = time.perf_counter()
    count = sum(1 for _ in session.generate(PROMPT, sampling))
    return count / (time.perf_counter() - start)


def median_rates(session, n: int, rounds: int) -> dict[str, float]:
    order = ["free", "constrained"]
    for mode in order:  # once untimed: first-call costs (grammar tokenizer, compilation)
        rate(session, n, mode == "constrained")
    rates: dict[str, list[float]] = {m: [] for m in order}
    for r in range(rounds):
        for mode in order[r % 2:] + order[:r % 2]:
            rates[mode].append(rate(session, n, mode == "constrained"))
    return {m: statistics.median(v) for m, v in rates.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--backends", default="onnx,openvino,gguf,mlx")
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    rows = {}
    for art in shape_artifacts(args.layers, args.backends.split(","), threads):
        session = open_session(art.backend.runtime_module, art.out, art.options)
        prompts = [PROMPT, session.tokenize("Describe json.dumps as a record."),
                   session.tokenize("Hi")]
        valid, total = validity(session, prompts)
        rows[art.name] = {"valid": valid, "total": total, "mechanism": session.constrains,
                          **median_rates(session, args.tokens, args.rounds)}
        del session
    print(f"Phi-3-mini shapes x {args.layers} layers, int4, {threads} threads; valid: "
          f"{len(SAMPLINGS)} samplings x 3 prompts; rates: {args.tokens} tokens after a 32-token "
          f"prompt, median of {args.rounds} rounds (rotated order)")
    print(f"{'runtime':<9} {'valid/requests':>15} {'free tok/s':>11} {'constrained':>12} "
          f"{'constrained x free':>19}  mechanism")
    for name, r in rows.items():
        print(f"{name:<9} {r['valid']:>7}/{r['total']:<7} {r['free']:>11.1f} "
              f"{r['constrained']:>12.1f} {r['constrained'] / r['free']:>19.3f}  {r['mechanism']}")
    print("goal: valid/requests = 100%; constrained x free >= 0.9")


if __name__ == "__main__":
    main()
