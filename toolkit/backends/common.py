"""What every backend module needs once: import checks, tool runs, version lists."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import subprocess
from pathlib import Path
from typing import Callable

from ..checkpoint import ModelInfo
from ..errors import PhikitError
from ..schema import Recipe, Target


class BackendDefaults:
    """Defaults for the facts every backend carries (backends/__init__.py's Protocol); a
    backend overrides what differs for it, so no other module names a backend."""

    revision = 1  # bump to rebuild cached conversions after a change of the backend's output
    demo_recipe: str | None = None  # recipes/<name>.yaml: the demo's recipe, if it needs its own
    off_device_precision = "int4"  # the demo's one precision where this CPU is not the device

    def matrix_form(self, info: ModelInfo, precision: str) -> tuple[dict, dict]:
        """(Quantization fields, Recipe fields) of this backend's usual recipe for `precision`:
        what a support-matrix cell asks support() about."""
        return {"precision": precision}, {}

    def host_notes(self, cpu: dict) -> list[str]:
        return []


def first_import_error(*modules: str) -> str | None:
    """None when all modules import, else why the first one does not."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            return f"{module} does not import: {e}"
    return None


def run_tool(cmd: list[str], log: Callable[[str], None], what: str, expect: Path,
             cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    """Run a converter, log its output, and fail with its last lines if it did not produce
    `expect` (a tool can exit 0 without writing anything)."""
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=cwd, env=env)
    log(proc.stdout)
    if proc.returncode != 0 or not expect.exists():
        tail = "\n".join(proc.stdout.strip().splitlines()[-5:])
        raise PhikitError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def versions(*dists: str) -> dict[str, str]:
    out = {}
    for dist in dists:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def describe_quantization(recipe: Recipe, target: Target) -> str:
    """The plan's line for backends that take the recipe's quantization fields as they are."""
    quant = recipe.quantization
    return (f"{quant.precision}, block {quant.block_size}, "
            f"{'symmetric' if quant.symmetric else 'asymmetric'}, provider "
            f"{target.execution_provider}")


def provider_runtime_options(target: Target) -> dict:
    """Runner options of backends whose runtime takes an execution provider (onnx, qnn): the
    target's threads and provider, then its raw runtime options."""
    return {"threads": target.runtime.threads, "execution_provider": target.execution_provider,
            **target.runtime.options}
