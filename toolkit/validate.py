"""Validation: open the candidate through the runner, get the (cached) reference, run parity.

Works on a phikit bundle (thresholds, eval set and source come from its manifest) or on a bare
artifact directory made by another tool (the backend is detected from its files; --reference
names the checkpoint, --recipe the thresholds and eval set).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .artifact_checks import Fact, reference_claims, static_checks
from .backends import detect_backend, get_backend
from .checkpoint import cache_root, file_sha256, read_model_info, resolve_source
from .family import check_remote_code
from .errors import PhikitError
from .evalset import load_evalset
from .manifest import BundleManifest
from .parity import evaluate
from .reference import load_or_compute
from .paths import RECIPES_DIR
from .remote import bundle_session, local_session
from .report.model import Check, ParityReport
from .report import write_text_atomic
from .runner.core import (MANIFEST, BundleError, Session, bundle_files, host_summary,
                          verify_bundle)
from .schema import Recipe, Thresholds, load_recipe

DEFAULT_RECIPE = RECIPES_DIR / "tiny-phi3-int4.yaml"


@dataclass
class Candidate:
    session: Session
    recipe: Recipe
    source: str  # checkpoint the reference is computed from
    kind: str  # "bundle" or "bare <backend>"
    backend: Any = None  # the registry's Backend: its tokenizer rule and default bounds
    # with --emulate: emulate.EmulatedValidation, the bundle's `run.py validate` under qemu;
    # `session` is then the same bundle on this machine (the greedy comparison)
    emulated: Any = None
    model_dir: Path | None = None  # the artifact's files (static checks read them)

    @property
    def exact_tokenizer(self) -> bool:
        """Every row must tokenize as transformers does (Backend.exact_tokenizer)."""
        return bool(self.backend is not None and self.backend.exact_tokenizer)

    def close(self) -> None:
        if self.session is not None and hasattr(self.session, "close"):
            self.session.close()


def open_candidate(path: Path, reference: str | None, recipe_path: Path | None,
                   options: dict[str, Any] | None = None, emulate: str | None = None,
                   log: Callable[[str], None] = lambda s: None,
                   trust_remote_code: bool = False) -> Candidate:
    candidate = _open_candidate(path, reference, recipe_path, options, emulate, log)
    # whatever the bundle's manifest says: only this command line can trust remote code
    candidate.recipe = candidate.recipe.model_copy(update={"trust_remote_code": trust_remote_code})
    return candidate


def _open_candidate(path: Path, reference: str | None, recipe_path: Path | None,
                    options: dict[str, Any] | None, emulate: str | None,
                    log: Callable[[str], None]) -> Candidate:
    path = Path(path)
    if not path.is_dir():
        raise PhikitError("not a directory", file=path)
    if emulate and not (path / MANIFEST).is_file():
        raise PhikitError("--emulate needs a phikit bundle (its lock says what to install)",
                          file=path)
    if (path / MANIFEST).is_file():
        try:
            document = verify_bundle(path)
        except BundleError as e:
            raise PhikitError(str(e)) from None
        manifest = BundleManifest.parse(document, path / MANIFEST)
        emulated = None
        if emulate:  # set up (and refused where it cannot run) before the native session opens
            from .emulate import EmulatedValidation

            emulated = EmulatedValidation(path, manifest, emulate, log)
        recipe = Recipe.model_validate(manifest.recipe)
        recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(
            update={"file": path / manifest.eval_file})})
        if recipe_path is not None:
            recipe = load_recipe(recipe_path, source_override=reference or recipe.source)
        # the bundle's own runner code, in a child process (a crashing runtime is an error)
        session = bundle_session(path, document, options)
        candidate = Candidate(session, recipe, reference or manifest.source.id, "bundle",
                              backend=get_backend(manifest.backend),
                              model_dir=path / manifest.model_dir)
        if emulated is not None:
            candidate.kind, candidate.emulated = f"bundle, emulated {emulate}", emulated
        return candidate
    backend = detect_backend(path)
    if reference is None:
        raise PhikitError("a bare artifact directory needs --reference CHECKPOINT (local dir or "
                          "hub id) to compare against", file=path)
    recipe = load_recipe(recipe_path or DEFAULT_RECIPE, source_override=reference)
    session = local_session(backend.runtime_module, path, options or {})
    return Candidate(session, recipe, reference, f"bare {backend.name}", backend=backend,
                     model_dir=path)


def effective_thresholds(recipe: Recipe, backend: Any = None) -> Thresholds:
    """The bounds for this backend: its measured defaults for the recipe's precision, under the
    recipe's general bounds, under the recipe's thresholds.backends.<name>; all rows must
    tokenize alike where the backend's runner tokenizes exactly. A bundle's manifest holds the
    result, every field set."""
    given = recipe.thresholds.model_dump(exclude_unset=True, exclude={"backends"})
    defaults = backend.default_thresholds(recipe.quantization.precision) if backend else {}
    own = recipe.thresholds.backends.get(backend.name) if backend else None
    mine = own.model_dump(exclude_unset=True) if own is not None else {}
    thresholds = Thresholds(**{**defaults, **given, **mine})
    if backend is not None and backend.exact_tokenizer:
        thresholds = thresholds.model_copy(update={"token_agreement_min": 1.0})
    return thresholds


@dataclass
class PreparedReference:
    reference: Any
    evalset: Any
    cached: bool
    seconds: float
    checkpoint: Path  # the resolved source: what the static checks read the claims from


def prepare_reference(recipe: Recipe, source: str, progress: Callable[[str, int], Callable[
        [], None]] | None = None) -> PreparedReference:
    """The reference for this recipe's eval set, from the cache or computed now. Builds call it
    before loading the candidate, so the two models are never in memory at once (full-size
    Phi-3-mini: 7.6 GB of bf16 reference, then the candidate)."""
    evalset = load_evalset(recipe.eval.file, recipe.eval.limit)
    checkpoint = resolve_source(source, recipe.revision)
    n = len(evalset.rows)
    start = time.perf_counter()
    ref, cached = load_or_compute(checkpoint, evalset, recipe.eval.max_tokens,
                                  recipe.eval.max_new_tokens,
                                  (lambda: progress(f"reference (transformers "
                                                    f"{recipe.eval.reference_dtype})", n))
                                  if progress else None, recipe.eval.reference_dtype,
                                  recipe.trust_remote_code,
                                  # only a reference computed now runs the checkpoint's code (and
                                  # the check imports transformers, seconds per validation)
                                  lambda: check_remote_code(read_model_info(checkpoint),
                                                            recipe.trust_remote_code, source),
                                  context_tokens=recipe.context_length or recipe.eval.max_tokens)
    return PreparedReference(ref, evalset, cached, time.perf_counter() - start, checkpoint)


def run_parity(candidate: Candidate, progress: Callable[[str, int], Callable[[], None]]
               | None = None, prepared: PreparedReference | None = None) -> ParityReport:
    recipe = candidate.recipe
    prepared = prepared or prepare_reference(recipe, candidate.source, progress)
    ref, evalset, cached, ref_seconds = (prepared.reference, prepared.evalset, prepared.cached,
                                         prepared.seconds)
    n = len(evalset.rows)
    start = time.perf_counter()
    thresholds = effective_thresholds(recipe, candidate.backend)
    try:
        if candidate.emulated is not None:  # the bundle validates itself on the emulated CPU
            report = ParityReport.read(candidate.emulated.run(thresholds.bounds(),
                                                              recipe.eval.limit))
        else:
            report = evaluate(candidate.session, ref, evalset, thresholds,
                              recipe.eval.max_new_tokens,
                              progress("candidate", n) if progress else None)
    except PhikitError:
        raise  # e.g. the runtime's process crashed: already one line
    except Exception as e:  # noqa: BLE001 - a runtime's own error (onnxruntime, openvino, ...)
        # The artifact, not phikit, failed on a row: say so in one line, never a traceback.
        message = " ".join(str(e).split())
        raise PhikitError(f"the candidate runtime failed on the eval set ({type(e).__name__}): "
                          f"{message[:600]}") from None
    notes = add_static_checks(report, candidate, prepared)
    report.reference.update({"cached": cached, "source": candidate.source})
    report.timing = {"reference_seconds": round(ref_seconds, 2),
                     "candidate_seconds": round(time.perf_counter() - start, 2)}
    report.artifact = candidate.kind
    report.host = host_summary()
    info = report.candidate
    notes += list(info.get("notes", []))  # each runtime says where its figures come from
    if candidate.emulated is not None:
        report.emulation = compare_native(candidate, ref, report)
        notes.append(f"measured on emulated {info.get('emulated_arch')} (qemu user mode, "
                     f"{info.get('root') or info.get('emulated_cpu')}); greedy tokens match this "
                     "machine's run of the same "
                     f"bundle for {report.emulation['greedy_match_vs_native_mean']:.1f} tokens "
                     "on average")
    if candidate.exact_tokenizer and report.tokenizer is not None:
        notes.append("this backend's runner tokenizes with the checkpoint's own tokenizer (or "
                     "the backend converted it), so every eval row (plain and chat-formatted) "
                     "must tokenize exactly like the reference: "
                     f"{report.tokenizer.identical} of {report.tokenizer.rows} did")
    notes += coverage_notes(report, recipe)
    served = info.get("context_length")
    for band in report.bands:
        if served is not None and band.start >= int(served):
            continue  # the bundle never serves that far (a fixed KV cache shorter than it)
        if band.end is None and not band.checked:
            notes.append(f"the eval set reaches {band.description.split(':')[0]} at only "
                         f"{band.positions} positions: behaviour there is reported, not "
                         "checked (add longer texts to the eval set)")
    report.notes = notes
    return report


def coverage_notes(report: ParityReport, recipe: Recipe) -> list[str]:
    """How far the eval reached against the context the bundle claims (metrics.context_*)."""
    reached = max([t.tokens for t in report.texts]
                  + [p.prompt_tokens + p.candidate_tokens for p in report.prompts], default=0)
    claimed = recipe.context_length or report.candidate.get("context_length")
    report.metrics.context_reached = reached
    report.metrics.context_claimed = int(claimed) if claimed else None
    if claimed and reached < int(claimed):
        return [f"the eval set reaches {reached} of the {int(claimed)} positions the bundle "
                f"claims to serve: positions past {reached} are not validated (a text row with "
                '"reach_context": true reaches the recipe\'s context_length)']
    return []


def add_static_checks(report: ParityReport, candidate: Candidate,
                      prepared: PreparedReference) -> list[str]:
    """The artifact's files against what the bundle claims (artifact_checks.py), as checks of
    the report; returns what could not be read (notes)."""
    if candidate.backend is None or candidate.model_dir is None:
        return []
    recipe, session = candidate.recipe, candidate.session
    facts = candidate.backend.artifact_facts(candidate.model_dir)
    facts.facts += [Fact("runtime", "context_length", int(session.context_length), "context"),
                    Fact("runtime", "eos_token_ids", list(session.eos_token_ids), "eos_set")]
    # a bundle claims its recipe's context; an artifact made elsewhere claims none but the
    # checkpoint's own maximum (the recipe then only brings thresholds and the eval set)
    claimed = None if candidate.kind.startswith("bare") else recipe.context_length
    claims = reference_claims(prepared.checkpoint, claimed,
                              prepared.reference.meta.get("eos_token_ids", []))
    rows = {r.id: r for r in prepared.evalset.rows}
    chats = [(p.id, rows[p.id].messages, p.prompt_ids.tolist())
             for p in prepared.reference.prompts if rows[p.id].kind == "messages"]
    report.checks += [Check.model_validate(c) for c in static_checks(facts, claims, chats)]
    report.verdict = "pass" if all(c.passed for c in report.checks) else "fail"
    return list(facts.notes)


def compare_native(candidate: Candidate, ref, report: ParityReport) -> dict[str, Any]:
    """Greedy continuations of the emulated runtime vs the same bundle on this machine: the ARM
    kernels are not the x86 ones, so report how far they agree (metrics, not bit-equality)."""
    from .parity import common_prefix
    from .runner.core import Sampling

    rows = []
    for p, emulated in zip(ref.prompts, report.prompts):
        native = list(candidate.session.generate(p.prompt_ids.tolist(), Sampling(
            max_new_tokens=candidate.recipe.eval.max_new_tokens)))
        rows.append({"id": p.id, "match": common_prefix(native, emulated.candidate_ids),
                     "native_tokens": len(native)})
    matches = [r["match"] for r in rows]
    info = report.candidate
    return {"arch": info.get("emulated_arch"), "cpu": info.get("emulated_cpu"),
            "setup_seconds": info.get("setup_seconds", 0.0),
            "greedy_match_vs_native_mean": sum(matches) / len(matches) if matches else 0.0,
            "greedy_match_vs_native_min": min(matches, default=0), "prompts": rows,
            "native_metrics_note": "run `phikit validate` without --emulate for this "
                                   "machine's figures"}


# --- the validation cache -----------------------------------------------------------------------
# A build measures parity once per (bundle content, reference, bounds, installed runtime, CPU):
# the figures are a function of those, so an identical rebuild (the demo after a build, a CI job
# on a warm cache) reuses them, and says so in the report. `phikit validate` always measures.

TOOLKIT_DIR = Path(__file__).resolve().parent


def validation_key(stage: Path, runtime: str, options: dict[str, Any], reference_key: str,
                   thresholds: Thresholds, max_new_tokens: int, packages: list[str]) -> str:
    """Everything a parity figure depends on. `stage`: the bundle being built (its model and
    runner files; the reference by its own key, since its npz is re-written on every build)."""
    from .lock import pinned_requirements

    files = {rel: file_sha256(stage / rel) for rel in bundle_files(stage)
             if not rel.startswith("eval/")}
    phikit = hashlib.sha256()  # the measuring side (parity, validate, report model, ...)
    for path in sorted(TOOLKIT_DIR.rglob("*.py")):
        phikit.update(path.read_bytes())
    data = {"files": files, "runtime": runtime, "options": options, "reference": reference_key,
            "thresholds": thresholds.model_dump(mode="json"), "max_new_tokens": max_new_tokens,
            "installed": sorted(pinned_requirements(packages)), "phikit": phikit.hexdigest(),
            "host": host_summary(all_flags=True)}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _validation_path(key: str) -> Path:
    return cache_root() / "validations" / f"{key[:32]}.json"


def cached_validation(key: str) -> ParityReport | None:
    """The report measured for this key, marked as reused; None when there is none (or it no
    longer reads)."""
    path = _validation_path(key)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        report = ParityReport.read(data["report"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    report.reused = {"key": key[:32], "measured_at": data.get("measured_at")}
    report.notes = [*report.notes, f"validation reused: this bundle's model and runner files, "
                    "reference, bounds, installed runtime and CPU are those measured at "
                    f"{data.get('measured_at')} (phikit build --revalidate measures again)"]
    return report


def store_validation(key: str, report: ParityReport, measured_at: str) -> None:
    write_text_atomic(_validation_path(key),  # a reader sees the whole entry or none
                      json.dumps({"measured_at": measured_at, "report": report.to_json()}))
