"""recipe + target -> plan -> convert -> validate -> package: make_plan, then execute's three
stages, each a function over typed data (Plan, Converted, ParityReport, BundleManifest).

Conversions are content-addressed (checkpoint digest, backend, quantization, provider, toolchain)
and cached, so a rebuild or a second bundle of the same artifact converts nothing. The bundle is
staged, validated from the staged files themselves (what is validated is what ships), and only
then moved into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .backends import BACKENDS, Backend, get_backend
from .backends.common import tool_scratch, with_block_size
from .checkpoint import (ModelInfo, cache_lock, cache_root, checkpoint_digest, checkpoint_files,
                         read_model_info, refuse_pickles, resolve_source)
from .errors import PhikitError
from .evalset import load_evalset
from .family import check_remote_code, known_info, needs_remote_code
from .lock import resolve_lock
from .manifest import (BundleManifest, ConversionSection, ParitySection, RuntimeSection,
                       SourceSection)
from .package import (check_replaceable, finish_manifest, now, publish, sign_manifest, staging_dir,
                      sweep_leftovers, write_archive, write_json, write_report_html, write_runner)
from .paths import RECIPES_DIR, named_files
from .remote import local_session
from .report.model import ParityReport
from .runner.reference_data import REFERENCE_FILE, save_reference
from .schema import PRECISION_BITS, Recipe, Target, load_recipe, load_target
from .validate import (Candidate, cached_validation, effective_thresholds, prepare_reference,
                       run_parity, store_validation, validation_key)



def find_target(ref: str) -> Path:
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    targets = named_files("targets")
    if ref not in targets:
        raise PhikitError(f"unknown target {ref!r} (known: {', '.join(targets)})",
                          field="--target")
    return targets[ref]


def find_recipe(ref: str) -> Path:
    path = Path(ref)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    return named_files("recipes").get(ref, RECIPES_DIR / f"{ref}.yaml")


@dataclass
class Plan:
    recipe: Recipe
    recipe_path: Path
    target: Target
    target_path: Path
    backend: Backend
    out: Path
    info: ModelInfo | None
    steps: list[str] = field(default_factory=list)
    force: bool = False  # replace `out` even when it is not a bundle (package.check_replaceable)

    @property
    def runtime_options(self) -> dict[str, Any]:
        """The options the bundle's runtime opens with: what is validated and what ships."""
        return self.backend.runtime_options(self.target, self.recipe)


def make_plan(recipe_ref: str, target_ref: str, *, backend: str | None = None,
              source: str | None = None, out: Path | None = None,
              trust_remote_code: bool = False, revision: str | None = None,
              force: bool = False) -> Plan:
    recipe_path = find_recipe(recipe_ref)
    recipe = load_recipe(recipe_path, source_override=source)
    if revision is not None:  # a hub branch, tag or commit over the recipe's own
        recipe = recipe.model_copy(update={"revision": revision})
    # First, before any other check or work: a checkpoint that would run remote code.
    info = known_info(recipe.source)
    check_remote_code(info, trust_remote_code, recipe.source)
    if Path(recipe.source).is_dir():  # a hub checkpoint is checked once it is found or fetched
        refuse_pickles(Path(recipe.source))
    recipe = recipe.model_copy(update={"trust_remote_code": trust_remote_code})
    load_evalset(recipe.eval.file, recipe.eval.limit)  # a malformed row: file:line now, offline
    target_path = find_target(target_ref)
    target = load_target(target_path, set(BACKENDS))
    name = backend or target.backend
    be = get_backend(name)
    if name not in target.allowed_backends():
        raise PhikitError(f"target {target.name} does not allow backend {name!r} "
                          f"(allowed: {', '.join(target.allowed_backends())})", field="--backend")
    recipe = with_block_size(recipe, be, target)
    quant = recipe.quantization
    if quant.precision not in target.precisions:
        raise PhikitError(f"precision {quant.precision} is not allowed on target {target.name} "
                          f"(allowed: {', '.join(target.precisions)})", file=recipe_path,
                          field="quantization.precision")
    check_buildable(be, info, recipe, target, recipe_path)
    # the bounds this build is held to, resolved once: what validate, the manifest and a later
    # re-validation (on the device too) all read
    recipe = recipe.model_copy(update={"thresholds": effective_thresholds(recipe, be)})
    out = out or Path("dist") / f"{recipe.name}-{target.name}"
    check_replaceable(out, force)  # before any work: what a build would delete is not a bundle
    model_desc = (f"{info.architecture}, {info.num_layers} layers, hidden {info.hidden_size}, "
                  f"vocab {info.vocab_size}" if info else "hub checkpoint (fetched at build time)")
    if info is not None and not recipe.source_is_local:
        model_desc += "; published config, re-checked after the download"
    if info is not None and info.architecture == "Phi3VForCausalLM":
        model_desc += "; text-only bundle: the image encoder is not converted"
    if trust_remote_code and info is not None and needs_remote_code(info):
        model_desc += "; REMOTE CODE trusted (--trust-remote-code)"
    steps = [
        f"source    {recipe.source} ({model_desc})",
        f"convert   {be.tool}: {be.describe(recipe, target, info)}",
        f"validate  {recipe.eval.file.name} (max {recipe.eval.max_tokens} tokens, "
        f"{recipe.eval.max_new_tokens} greedy) vs transformers {recipe.eval.reference_dtype}; "
        "thresholds "
        + ", ".join(f"{k}={v}" for k, v in recipe.thresholds.bounds().items()
                    if v is not None),
        f"package   {out} (runner: {be.runtime_module}, lock for {target.platform.os}/"
        f"{target.platform.arch} python {target.platform.python})",
    ]
    ungated = ungated_weight_metrics(recipe.thresholds)
    if ungated:
        steps.append(f"warning   {', '.join(ungated)} not gated: the recipe sets no bound and "
                     f"{be.name} has no measured default for {quant.precision} (set "
                     "thresholds in the recipe)")
    return Plan(recipe, recipe_path, target, target_path, be, out, info, steps, force)


