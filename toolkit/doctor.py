"""`phikit doctor` and `phikit list`: what is usable here, and what ships."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from rich.table import Table
from rich.text import Text

from .backends import BACKENDS
from .paths import named_files
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
    for path in named_files("targets").values():
        try:
            target = load_target(path, set(BACKENDS))
        except PhikitError as e:
            rows.append((path, None, str(e)))
            continue
        reason = BACKENDS[target.backend].unavailable() or host_matches(target)
        rows.append((path, target, reason))
    return rows


# cells are Text: Rich would read an install hint's "[gguf]" as markup and drop it
USABLE = Text("usable", "green")
# pastes as it is: PyPI's default torch is the CUDA build
TORCH_HINT = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"


def torch_status() -> tuple[bool, Text, str]:
    """(ok, status, why) of the torch every reference and converter imports: present, which
    build, and whether a torchvision beside it imports (transformers imports one that is there,
    and PyPI's CUDA-built torchvision breaks every import of a model with torch's CPU wheel)."""
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return False, Text("no", "red"), TORCH_HINT
    build = "CUDA build" if "+cu" in torch else "CPU build" if "+cpu" in torch else "PyPI build"
    try:
        vision = metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        return True, USABLE, f"torch {torch} ({build})"
    proc = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True,
                          text=True, timeout=120)
    if proc.returncode != 0:
        return False, Text("broken", "red"), (
            f"torchvision {vision} does not import with torch {torch} ({build}): transformers "
            "imports it, so no model loads; `pip uninstall torchvision` (phikit does not use "
            "it) or install the matching build")
    return True, USABLE, f"torch {torch} ({build}), torchvision {vision}"


def doctor_table() -> tuple[Table, bool]:
    table = Table(title="phikit doctor", title_justify="left")
    for col in ("kind", "name", "status", "why"):
        table.add_column(col)
    ok = True
    cpu = host_cpu()
    table.add_row("cpu", Text(cpu["model"]), cpu["class"],
                  f"{cpu['cores']} cores; " + (" ".join(cpu["features"]) or "no features of note"))
    torch_ok, status, why = torch_status()
    ok &= torch_ok
    table.add_row("python", "torch", status, Text(why))
    for name, backend in sorted(BACKENDS.items()):
        reason = backend.unavailable()
        ok &= reason is None
        table.add_row("backend", name, USABLE if not reason else Text("no", "red"),
                      Text(f"{reason}; install: {backend.install}" if reason else backend.tool))
        if reason is None:
            for note in [*backend.host_notes(cpu), *backend.host_option_notes(cpu)]:
                table.add_row("", "", Text("on this CPU", "cyan"), Text(note))
    for path, target, reason in usable_targets():
        if target is None:
            ok = False
        table.add_row("target", path.stem, Text("runs here", "green") if not reason else
                      Text("build only", "yellow") if target else Text("invalid", "red"),
                      Text(reason or ""))
    return table, ok


def list_tables() -> list[Table]:
    recipes = Table(title="recipes", title_justify="left")
    for col in ("name", "source", "precision", "file"):
        recipes.add_column(col)
    for path in named_files("recipes").values():
        try:
            r = load_recipe(path)
            recipes.add_row(r.name, r.source if not r.source_is_local else
                            Path(r.source).name, r.quantization.precision, path.name)
        except PhikitError as e:
            recipes.add_row(path.stem, Text(str(e), "red"), "", path.name)
    targets = Table(title="targets", title_justify="left")
    for col in ("name", "device", "backends", "provider", "precisions", "platform"):
        targets.add_column(col)
    for path, t, reason in usable_targets():
        if t is None:
            targets.add_row(path.stem, Text(str(reason), "red"), "", "", "", "")
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
