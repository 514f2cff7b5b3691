"""`phikit doctor` and `phikit list`: what is usable here, and what ships."""

from __future__ import annotations

import platform
from pathlib import Path

from rich.table import Table

from .backends import BACKENDS
from .paths import RECIPES_DIR, TARGETS_DIR
from .errors import PhikitError
from .runner.core import host_cpu
from .schema import load_recipe, load_target


def host_matches(target) -> str | None:
    """None when this machine can run the target's runtime, else why not."""
    arch = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
    want = {"arm64": "aarch64"}.get(target.platform.arch, target.platform.arch)
    system = {"darwin": "macos"}.get(platform.system().lower(), platform.system().lower())
    if target.platform.os != system or want != arch:
        return f"runs on {target.platform.os}/{target.platform.arch}; this is {system}/{arch}"
    if target.device != "cpu":
        return f"needs a {target.device.upper()} ({target.execution_provider})"
    return None


def usable_targets() -> list[tuple[Path, object, str | None]]:
    """(path, target or None, reason it cannot run here or None)."""
    rows = []
    for path in sorted(TARGETS_DIR.glob("*.yaml")):
        try:
            target = load_target(path, set(BACKENDS))
        except PhikitError as e:
            rows.append((path, None, str(e)))
            continue
        reason = BACKENDS[target.backend].unavailable() or host_matches(target)
        rows.append((path, target, reason))
    return rows


def doctor_table() -> tuple[Table, bool]:
    table = Table(title="phikit doctor", title_justify="left")
    for col in ("kind", "name", "status", "why"):
        table.add_column(col)
    ok = True
    cpu = host_cpu()
    table.add_row("cpu", cpu["model"], cpu["class"],
                  f"{cpu['cores']} cores; " + (" ".join(cpu["features"]) or "no features of note"))
    for name, backend in sorted(BACKENDS.items()):
        reason = backend.unavailable()
        ok &= reason is None
        table.add_row("backend", name, "[green]usable[/]" if not reason else "[red]no[/]",
                      reason or backend.tool)
        if reason is None:
            for note in backend.host_notes(cpu):
                table.add_row("", "", "[cyan]on this CPU[/]", note)
    for path, target, reason in usable_targets():
        if target is None:
            ok = False
        table.add_row("target", path.stem, "[green]runs here[/]" if not reason else
                      "[yellow]build only[/]" if target else "[red]invalid[/]", reason or "")
    return table, ok


def list_tables() -> list[Table]:
    recipes = Table(title="recipes", title_justify="left")
    for col in ("name", "source", "precision", "file"):
        recipes.add_column(col)
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        try:
            r = load_recipe(path)
            recipes.add_row(r.name, r.source if not r.source_is_local else
                            Path(r.source).name, r.quantization.precision, path.name)
        except PhikitError as e:
            recipes.add_row(path.stem, f"[red]{e}[/]", "", path.name)
    targets = Table(title="targets", title_justify="left")
    for col in ("name", "device", "backends", "provider", "precisions", "platform"):
        targets.add_column(col)
    for path, t, reason in usable_targets():
        if t is None:
            targets.add_row(path.stem, f"[red]{reason}[/]", "", "", "", "")
            continue
        targets.add_row(t.name, t.device, ", ".join(t.allowed_backends()), t.execution_provider,
                        ", ".join(t.precisions), f"{t.platform.os}/{t.platform.arch}")
    return [recipes, targets]


def matrix_table() -> Table:
    from .family import matrix_rows, support_matrix

    header, rows, notes = matrix_rows(support_matrix())
    table = Table(title="support matrix († needs --trust-remote-code)", title_justify="left",
                  caption="\n".join(f"[{n}] {r}" for n, r in sorted(
                      notes.items(), key=lambda kv: int(kv[0]))), caption_justify="left")
    for col in header:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    return table