WEIGHT_BOUNDS = ("kld_mean_max", "kld_p99_max", "top1_min")


def ungated_weight_metrics(thresholds) -> list[str]:
    """The weight-error metrics no bound holds (a bundle could pass with any value of them)."""
    return [f.rsplit("_", 1)[0] for f in WEIGHT_BOUNDS if getattr(thresholds, f) is None]


def check_buildable(be: Backend, info: ModelInfo | None, recipe: Recipe, target: Target,
                    recipe_path: Path) -> None:
    """The backend supports this model on this target and it fits the target's memory: at plan
    time from the config known then, and again from a hub checkpoint's own config once fetched
    (a published config can differ from the one downloaded)."""
    reason = be.support(info, target, recipe)
    if reason:
        raise PhikitError(f"{be.name} cannot build this for {target.name}: {reason}",
                          file=recipe_path)
    if info is not None and target.memory_budget_mb is not None:
        check_memory(info, recipe, target, recipe_path)


def check_memory(info: ModelInfo, recipe: Recipe, target: Target, recipe_path: Path) -> None:
    context = recipe.context_length or info.max_positions
    weights, kv = info.memory_estimate(PRECISION_BITS[recipe.quantization.precision], context,
                                       kv_bytes=4 if target.device == "cpu" else 2)
    need_mb = (weights + kv) / 2**20
    if need_mb > target.memory_budget_mb:
        raise PhikitError(
            f"the bundle needs about {need_mb:.0f} MB (weights {weights / 2**20:.0f} MB + KV "
            f"cache {kv / 2**20:.0f} MB at {context} tokens) but target {target.name}'s memory "
            f"budget is {target.memory_budget_mb} MB; lower context_length or precision",
            file=recipe_path, field="context_length")


