"""What validation costs: its wall time against one candidate forward pass over the same eval set
plus its greedy decoding (reference cached), and the first, uncached reference pass.

For each CPU backend, the artifact phikit converts from the checkpoint (tiny-phi3 by default, or
random weights with Phi-3-mini's shapes) is opened through the runner, then
  forward    one teacher-forced pass of the candidate over every eval text and every prompt
  greedy     the candidate's greedy decoding of every prompt (the eval set's max_new_tokens)
  validate   phikit's whole validation (teacher-forced texts + greedy generation of every
             prompt + metrics + the static checks of the artifact's files, the Modelfile's
             TEMPLATE rendered and tokenized for every chat), with the reference already cached
and the reference (transformers fp32) is computed once into an empty cache first. Each of the
three is timed --rounds times in turn (forward, greedy, validate, forward, ...) and the median
is reported: on a small model each takes well under a second, where one sample on a shared VM
moves by a third. Ratios from one run; not timed assertions.

Usage: python bench/validate.py [--layers 0] [--backends onnx,openvino,gguf] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=0, help="0 = the embedded tiny-phi3")
    ap.add_argument("--backends", default="onnx,openvino,gguf")
    ap.add_argument("--rounds", type=int, default=3, help="timings per phase; figures: median")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="phikit-bench-") as tmp:
        os.environ["PHIKIT_CACHE"] = str(Path(tmp) / "cache")  # an empty cache: first pass
        from toolkit.backends import BACKENDS
        from toolkit.runner.core import Sampling, open_session
        from toolkit.schema import load_recipe
        from toolkit.validate import Candidate, prepare_reference, run_parity

        from shapes import make_checkpoint, target_for

        if args.layers:
            source = make_checkpoint(Path(tmp) / "ckpt", args.layers)
        else:
            source = REPO / "models" / "tiny-phi3"
        recipe = load_recipe(REPO / "recipes" / "tiny-phi3-int4.yaml",
                             source_override=str(source))
        prepared = prepare_reference(recipe, str(source))  # what validation computes first
        ref, evalset, reference_s = prepared.reference, prepared.evalset, prepared.seconds
        assert not prepared.cached
        rows = {}
        for name in args.backends.split(","):
            backend = BACKENDS[name]
            target = target_for(name)
            out = Path(tmp) / name
            backend.convert(source, out, recipe, target, log=lambda s: None)
            session = open_session(backend.runtime_module, out,
                                   backend.runtime_options(target, recipe))
            session.logits(ref.texts[0].ids.tolist())  # warm-up, as validation's first row is

            def forward():
                for t in ref.texts:
                    session.logits(t.ids.tolist())
                for p in ref.prompts:
                    session.logits(p.prompt_ids.tolist())

            def greedy():
                for p in ref.prompts:
                    list(session.generate(p.prompt_ids.tolist(),
                                          Sampling(max_new_tokens=recipe.eval.max_new_tokens)))

            def validate():
                report = run_parity(Candidate(session, recipe, str(source), f"bare {name}",
                                              backend=backend, model_dir=out))
                assert report.reference["cached"]

            samples = [[timed(phase) for phase in (forward, greedy, validate)]
                       for _ in range(args.rounds)]
            forward_s, greedy_s, validate_s = (statistics.median(s) for s in zip(*samples))
            rows[name] = (forward_s, greedy_s, validate_s)
            session = None  # the runtime freed before the next backend loads
    n_gen = len(ref.prompts) * recipe.eval.max_new_tokens
    longest = max(t.ids.size for t in ref.texts)
    print(f"eval set {evalset.path.name}: {len(ref.texts)} texts (<= {recipe.eval.max_tokens} "
          f"tokens, the longest {longest}) + {len(ref.prompts)} prompts (<= {recipe.eval.max_new_tokens} greedy tokens, "
          f"{n_gen} in all); checkpoint {source.name}")
    print(f"first reference pass (transformers fp32, uncached): {reference_s:.1f} s; "
          f"figures below: the median of {args.rounds} timings each")
    print(f"{'backend':<9} {'forward s':>10} {'greedy s':>9} {'validate s':>11} "
          f"{'validate x (forward + greedy)':>30} {'goal <= 1.5x':>13} {'reference x validate':>21}")
    for name, (forward_s, greedy_s, validate_s) in rows.items():
        ratio = validate_s / (forward_s + greedy_s)
        print(f"{name:<9} {forward_s:>10.2f} {greedy_s:>9.2f} {validate_s:>11.2f} {ratio:>30.2f} "
              f"{'met' if ratio <= 1.5 else 'NOT MET':>13} {reference_s / validate_s:>21.2f}")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
