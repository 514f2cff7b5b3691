"""`phikit init`: a commented recipe for one's own checkpoint, with the target backend's measured
default bounds written out; `phikit build --source X --precision P` builds from the same text
without a file."""

from __future__ import annotations

import re
import time
from pathlib import Path

from .backends import get_backend
from .errors import PhikitError
from .paths import EVALSETS_DIR
from .schema import Target

DEFAULT_EVAL = EVALSETS_DIR / "tiny-phi3.jsonl"  # texts, prompts and chats; replace it


def recipe_name(source: str, precision: str) -> str:
    stem = Path(source.rstrip("/")).name or "model"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._").lower() or "model"
    return f"{name[:90]}-{precision}"


def recipe_text(source: str, target: Target, precision: str, backend: str | None = None,
                name: str | None = None) -> str:
    be = get_backend(backend or target.backend)
    if precision not in target.precisions:
        raise PhikitError(f"precision {precision} is not allowed on target {target.name} "
                          f"(allowed: {', '.join(target.precisions)})", field="--precision")
    local = Path(source).expanduser()
    source = str(local.resolve()) if local.is_dir() else source
    bounds = be.default_thresholds(precision)
    lines = [f"# Written by `phikit init` for {target.name} ({be.name}), "
             f"{time.strftime('%Y-%m-%d')}. docs/recipe.md names every field;",
             f"# `phikit build THIS_FILE --target {target.name} --dry-run` checks it offline.",
             f"name: {name or recipe_name(source, precision)}",
             f"source: {source}  # a checkpoint directory, or a hub id (org/name)",
             "quantization:", f"  precision: {precision}",
             "eval:",
             "  # phikit's small default eval set (texts, prompts, chats): replace it with rows",
             "  # like your traffic, reaching as far as the bundle will serve (docs/recipe.md)",
             f"  file: {DEFAULT_EVAL}", "  max_tokens: 128", "  max_new_tokens: 32"]
    if bounds:
        lines += [f"# {be.name} {precision} defaults: 2x the error its honest bundle of phikit's "
                  "tiny fixture", "# measures. A real checkpoint errs differently: build once, "
                  "read `phikit report`,", "# then set bounds from what it measures.",
                  "thresholds:"] + [f"  {k}: {v}" for k, v in bounds.items()]
    else:
        lines += [f"# {be.name} has no measured default for {precision}: set bounds (README, "
                  "Thresholds)", "thresholds:", "  kld_mean_max: 0.05", "  top1_min: 0.85"]
    return "\n".join(lines) + "\n"
