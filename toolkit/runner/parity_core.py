"""Parity engine: a runner Session (the candidate) against a Reference, on the same tokens.

Standard library + numpy only: it ships in every bundle (phikit_runner/parity_core.py), so a
device re-measures parity with the same code the build host ran (`python run.py validate`), and
phikit imports it for its own validation (toolkit/parity.py types the result). The report it
returns is the plain-JSON form of toolkit/report/model.py's ParityReport.

Metrics
  kld_*            KL(reference || candidate) per position, over the reference's top-K tokens plus
                   one tail bucket (a lower bound of the full KL; exact when the tail is empty)
  kld_p999         KLD's 99.9th percentile: the tail (llama.cpp --kl-divergence's "99.9% KLD")
  top1             share of positions where both pick the same most likely token (llama.cpp
                   --kl-divergence's "Same top p": n_same_top / count)
  ppl_ratio        candidate perplexity / reference perplexity on the actual next tokens
  greedy_match     tokens generated greedily before the first divergence, per prompt
  token_agreement  share of eval rows the candidate tokenizes exactly like the reference, and
                   (teacher-forced texts) decodes back to the reference's text
  eos_agreement    share of prompts whose generation stops where the candidate model itself
                   predicts an EOS of the reference, and never runs through one
  decode_agreement share of prompts whose generated tokens are, at every step, what the same
                   runtime's full forward pass over the same tokens ranks first (to within a
                   near-tie): the decode path (KV cache, positions of generated tokens) must
                   compute the model the teacher-forced metrics measured. greedy_match cannot
                   see a decode-only bug once quantization drift ends agreement with the
                   reference after a few tokens; this compares the candidate with itself, so
                   quantization does not mask it. Not checked for a generation that crosses
                   LongRoPE's original length: there the model itself (transformers included)
                   rotates the cached tokens with other factors than a full pass over the result

Position bands: where the checkpoint has a sliding window or LongRoPE (the reference records
both as landmarks), KLD and top-1 are also measured before and past each landmark, and greedy
generation separately for prompts longer than it. Each band with enough positions must meet the
KLD-mean and top-1 thresholds on its own: a converter that ignores the window or the long
factors is wrong only there, and the average over all positions would hide it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .core import Sampling, Session, chat_ids
from .logprobs import gathered_kld, gathered_logp, row_stats
from .reference_data import Reference, TextRef

REPORT_VERSION = 2  # toolkit/report/model.py reads (and upgrades) it
# metrics.kld_histogram counts log10(max(KLD, 1e-8)) in these half-decade bins (20 of them)
KLD_HISTOGRAM_EDGES = [-8 + 0.5 * i for i in range(21)]

# (threshold field, metric key, "max" or "min")
CHECKS = [
    ("kld_mean_max", "kld_mean", "max"),
    ("kld_p99_max", "kld_p99", "max"),
    ("kld_p999_max", "kld_p999", "max"),
    ("top1_min", "top1", "min"),
    ("ppl_ratio_max", "ppl_ratio", "max"),
    ("greedy_match_mean_min", "greedy_match_mean", "min"),
    ("token_agreement_min", "token_agreement", "min"),
    ("eos_agreement_min", "eos_agreement", "min"),
    ("decode_agreement_min", "decode_agreement", "min"),
    ("kld_drift_max", "kld_drift", "max"),
]
# A generated token agrees with the full forward pass when its log-prob there is within this of
# the best token's: a near-tie, which decode (one token, KV cache) and full-sequence kernels may
# round either way (bf16 logits in [16, 32) are 0.125 apart; an OpenVINO int8 bundle measured
# gaps up to 0.0625 on tiny-phi3; a decode position off by one measured up to 0.65).
DECODE_TOLERANCE = 0.25


MIN_BAND_POSITIONS = 32  # fewer positions than this: reported, not checked
BAND_CHECKS = [("kld_mean_max", "kld_mean", "max"), ("top1_min", "top1", "min")]


# Position drift: windows of at least DRIFT_MIN_WINDOW positions, about DRIFT_WINDOWS of them over
# the longest text; a split is judged only where both sides hold DRIFT_MIN_SIDE positions or more
# (fewer: one hard passage decides). KLD below the floor on both sides is no drift (fp32 bundles
# measure 1e-9 and their ratios are noise): DRIFT_FLOOR nats, or drift_floor's share of the bound.
DRIFT_WINDOWS = 8
DRIFT_MIN_WINDOW = 8
DRIFT_MIN_SIDE = 96
DRIFT_FLOOR = 1e-4


def drift_floor(thresholds: dict[str, Any]) -> float:
    """KLD under which a rise is no drift: DRIFT_FLOOR, or a quarter of the error the recipe
    accepts (kld_mean_max), whichever is larger. A W8A16 bundle's KLD of 2e-4 that doubles
    somewhere stays far inside what its bound allows; a rise past the accepted error does not."""
    bound = thresholds.get("kld_mean_max")
    return max(DRIFT_FLOOR, bound / 4) if isinstance(bound, (int, float)) else DRIFT_FLOOR


def position_drift(klds: list[np.ndarray], top1s: list[np.ndarray],
                   floor: float = DRIFT_FLOOR) -> dict[str, Any] | None:
    """KLD / top-1 per position window, and for each window boundary b the mean KLD at positions
    >= b over mean KLD at positions < b: per text, averaged over the texts with a window past b,
    so each text weighs the same on both sides and a long text's difficulty is no drift."""
    lengths = [k.size for k in klds]
    if not lengths or max(lengths) < 2 * DRIFT_MIN_WINDOW:
        return None
    window = max(DRIFT_MIN_WINDOW, -(-max(lengths) // DRIFT_WINDOWS))
    windows, splits = [], []
    for start in range(0, max(lengths), window):
        k = [x[start:start + window] for x in klds if x.size > start]
        t = [x[start:start + window] for x in top1s if x.size > start]
        n = sum(x.size for x in k)
        windows.append({"start": start, "end": start + window, "positions": n,
                        "kld_mean": float(np.concatenate(k).mean()),
                        "top1": float(np.concatenate(t).mean())})
        if start == 0:
            continue
        # texts with a full window past the split, each weighing the same on both sides
        reaching = [x for x in klds if x.size >= start + window]
        if min(sum(start for _ in reaching),
               sum(x.size - start for x in reaching)) < DRIFT_MIN_SIDE:
            continue
        kb = float(np.mean([x[:start].mean() for x in reaching]))
        ka = float(np.mean([x[start:].mean() for x in reaching]))
        splits.append({"position": start, "texts": len(reaching), "kld_before": kb,
                       "kld_after": ka, "ratio": (ka + floor) / (kb + floor)})
    return {"window": window, "floor": floor, "windows": windows, "splits": splits}


def worst_split(drift: dict[str, Any] | None) -> dict[str, Any] | None:
    """The window boundary after which KLD rises most, relative to before it."""
    return max((drift or {}).get("splits") or [], key=lambda s: s["ratio"], default=None)


def drift_symptom(drift: dict[str, Any]) -> str:
    """Where KLD starts to rise, and the windows that show it."""
    worst = worst_split(drift)
    later = [w for w in drift["windows"] if w["start"] >= worst["position"]]
    peak = max(later, key=lambda w: w["kld_mean"])
    return (f"KLD rises from position {worst['position']} on: mean {worst['kld_after']:.4g} "
            f"there vs {worst['kld_before']:.4g} before it (the same {worst['texts']} texts); "
            f"worst window {peak['start']}-{peak['end'] - 1}: KLD {peak['kld_mean']:.4g}, "
            f"top-1 {peak['top1']:.3f}")


def within(value: float, bound: float, kind: str) -> bool:
    """Does a measured value meet its bound ("max": at most, "min": at least)?"""
    return value <= bound if kind == "max" else value >= bound


def position_bands(landmarks: dict[str, int]) -> list[tuple[str, str, int, int | None]]:
    """(name, description, first position, end or None) for each side of each landmark."""
    bands = []
    if "sliding_window" in landmarks:
        w = landmarks["sliding_window"]
        bands += [("before_window", f"positions < {w}: inside the sliding window", 0, w),
                  ("past_window", f"positions >= {w}: the window slides", w, None)]
    if "original_length" in landmarks:
        o = landmarks["original_length"]
        bands += [("before_original", f"positions < {o}: inside LongRoPE's original length", 0,
                   o),
                  ("past_original", f"positions >= {o}: past the original length", o, None)]
    return bands


def band_report(landmarks: dict[str, int], klds: list[np.ndarray], top1s: list[np.ndarray],
                per_text: list[dict], per_prompt: list[dict]) -> list[dict[str, Any]]:
    out = []
    for name, description, lo, hi in position_bands(landmarks):
        kld = np.concatenate([k[lo:hi] for k in klds]) if klds else np.zeros(0)
        top1 = np.concatenate([t[lo:hi] for t in top1s]) if top1s else np.zeros(0)
        band: dict[str, Any] = {"name": name, "description": description, "start": lo,
                                "end": hi, "positions": int(kld.size),
                                "checked": bool(kld.size >= MIN_BAND_POSITIONS)}
        if kld.size:
            worst_i = max(range(len(klds)), key=lambda i: float(klds[i][lo:hi].mean())
                          if klds[i][lo:hi].size else -1.0)
            seg = klds[worst_i][lo:hi]
            band.update({"kld_mean": float(kld.mean()), "kld_p99": float(np.percentile(kld, 99)),
                         "top1": float(top1.mean()),
                         "worst": {"id": per_text[worst_i]["id"],
                                   "kld_mean": float(seg.mean()),
                                   "position": lo + int(seg.argmax())}})
        # generation: prompts that already reach past the landmark before decoding starts
        if hi is None:
            long_prompts = [p for p in per_prompt if p["prompt_tokens"] >= lo]
            band["prompts"] = len(long_prompts)
            if long_prompts:
                band["greedy_match_mean"] = float(np.mean([p["match"] for p in long_prompts]))
        out.append(band)
    return out


def band_checks(bands: list[dict], thresholds: dict[str, float | None]) -> list[dict[str, Any]]:
    checks = []
    for band in bands:
        if not band["checked"]:
            continue
        for threshold, key, kind in BAND_CHECKS:
            bound = thresholds.get(threshold)
            if bound is None:
                continue
            value = band[key]
            ok = within(value, bound, kind)
            w = band["worst"]
            detail = "" if ok else (
                f"{band['description']} ({band['positions']} positions): worst text "
                f"{w['id']!r}, mean KLD {w['kld_mean']:.4f} there, largest at position "
                f"{w['position']}")
            checks.append({"metric": f"{key}[{band['name']}]", "measured": value,
                           "bound": bound, "kind": kind, "passed": bool(ok), "detail": detail})
    return checks


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
    return {"id": row_id, "kind": "encode", "first_difference": i,
            "reference_tokens": ref[i:i + 4], "candidate_tokens": cand[i:i + 4],
            "context": session.detokenize(ref[max(0, i - 4):i + 4])}


def _decode_mismatch(row_id: str, cand: str, ref: str) -> dict[str, Any]:
    """The reference's token ids decoded by the candidate's tokenizer differ from the text."""
    i = common_prefix(cand, ref)
    return {"id": row_id, "kind": "decode", "first_difference": i, "reference_tokens": [],
            "candidate_tokens": [], "context": f"{ref[max(0, i - 12):i + 12]!r} decoded as "
                                               f"{cand[max(0, i - 12):i + 12]!r}"}


def _eos_problem(session: Session, cand: list[int], own_logits: np.ndarray, eos: set[int],
                 max_new_tokens: int) -> str | None:
    """Did generation run through an EOS, or stop on a token the model does not end with?
    own_logits: the candidate's teacher-forced logits over prompt + cand, from the last prompt
    position on (only the order within a position is used)."""
    through = [t for t in cand if t in eos]
    if through:
        return (f"generated EOS token {through[0]} ({session.detokenize([through[0]])!r}) and "
                "kept going: the runtime does not stop on it")
    if len(cand) < max_new_tokens and eos:
        predicted = int(np.argmax(own_logits[-1]))
        if predicted not in eos:
            return (f"stopped after {len(cand)} tokens although the model's own next token is "
                    f"{predicted} ({session.detokenize([predicted])!r}), not one of the EOS ids "
                    f"{sorted(eos)}: the runtime's EOS set is wrong")
    return None


def _decode_problem(session: Session, cand: list[int], own_logits: np.ndarray) -> str | None:
    """Is every generated token what the same runtime's full forward pass over the same tokens
    ranks first (within DECODE_TOLERANCE)? Each step is judged on the candidate's own prefix, so
    one disagreement does not cascade. own_logits: as for _eos_problem (only differences within
    a position are used)."""
    if not cand:
        return None
    rows = own_logits[:len(cand)]
    gaps = rows.max(axis=-1) - rows[np.arange(len(cand)), cand]
    bad = np.flatnonzero(gaps > DECODE_TOLERANCE)
    if not bad.size:
        return None
    i = int(bad[0])
    best = int(rows[i].argmax())
    return (f"generated token {i + 1} is {cand[i]} ({session.detokenize([cand[i]])!r}), but the "
            f"same runtime's full forward pass over the same tokens ranks {best} "
            f"({session.detokenize([best])!r}) {gaps[i]:.2f} nats higher ({bad.size} of "
            f"{len(cand)} steps disagree): generation computes something else than the model "
            "the teacher-forced metrics measured (KV cache, positions of generated tokens)")


@dataclass
class TeacherForced:
    """Per-text figures from one forward pass of the candidate over each reference text."""
    klds: list[np.ndarray] = field(default_factory=list)
    top1s: list[np.ndarray] = field(default_factory=list)
    ref_nll: list[np.ndarray] = field(default_factory=list)
    cand_nll: list[np.ndarray] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    mismatches: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Generation:
    """Greedy generation per prompt, and the self-consistency of each generation."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    eos_problems: list[dict[str, Any]] = field(default_factory=list)
    decode_problems: list[dict[str, Any]] = field(default_factory=list)
    decode_checked: int = 0


def teacher_forced(session: Session, ref: Reference, rows: dict, progress=None) -> TeacherForced:
    out = TeacherForced()
    decoded = ref.meta.get("decoded") or [None] * len(ref.texts)
    bos = ref.meta.get("bos_token_id")
    served = int(getattr(session, "context_length", 0) or 0)
    for t, ref_text in zip(ref.texts, decoded):
        if served and t.ids.size > served:
            # a runtime that serves fewer positions than the text (a context shorter than the
            # bundle claims: validate's context_agreement says so) is measured where it serves
            t = TextRef(t.id, t.ids[:served], t.topk_ids[:served], t.topk_logp[:served],
                        t.next_logp[:served - 1])
            ref_text = None  # the decoded text is the whole row's
        ids = t.ids.tolist()
        logits = np.asarray(session.logits(ids))
        if logits.shape[0] != len(ids):
            raise ValueError(f"candidate returned logits for {logits.shape[0]} of {len(ids)} "
                             "positions")
        normalizer, best = row_stats(logits)
        kld = gathered_kld(t.topk_logp, gathered_logp(logits, normalizer, t.topk_ids))
        top1 = best == t.topk_ids[:, 0]
        out.klds.append(kld)
        out.top1s.append(top1)
        out.ref_nll.append(-t.next_logp.astype(np.float64))
        out.cand_nll.append(-gathered_logp(logits[:-1], normalizer[:-1],
                                           t.ids[1:, None])[:, 0])
        cand_tok = session.tokenize(rows[t.id].value)[: len(ids)]
        if cand_tok != ids:
            out.mismatches.append(_mismatch(session, t.id, cand_tok, ids))
        elif ref_text is not None:
            cand_text = session.detokenize(ids[1:] if ids and ids[0] == bos else ids)
            if cand_text.strip() != ref_text.strip():  # runtimes differ on the leading space
                out.mismatches.append(_decode_mismatch(t.id, cand_text, ref_text))
        worst = int(kld.argmax())
        out.rows.append({"id": t.id, "tokens": len(ids), "kld_mean": float(kld.mean()),
                         "kld_max": float(kld.max()), "kld_max_position": worst,
                         "top1": float(top1.mean()),
                         "top1_by_position": top1.astype(int).tolist()})
        if progress:
            progress()
    return out


def generation(session: Session, ref: Reference, rows: dict, max_new_tokens: int,
               progress=None) -> Generation:
    out = Generation()
    original = ref.meta.get("landmarks", {}).get("original_length")
    eos = set(ref.meta.get("eos_token_ids", []))
    generated = []
    for p in ref.prompts:
        row = rows[p.id]
        prompt = p.prompt_ids.tolist()
        cand_prompt = (chat_ids(session, row.messages) if row.kind == "messages"
                       else session.tokenize(row.value))
        if cand_prompt != prompt:
            out.mismatches.append(_mismatch(session, p.id, cand_prompt, prompt))
        generated.append((prompt, list(session.generate(
            prompt, Sampling(max_new_tokens=max_new_tokens)))))
        if progress:
            progress()
    # Every generation first, then every check of one: a runtime that holds one compiled copy
    # of the model at a time (OpenVINO's one_compiled_copy) switches once, not once per prompt
    for p, (prompt, cand) in zip(ref.prompts, generated):
        ref_ids = p.greedy_ids.tolist()
        match = common_prefix(cand, ref_ids)
        # one teacher-forced pass over prompt + generation serves both self-consistency checks;
        # they need the logits from the last prompt position (which predicts cand[0]) on
        own_logits = np.asarray(session.logits(prompt + cand, start=max(len(prompt) - 1, 0)))
        problem = _eos_problem(session, cand, own_logits, eos, max_new_tokens)
        if problem:
            out.eos_problems.append({"id": p.id, "problem": problem})
        if original is None or not len(prompt) <= original < len(prompt) + len(cand):
            out.decode_checked += 1
            problem = _decode_problem(session, cand, own_logits)
            if problem:
                out.decode_problems.append({"id": p.id, "problem": problem})
        out.rows.append({"id": p.id, "match": match, "prompt_tokens": len(prompt),
                         "candidate_ids": cand, "reference_ids": ref_ids,
                         "common_text": session.detokenize(ref_ids[:match]),
                         "reference_tokens": len(ref_ids),
                         "candidate_tokens": len(cand), "exact": cand == ref_ids,
                         "reference_text": session.detokenize(ref_ids),
                         "candidate_text": session.detokenize(cand)})
    return out


def aggregate(tf: TeacherForced, gen: Generation, drift: dict | None = None) -> dict[str, Any]:
    """The report's metrics (unmeasured ones absent)."""
    kld = np.concatenate(tf.klds) if tf.klds else np.zeros(0)
    metrics: dict[str, Any] = {"positions": int(kld.size), "texts": len(tf.rows),
                               "prompts": len(gen.rows)}
    if kld.size:
        ref_ppl = math.exp(float(np.concatenate(tf.ref_nll).mean()))
        cand_ppl = math.exp(float(np.concatenate(tf.cand_nll).mean()))
        metrics.update({
            "kld_mean": float(kld.mean()), "kld_median": float(np.median(kld)),
            "kld_p99": float(np.percentile(kld, 99)),
            "kld_p999": float(np.percentile(kld, 99.9)), "kld_max": float(kld.max()),
            "top1": float(np.concatenate(tf.top1s).mean()),
            "ppl_reference": ref_ppl, "ppl_candidate": cand_ppl,
            "ppl_ratio": cand_ppl / ref_ppl, "ppl_delta": cand_ppl - ref_ppl,
            "kld_histogram": np.histogram(np.log10(np.maximum(kld, 1e-8)),
                                          bins=KLD_HISTOGRAM_EDGES)[0].tolist(),
        })
    if gen.rows:
        matches = [p["match"] for p in gen.rows]
        metrics.update({
            "greedy_match_mean": float(np.mean(matches)), "greedy_match_min": int(min(matches)),
            "greedy_exact": float(np.mean([p["exact"] for p in gen.rows])),
            "eos_agreement": 1.0 - len(gen.eos_problems) / len(gen.rows)})
    n_rows = len(tf.rows) + len(gen.rows)
    mismatches = len(tf.mismatches) + len(gen.mismatches)
    metrics["token_agreement"] = 1.0 - mismatches / n_rows if n_rows else 1.0
    if gen.decode_checked:
        metrics["decode_agreement"] = 1.0 - len(gen.decode_problems) / gen.decode_checked
        metrics["decode_checked_prompts"] = gen.decode_checked
    worst = worst_split(drift)
    if worst is not None:
        metrics["kld_drift"], metrics["kld_drift_from"] = worst["ratio"], worst["position"]
    return metrics


def checks(metrics: dict[str, Any], bands: list[dict], thresholds: dict[str, float | None],
           tf: TeacherForced, gen: Generation, drift: dict | None = None) -> list[dict[str, Any]]:
    out = []
    for field_name, key, kind in CHECKS:
        bound = thresholds.get(field_name)
        if bound is None or metrics.get(key) is None:
            continue
        value = metrics[key]
        ok = within(value, bound, kind)
        detail = "" if ok else drift_symptom(drift) if key == "kld_drift" else _symptom(
            key, tf.rows, gen.rows, tf.mismatches + gen.mismatches, gen.eos_problems,
            gen.decode_problems)
        out.append({"metric": key, "measured": value, "bound": bound, "kind": kind,
                    "passed": bool(ok), "detail": detail})
    return out + band_checks(bands, thresholds)


def evaluate(session: Session, ref: Reference, rows: dict[str, Any],
             thresholds: dict[str, float | None], max_new_tokens: int,
             evalset: dict[str, str] | None = None, progress=None) -> dict[str, Any]:
    """The candidate against the reference: teacher-forced pass, generation, aggregation,
    checks. `rows`: eval rows by id (.kind, .value, .messages); `evalset`: {file, sha256}. The
    report is complete except what its caller adds (timing, host, notes)."""
    tf = teacher_forced(session, ref, rows, progress)
    gen = generation(session, ref, rows, max_new_tokens, progress)
    drift = position_drift(tf.klds, tf.top1s, drift_floor(thresholds))
    metrics = aggregate(tf, gen, drift)
    bands = band_report(ref.meta.get("landmarks", {}), tf.klds, tf.top1s, tf.rows, gen.rows)
    found = checks(metrics, bands, thresholds, tf, gen, drift)
    n_rows = len(tf.rows) + len(gen.rows)
    mismatches = tf.mismatches + gen.mismatches
    report = {
        "version": REPORT_VERSION,
        "verdict": "pass" if all(c["passed"] for c in found) else "fail",
        "checks": found,
        "metrics": metrics,
        "bands": bands,
        "drift": drift,
        "landmarks": ref.meta.get("landmarks", {}),
        "thresholds": {k: v for k, v in thresholds.items() if not isinstance(v, dict)},
        "texts": tf.rows,
        "prompts": gen.rows,
        "tokenizer_mismatches": mismatches,
        "eos_problems": gen.eos_problems,
        "decode_problems": gen.decode_problems,
        # the round-trip of the reference's token ids through the candidate's tokenizer
        "tokenizer": {"rows": n_rows, "identical": n_rows - len(mismatches),
                      "chat_rows": sum(1 for p in ref.prompts if rows[p.id].kind == "messages")},
        "candidate": session.info(),
        "reference": {k: v for k, v in ref.meta.items() if k not in ("text_ids", "prompt_ids",
                                                                       "stopped")},
    }
    if evalset:
        report["evalset"] = dict(evalset)
    return report


def _symptom(metric: str, per_text: list, per_prompt: list, mismatches: list,
             eos_problems: list, decode_problems: list) -> str:
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
        if m["kind"] == "decode":
            return (f"{len(mismatches)} rows tokenized or decoded differently; first: {m['id']!r}"
                    f" decodes differently at character {m['first_difference']}: "
                    f"{m['context']}")
        return (f"{len(mismatches)} rows tokenized differently; first: {m['id']!r} at token "
                f"{m['first_difference']} in {m['context']!r}: reference {m['reference_tokens']}"
                f" vs candidate {m['candidate_tokens']}")
    if metric in ("eos_agreement", "decode_agreement"):
        problems = eos_problems if metric == "eos_agreement" else decode_problems
        return f"{len(problems)} prompts; first: {problems[0]['id']!r} " + problems[0]["problem"]
    return ""
