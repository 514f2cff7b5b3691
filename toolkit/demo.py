"""`phikit demo`: tiny-phi3 -> every target runnable here -> bundles -> validation -> answers."""

from __future__ import annotations

import time
from pathlib import Path

from rich.table import Table

from .build import RECIPES_DIR, execute, make_plan
from .doctor import usable_targets
from .package import bundle_size
from .runner.core import Sampling, chat_ids, open_bundle

PRECISIONS = ("int4", "int8", "fp32")
QUESTION = "What does json.dumps do?"


def demo_builds() -> list[tuple[str, str]]:
    """(recipe path, target name): every precision on each target that runs here."""
    builds = []
    for _, target, reason in usable_targets():
        if target is None or reason:
            continue
        for precision in PRECISIONS:
            if precision in target.precisions:
                builds.append((str(RECIPES_DIR / f"tiny-phi3-{precision}.yaml"), target.name))
    return builds


def answer(bundle: Path, question: str = QUESTION) -> tuple[str, float]:
    session, _ = open_bundle(bundle)
    ids = chat_ids(session, [{"role": "user", "content": question}])
    start, tokens = time.perf_counter(), list(session.generate(ids, Sampling(max_new_tokens=48)))
    seconds = time.perf_counter() - start
    return session.detokenize(tokens), len(tokens) / seconds if seconds else 0.0


def run_demo(out_dir: Path, out, console, progress_bars) -> int:
    table = Table(title="phikit demo: tiny-phi3", title_justify="left")
    for col in ("target", "backend", "precision", "size", "KLD mean", "top-1", "greedy match",
                "tok/s", "verdict"):
        table.add_column(col, justify="right" if col not in ("target", "backend") else "left")
    failures = 0
    for recipe, target in demo_builds():
        plan = make_plan(recipe, target, out=out_dir / f"{Path(recipe).stem}-{target}")
        console.print(f"[bold]{plan.recipe.name} -> {target}[/]")
        with progress_bars() as bars:
            result = execute(plan, progress=bars,
                             stage_cb=lambda s: console.print(f"  [cyan]> {s}[/]"))
        m = result.report["metrics"]
        rate = 0.0
        if result.passed:
            text, rate = answer(result.bundle)
            out.print(f"  [dim]{QUESTION}[/] -> {text.strip()[:200]!r}")
        else:
            failures += 1
        table.add_row(target, plan.backend.name, plan.recipe.quantization.precision,
                      f"{bundle_size(result.bundle) / 1e6:.1f} MB", f"{m['kld_mean']:.4f}",
                      f"{m['top1']:.3f}", f"{m['greedy_match_mean']:.1f}", f"{rate:.0f}",
                      "[green]pass[/]" if result.passed else "[red]FAIL[/]")
    out.print(table)
    return 1 if failures else 0