def _on_disk(path: Path) -> Path:
    """The nearest existing directory at or above `path` (where it will be created)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def check_disk(plan: Plan, source_dir: Path, info: ModelInfo | None,
               artifact: Path | None) -> None:
    """Refuse up front what the disks cannot hold: a conversion that runs out of space fails
    after its longest step, with the tool's own error. `artifact`: the cached conversion, or
    None before converting (its size then estimated). Before converting, two moments hold the
    most: the conversion (the converter's float copy beside the model it writes) and
    packaging (the float copy removed, the bundle's copy of the model beside it)."""
    bits = PRECISION_BITS[plan.recipe.quantization.precision]
    bundle_copy = "the bundle's copy of the model"
    if artifact is None:
        model = info.memory_estimate(bits, 0)[0] if info else 0  # no config: not estimated
        float_copy = sum(f.stat().st_size for f in checkpoint_files(source_dir)) \
            if plan.backend.float_intermediate and bits < 16 else 0
        moments = [[(cache_root(), "the converter's float copy", float_copy),
                    (cache_root(), "the converted model", model)],
                   [(cache_root(), "the converted model", model),
                    (plan.out.parent, bundle_copy, model)]]
    else:
        model = sum(p.stat().st_size for p in (artifact / "model").rglob("*") if p.is_file())
        moments = [[(plan.out.parent, bundle_copy, model)]]
    for moment in moments:
        disks: dict[int, tuple[Path, list[tuple[str, int]]]] = {}
        for where, what, size in filter(lambda item: item[2], moment):
            place = _on_disk(where)
            disks.setdefault(place.stat().st_dev, (place, []))[1].append((what, size))
        for place, items in disks.values():
            need, free = sum(size for _, size in items), shutil.disk_usage(place).free
            if need > free:
                parts = " + ".join(f"{what} {_size(size)}" for what, size in items)
                raise PhikitError(
                    f"not enough free disk for {plan.backend.name} "
                    f"{plan.recipe.quantization.precision}: about {_size(need)} ({parts}) on "
                    f"the disk of {place}, which has {_size(free)} free; free some, or point "
                    "PHIKIT_CACHE (conversions) or --out (the bundle) at a larger disk")


def convert_cached(plan: Plan, source_dir: Path, digest: str, info: ModelInfo,
                   log: Callable[[str], None]) -> tuple[Path, bool]:
    """(artifact dir, was_cached). Converted into a temp dir and renamed when complete."""
    key_data = {"checkpoint": digest, "backend": plan.backend.name,
                "quantization": plan.recipe.quantization.model_dump(mode="json"),
                # a backend may write the context into its artifact (ONNX: genai_config.json)
                "context_length": plan.recipe.context_length,
                "provider": plan.target.execution_provider,
                "threads": plan.target.runtime.threads, "toolchain": plan.backend.toolchain(),
                # what the backend will ask its tool for, phikit's own defaults included
                "conversion": plan.backend.describe(plan.recipe, plan.target, info),
                "revision": plan.backend.revision}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()
    final = cache_root() / "artifacts" / key[:32]
    if final.is_dir():
        return final, True
    with cache_lock(f"artifact-{key[:32]}"):
        if final.is_dir():
            return final, True  # a concurrent build of the same artifact finished first
        final.parent.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(final.parent, "*.tmp")  # conversions killed mid-way
        check_disk(plan, source_dir, info, None)
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            with tool_scratch(tmp / "scratch"):
                plan.backend.convert(source_dir, tmp / "model", plan.recipe, plan.target, log)
            write_json(tmp / "conversion.json", key_data)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final, False


@dataclass(frozen=True)
class Converted:
    """What convert() hands on: the checkpoint the artifact came from, and the artifact."""
    source_dir: Path
    digest: str  # checkpoint_digest(source_dir)
    info: ModelInfo
    artifact: Path  # the conversion cache entry: artifact/model is what the bundle ships
    cached: bool  # found in the cache (nothing converted)


@dataclass
class BuildResult:
    bundle: Path
    report: ParityReport
    manifest: dict[str, Any]
    passed: bool
    seconds: dict[str, float]


def convert(plan: Plan, log: Callable[[str], None] = lambda s: None,
            stage_cb: Callable[[str], None] = lambda s: None) -> Converted:
    """The checkpoint found (or fetched) and converted by the backend's own tool, or the
    conversion found in the cache."""
    stage_cb("resolve source")
    source_dir = resolve_source(plan.recipe.source, plan.recipe.revision)
    info = plan.info
    if not plan.recipe.source_is_local:  # a hub checkpoint: check its own config now
        info = read_model_info(source_dir)
        check_remote_code(info, plan.recipe.trust_remote_code, plan.recipe.source)
        check_buildable(plan.backend, info, plan.recipe, plan.target, plan.recipe_path)
    digest = checkpoint_digest(source_dir)
    stage_cb("convert")
    artifact, cached = convert_cached(plan, source_dir, digest, info, log)
    if cached:  # else the conversion's check counted the bundle's copy
        check_disk(plan, source_dir, info, artifact)
    return Converted(source_dir, digest, info, artifact, cached)


def stage_files(plan: Plan, converted: Converted) -> Path:
    """A staging directory holding what the bundle ships besides what validation and packaging
    write: the model, the runner, the eval set, the recipe and the target."""
    stage = staging_dir(plan.out)
    try:
        shutil.copytree(converted.artifact / "model", stage / "model")
        write_runner(stage, plan.backend.runtime_module)
        (stage / "eval").mkdir()
        shutil.copy2(plan.recipe.eval.file, stage / "eval" / plan.recipe.eval.file.name)
        shutil.copy2(plan.recipe_path, stage / "recipe.yaml")
        shutil.copy2(plan.target_path, stage / "target.yaml")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return stage


def validate(plan: Plan, converted: Converted, stage: Path, *, revalidate: bool = False,
             progress=None) -> ParityReport:
    """The staged bundle (its own runner, in a child process: what ships is what is measured)
    against the transformers reference; a validation of the same files, options and reference
    is found in the cache unless `revalidate`."""
    options = plan.runtime_options
    reference = prepare_reference(plan.recipe, str(converted.source_dir), progress)  # before
    # the candidate; the reference travels: `run.py validate` re-measures parity on a device
    # without the checkpoint, with these very figures
    save_reference(stage / REFERENCE_FILE, reference.reference)
    key = validation_key(stage, plan.backend.runtime_module, options,
                         reference.reference.meta["key"],
                         plan.recipe.thresholds,  # made effective by make_plan
                         plan.recipe.eval.max_new_tokens,
                         plan.target.runtime.packages[plan.backend.name])
    with cache_lock(f"validation-{key[:32]}"):
        report = None if revalidate else cached_validation(key)
        if report is None:
            measured_at = now()
            session = local_session(plan.backend.runtime_module, stage / "model", options,
                                    runner=stage)
            try:
                report = run_parity(Candidate(session, plan.recipe, str(converted.source_dir),
                                              "bundle", backend=plan.backend,
                                              model_dir=stage / "model"),
                                    progress, reference)
            finally:
                session.close()
            store_validation(key, report, measured_at)
    return report


def bundle_manifest(plan: Plan, converted: Converted, report: ParityReport) -> BundleManifest:
    recipe = plan.recipe
    return BundleManifest(
        name=recipe.name, created=now(), recipe=recipe.model_dump(mode="json"),
        target=plan.target.model_dump(mode="json"), backend=plan.backend.name,
        model_dir="model", eval_file=f"eval/{recipe.eval.file.name}",
        reference_file=REFERENCE_FILE,
        runtime=RuntimeSection(module=plan.backend.runtime_module,
                               options=plan.runtime_options,
                               packages=plan.target.runtime.packages[plan.backend.name]),
        source=SourceSection(id=recipe.source if not recipe.source_is_local
                             else str(converted.source_dir), sha256=converted.digest,
                             architecture=converted.info.architecture),
        toolchain=plan.backend.toolchain(),
        conversion=ConversionSection(cached=converted.cached, tool=plan.backend.tool),
        parity=ParitySection(verdict=report.verdict, metrics=report.metrics.scalars(),
                             checks=[c.model_dump(mode="json") for c in report.checks]))


def package(plan: Plan, converted: Converted, stage: Path, report: ParityReport, *,
            with_wheels: bool = False, sign: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """The staged bundle completed (report, locks, manifest last, signature) and moved into
    place: (where it is, its manifest)."""
    write_json(stage / "parity.json", report.to_json())
    runtime = plan.target.runtime
    (stage / "requirements.lock").write_text(
        resolve_lock(runtime.packages[plan.backend.name], plan.target.platform,
                     stage / "wheels" if with_wheels else None, runtime.source_builds,
                     runtime.without_dependencies))
    for extra in runtime.extra_locks.get(plan.backend.name, []):
        (stage / extra.file).write_text(resolve_lock(
            extra.packages, extra.platform, without_dependencies=runtime.without_dependencies))
    typed = bundle_manifest(plan, converted, report)
    # the readable report ships too, hashed like every other file
    write_report_html(stage, report, typed.fields())
    manifest = finish_manifest(stage, typed)
    if sign is not None and report.passed:
        sign_manifest(stage, sign)
    return publish(stage, plan.out, report.passed, plan.force), manifest


def execute(plan: Plan, *, archive: bool = False, with_wheels: bool = False,
            sign: Path | None = None, revalidate: bool = False,
            log: Callable[[str], None] = lambda s: None,
            stage_cb: Callable[[str], None] = lambda s: None,
            progress=None) -> BuildResult:
    """convert -> validate -> package; a failure in any stage leaves no staged files behind."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    converted = convert(plan, log, stage_cb)
    timings["convert"] = time.perf_counter() - t0
    stage = stage_files(plan, converted)
    try:
        stage_cb("validate")
        t1 = time.perf_counter()
        report = validate(plan, converted, stage, revalidate=revalidate, progress=progress)
        timings["validate"] = time.perf_counter() - t1
        stage_cb("package")
        t2 = time.perf_counter()
        final, manifest = package(plan, converted, stage, report, with_wheels=with_wheels,
                                  sign=sign)
        timings["package"] = time.perf_counter() - t2
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if archive and report.passed:
        write_archive(final, final.with_name(final.name + ".tar.gz"))
    return BuildResult(final, report, manifest, report.passed, timings)
