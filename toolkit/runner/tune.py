"""`python run.py tune`: on the device, measure the runtime options that depend on it, keep the
fastest set that still validates, and record it in tuned.json beside the manifest.

What is measured, per candidate set: prefill (one forward pass over a 128-token prompt taken
from the bundle's reference texts) and generation (up to 32 greedy tokens after it), the best of
two runs each; the score is the time of that request. The fastest set is validated
(device.validate_here) before it is written; a set that fails is skipped, with the reason.
Candidates: `threads` (1, half the cores, every core), then, at the fastest thread count, each
value of each option in the runtime's host table (HOST_TABLE: what its rows would otherwise
decide from the CPU's flags), one option at a time, keeping the fastest value before the next;
an option a protecting row pins on this CPU (llama.cpp's AMX crash), or that the bundle itself
sets, is not tried.
tuned.json is not part of the hashed bundle (a device writes it), so the runner trusts none of
it blindly: only the runtime's tunable options with allowed values, and only on the CPU it was
measured on.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .core import (AUTO, MANIFEST, TUNED, BundleError, Manifest, Sampling, available_cpus,
                   host_cpu, host_table, open_session, verify_bundle)
from .reference_data import load_reference

PROMPT_TOKENS, NEW_TOKENS = 128, 32
def measure(session, prompt: list[int], repeats: int = 2) -> dict[str, float]:
    """Best-of-`repeats` seconds of one prefill and of a short greedy generation."""
    # each phase after a warm-up of its own: first-call allocations are not the option's cost,
    # nor is the switch of a runtime that holds one compiled copy at a time (OpenVINO's
    # one_compiled_copy compiles the model again between logits and generation)
    session.logits(prompt[:8])
    prefill, generate, tokens = [], [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.logits(prompt)
        prefill.append(time.perf_counter() - t0)
    list(session.generate(prompt[:8], Sampling(max_new_tokens=1)))
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = len(list(session.generate(prompt, Sampling(max_new_tokens=NEW_TOKENS))))
        generate.append(time.perf_counter() - t0)
    return {"prefill_seconds": round(min(prefill), 4),
            "generate_seconds": round(min(generate), 4), "generated_tokens": tokens,
            "request_seconds": round(min(prefill) + min(generate), 4)}


def tune(root: Path, threads: list[int] | None = None, *, key: Path | None = None,
         log=lambda s: print(s, file=sys.stderr)) -> int:
    from .device import validate_here

    root = Path(root)
    typed = Manifest.parse(verify_bundle(root, key), root / MANIFEST)
    if typed.reference_file is None:
        raise BundleError(f"{root}: this bundle carries no reference: rebuild it to tune it")
    reference = load_reference(root / typed.reference_file)
    longest = max(reference.texts, key=lambda t: t.ids.size)
    prompt = longest.ids[:PROMPT_TOKENS].tolist()
    cores = available_cpus()
    results: list[dict] = []

    def try_set(options: dict) -> float:
        session = open_session(typed.runtime_module, root / typed.model_dir,
                               {**typed.runtime_options, **options})
        try:
            figures = measure(session, prompt)
        finally:
            if hasattr(session, "close"):
                session.close()
        results.append({"options": options, **figures})
        log(f"{', '.join(f'{k}={v}' for k, v in options.items())}: prefill {len(prompt)} "
            f"tokens {figures['prefill_seconds'] * 1e3:.1f} ms, {figures['generated_tokens']} "
            f"tokens in {figures['generate_seconds']:.3f} s")
        return figures["request_seconds"]

    timed = {n: try_set({"threads": n})
             for n in sorted(set(threads or {1, max(1, cores // 2), cores}))}
    best = {"threads": min(timed, key=timed.get)}
    best_seconds = timed[best["threads"]]
    # an option the bundle sets was chosen at build time (an fp32 bundle's f32 math, a
    # target's precision): validated as such, not the device's to change
    chosen = {k for k, v in typed.runtime_options.items() if v not in (None, AUTO)}
    for option, values in host_table(typed.runtime_module).tunable(host_cpu()).items():
        if option in chosen:
            continue
        trials = {value: try_set({**best, option: value}) for value in values}
        fastest = min(trials, key=trials.get)
        if trials[fastest] < best_seconds:
            best, best_seconds = {**best, option: fastest}, trials[fastest]
    for result in sorted(results, key=lambda r: r["request_seconds"]):
        log(f"validating the fastest: {result['options']}")
        if validate_here(root, None, overrides=result["options"], log=lambda s: None,
                         key=key) != 0:
            result["validated"] = False
            log(f"{result['options']} fails validation here: skipped")
            continue
        result["validated"] = True
        slowest = max(r["request_seconds"] for r in results)
        data = {"options": result["options"], "cpu": host_cpu()["model"],
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "request": f"prefill {len(prompt)} tokens + up to {NEW_TOKENS} generated",
                "speedup_vs_slowest": round(slowest / result["request_seconds"], 2),
                "measured": results}
        tmp = root / (TUNED + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        tmp.replace(root / TUNED)
        log(f"{TUNED}: {result['options']} ({data['speedup_vs_slowest']}x the slowest set), "
            "validated on this machine")
        return 0
    log("no candidate set passed validation here: nothing written")
    return 1
