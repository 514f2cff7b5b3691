"""`phikit demo`: tiny-phi3 -> every target -> bundles -> validation -> answers.

Targets whose device this machine is (generic-cpu, intel-cpu) get every precision. The others
are built and validated with the same runtime on this machine's CPU where it runs here (intel-gpu:
the same OpenVINO IR on CPU; apple-metal: MLX's Linux CPU backend; raspberry-pi: the aarch64
bundle's model on the x86 runtime; nvidia-cuda: the CUDA graph on the CPU execution provider;
qualcomm-npu: its W8A16 recipe on Qualcomm's HTP simulator), one precision each, and the table
says where each was measured.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

from rich.markup import escape
from rich.table import Table

from .backends import BACKENDS
from .build import execute, make_plan
from .doctor import usable_targets
from .errors import PhikitError
from .paths import RECIPES_DIR
from .package import bundle_size
from .remote import RuntimeCrashed, bundle_session
from .runner.core import Sampling, chat_ids, host_cpu

PRECISIONS = ("int4", "int8", "fp32")
QUESTION = "What does json.dumps do?"


class DemoBuild(NamedTuple):
    recipe: str
    target: str
    where: str        # where its figures are measured, for the table
    on_device: bool   # this machine is the target's device: its failure is the demo's failure


def demo_builds(only: list[str] | None = None) -> list[DemoBuild]:
    """Every target whose backend runs here (`only`: those targets, each of which must be one
    of them), at the precisions the demo builds for it."""
    builds = []
    cpu = host_cpu()
    rows = usable_targets()
    if only:
        known = {t.name: (t, reason) for _, t, reason in rows if t is not None}
        for name in only:
            if name not in known:
                raise PhikitError(f"unknown target {name!r} (known: {', '.join(sorted(known))})",
                                  field="--target")
            backend = BACKENDS[known[name][0].backend]
            if backend.unavailable():
                raise PhikitError(f"target {name}'s backend {backend.name} is not usable here: "
                                  f"{backend.unavailable()}; install: {backend.install} "
                                  "(phikit doctor lists every backend)", field="--target")
        rows = [row for row in rows if row[1] is not None and row[1].name in only]
    for _, target, reason in rows:
        backend = BACKENDS[target.backend] if target is not None else None
        if backend is None or backend.unavailable():
            continue
        if backend.demo_recipe:  # a target that needs a recipe of its own (the NPU's W8A16)
            where = (backend.host_notes(cpu) or ["this CPU"])[0]
            builds.append(DemoBuild(str(RECIPES_DIR / f"{backend.demo_recipe}.yaml"),
                                    target.name, where, on_device=False))
            continue
        if reason is None:
            precisions, where = [p for p in PRECISIONS if p in target.precisions], "this CPU"
        else:
            wanted = backend.off_device_precision
            precisions = [wanted] if wanted in target.precisions else target.precisions[:1]
            where = (f"this CPU, not the target's {target.platform.os}/{target.platform.arch} "
                     f"{target.device}")
        builds += [DemoBuild(str(RECIPES_DIR / f"tiny-phi3-{p}.yaml"), target.name, where,
                             on_device=reason is None) for p in precisions]
    return builds


def answer(bundle: Path, manifest: dict, question: str = QUESTION) -> tuple[str, float]:
    """The bundle's answer through its own runner, in a child process like validation's (the
    build has just hashed every file: the child does not again)."""
    session = bundle_session(bundle, manifest)
    try:
        ids = chat_ids(session, [{"role": "user", "content": question}])
        start = time.perf_counter()
        tokens = list(session.generate(ids, Sampling(max_new_tokens=48)))
        seconds = time.perf_counter() - start
        return session.detokenize(tokens), len(tokens) / seconds if seconds else 0.0
    finally:
        session.close()


def run_demo(out_dir: Path, out, console, progress_bars, only: list[str] | None = None) -> int:
    table = Table(title="phikit demo: tiny-phi3", title_justify="left")
    for col in ("target", "backend", "precision", "size", "KLD mean", "top-1", "greedy match",
                "tok/s", "verdict", "measured on"):
        table.add_column(col, justify="left" if col in ("target", "backend", "measured on")
                         else "right")
    failures = 0
    for recipe, target, where, on_device in demo_builds(only):
        plan = make_plan(recipe, target)
        plan.out = out_dir / f"{Path(recipe).stem}-{plan.target.name}"
        console.print(f"[bold]{plan.recipe.name} -> {plan.target.name}[/]")
        try:
            with progress_bars("  ") as bars:
                result = execute(plan, progress=bars, stage_cb=bars.stage)
            text, rate = answer(result.bundle, result.manifest) if result.passed else ("", 0.0)
        except PhikitError as e:
            # one target's runtime crashing (or refusing) is that row's result, not the demo's
            # end; it fails the demo where this machine is the target's device (a bundle for it
            # would fail the same way there), and is reported only where it is a stand-in
            failures += on_device
            verdict = "[red]CRASHED[/]" if isinstance(e, RuntimeCrashed) else "[red]ERROR[/]"
            out.print(f"  [red]{escape(str(e))}[/]")
            out.print(f"  [yellow]{escape(what_to_do(plan, on_device))}[/]")
            table.add_row(plan.target.name, plan.backend.name,
                          plan.recipe.quantization.precision, "-", "-", "-", "-", "-", verdict,
                          where)
            continue
        m = result.report.metrics
        if result.passed:
            out.print(f"  [dim]{QUESTION}[/] -> {escape(repr(text.strip()[:200]))}")
        else:
            failures += 1
        table.add_row(plan.target.name, plan.backend.name, plan.recipe.quantization.precision,
                      f"{bundle_size(result.bundle) / 1e6:.1f} MB", f"{m.kld_mean:.4f}",
                      f"{m.top1:.3f}", f"{m.greedy_match_mean:.1f}", f"{rate:.0f}",
                      "[green]pass[/]" if result.passed else "[red]FAIL[/]",
                      where + (f" (measured {result.report.reused['measured_at']})"
                               if result.report.reused else ""))
    out.print(table)
    return 1 if failures else 0


def what_to_do(plan, on_device: bool) -> str:
    """The next step for a user whose demo row crashed or was refused."""
    again = f"phikit build {plan.recipe_path} --target {plan.target.name}"
    if not on_device:
        return (f"{plan.target.name} is measured here on a stand-in for its device, so this row "
                f"does not fail the demo; on the device itself, run `{again}` there")
    return (f"this machine is a {plan.target.name} device, so the demo fails: `{again}` repeats "
            "this row alone; a runtime option in a copy of the target's `runtime.options` "
            "(a known issue above names the one that avoids it) tries it another way; "
            "`phikit doctor` shows what this CPU and its runtimes support")
