"""`phikit init`: a commented recipe for one's own checkpoint, with the target backend's measured
default bounds written out; `phikit build --source X --precision P` builds from the same text
without a file.

Paths in the recipe are relative to the recipe's folder (the schema reads them so), so a recipe
committed to a repository builds on any machine that has the same layout. A checkpoint of
phikit's own fixtures gets their eval set; any other checkpoint gets phikit's real-text eval set
(`phikit:evalset-real.jsonl`: prose, code, chats, system turns, long context), which ships
inside the package and is found the same way everywhere."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from .backends import get_backend
from .errors import PhikitError
from .family import known_info
from .paths import EVALSETS_DIR, MODELS_DIR
from .schema import SHIPPED, Bounds, Target

FIXTURE_EVAL = EVALSETS_DIR / "tiny-phi3.jsonl"
REAL_EVAL = f"{SHIPPED}evalset-real.jsonl"
# a real checkpoint's eval reaches the real set's long-context rows (about 1,200 tokens with
# the chat template)
REAL_MAX_TOKENS = 1536


def recipe_name(source: str, precision: str) -> str:
    stem = Path(source.rstrip("/")).name or "model"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._").lower() or "model"
    return f"{name[:90]}-{precision}"


def is_fixture(source: str) -> bool:
    """One of phikit's own tiny models (models/), whose eval set and bounds fit it."""
    local = Path(source).expanduser()
    return local.is_dir() and local.resolve().is_relative_to(MODELS_DIR.resolve())


def _relative(path: Path, recipe_dir: Path | None) -> str:
    """path as the recipe should name it: relative to its folder, unless the two share nothing
    but the filesystem root (then no relative path would survive a move either)."""
    path = path.resolve()
    if recipe_dir is None:
        return str(path)
    base = recipe_dir.resolve()
    if os.path.commonpath([path, base]) == path.anchor:
        return str(path)
    return os.path.relpath(path, base)


def bounds_warning(source: str, backend: str, precision: str) -> str | None:
    """Why the written bounds may not fit this checkpoint, or None."""
    be = get_backend(backend)
    if is_fixture(source) or not be.default_thresholds(precision):
        return None
    return (f"the {be.name} {precision} bounds were measured on {be.honest_model}, not on this "
            "checkpoint: build once, read `phikit report`, then set them from what it measures")


def parse_bounds(items: list[str]) -> dict[str, float]:
    """--bound KEY=VALUE items: the bounds one accepts for one's own model."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in Bounds.model_fields:
            raise PhikitError(f"--bound {item}: expected KEY=VALUE with KEY one of "
                              f"{', '.join(Bounds.model_fields)}", field="--bound")
        try:
            out[key] = float(value)
        except ValueError:
            raise PhikitError(f"--bound {item}: {value!r} is not a number",
                              field="--bound") from None
    return out


def recipe_text(source: str, target: Target, precision: str, backend: str | None = None,
                name: str | None = None, recipe_dir: Path | None = None,
                bounds: dict[str, float] | None = None) -> str:
    """The recipe; with recipe_dir, local paths are written relative to it; `bounds` replace
    the backend's defaults where given."""
    own = bounds or {}
    be = get_backend(backend or target.backend)
    if precision not in target.precisions:
        raise PhikitError(f"precision {precision} is not allowed on target {target.name} "
                          f"(allowed: {', '.join(target.precisions)})", field="--precision")
    local = Path(source).expanduser()
    fixture = is_fixture(source)
    written = _relative(local, recipe_dir) if local.is_dir() else source
    defaults = be.default_thresholds(precision)
    bounds = {**defaults, **own}
    info = known_info(source)
    cap = be.max_context(info) if info is not None else None
    lines = [f"# Written by `phikit init` for {target.name} ({be.name}), "
             f"{time.strftime('%Y-%m-%d')}. docs/recipe.md names every field;",
             "# relative paths are read from this file's folder. Check it offline with",
             f"# `phikit build THIS_FILE --target {target.name} --dry-run`.",
             f"name: {name or recipe_name(source, precision)}",
             f"source: {written}  # a checkpoint directory, or a hub id (org/name)",
             *([f"# {be.name} serves this model as trained up to {cap} tokens",
                f"context_length: {cap}"] if cap else []),
             "quantization:", f"  precision: {precision}", "eval:"]
    if fixture:
        lines += ["  # the fixture's own eval set (texts, prompts, chats)",
                  f"  file: {_relative(FIXTURE_EVAL, recipe_dir)}", "  max_tokens: 128",
                  "  max_new_tokens: 32"]
    else:
        lines += ["  # phikit's real-text eval set (prose, code, chats, system turns, long",
                  "  # context). Better: rows like your traffic, as long as the bundle serves",
                  f"  file: {REAL_EVAL}",
                  f"  max_tokens: {min(REAL_MAX_TOKENS, cap or REAL_MAX_TOKENS)}",
                  "  max_new_tokens: 64"]
    if defaults:
        lines += [f"# {be.name} {precision} defaults: 2x the error its honest bundle of "
                  f"{be.honest_model} measures."]
        if own:
            lines += [f"# Yours (phikit init --bound): {', '.join(sorted(own))}."]
        if not fixture:
            lines += [f"# WARNING: measured on {be.honest_model}, not on this checkpoint. A real "
                      "model errs", "# differently: build once, read `phikit report`, then "
                      "set bounds from what it measures."]
        lines += ["thresholds:"] + [f"  {k}: {v}" for k, v in bounds.items()]
    else:
        lines += [f"# {be.name} has no measured default for {precision}: set bounds "
                  "(docs/parity.md)", "thresholds:"] + [
                      f"  {k}: {v}" for k, v in {"kld_mean_max": 0.05, "top1_min": 0.85,
                                                 **own}.items()]
    return "\n".join(lines) + "\n"
