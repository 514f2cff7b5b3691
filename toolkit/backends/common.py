"""What every backend module needs once: import checks, tool runs, version lists."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import shutil
import subprocess
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..artifact_checks import ArtifactFacts, transformers_file_facts
from ..checkpoint import ModelInfo
from ..errors import PhikitError
from ..schema import BackendOptions, Recipe, Target


@dataclass(frozen=True)
class Honest:
    """What an honest bundle of this backend measures at one precision (the tiny-phi3 fixture,
    its recipe's eval set): the figures the default bounds are derived from (`bounds`)."""

    kld_mean: float
    kld_p99: float
    top1: float
    ppl_ratio: float
    greedy_match_mean: float
    # KLD's 99.9th percentile (llama.cpp's --kl-divergence "99.9% KLD"): the tail a few broken
    # positions in a thousand live in; None where not yet measured (no default bound then)
    kld_p999: float | None = None

    def worst(self, *others: "Honest") -> "Honest":
        """The largest error of these measurements, figure by figure: a bundle's bounds must
        hold on every CPU it may run on, and a runtime computes differently per CPU."""
        every = (self, *others)
        return Honest(kld_mean=max(h.kld_mean for h in every),
                      kld_p99=max(h.kld_p99 for h in every),
                      top1=min(h.top1 for h in every),
                      ppl_ratio=max((h.ppl_ratio for h in every), key=lambda r: abs(r - 1)),
                      greedy_match_mean=min(h.greedy_match_mean for h in every),
                      kld_p999=max((h.kld_p999 for h in every if h.kld_p999 is not None),
                                   default=None))

    # Each default bound allows BOUND_MARGIN times the honest error, and never less than the
    # floor: run-to-run and CPU-to-CPU kernel differences, not quantization, below it.
    def bounds(self) -> dict[str, float]:
        m = BOUND_MARGIN
        return {"kld_mean_max": _sig(max(m * self.kld_mean, 1e-5)),
                "kld_p99_max": _sig(max(m * self.kld_p99, 1e-4)),
                "top1_min": round(1 - max(m * (1 - self.top1), 1e-3), 4),
                "ppl_ratio_max": round(1 + max(m * abs(self.ppl_ratio - 1), 5e-3), 4),
                "greedy_match_mean_min": _sig(self.greedy_match_mean / m),
                **({} if self.kld_p999 is None else
                   {"kld_p999_max": _sig(max(m * self.kld_p999, 1e-3))})}


BOUND_MARGIN = 2.0


def _sig(x: float) -> float:
    return float(f"{x:.3g}")


class BackendDefaults:
    """Defaults for the facts every backend carries (backends/__init__.py's Protocol); a
    backend overrides what differs for it, so no other module names a backend."""

    revision = 1  # bump to rebuild cached conversions after a change of the backend's output
    demo_recipe: str | None = None  # recipes/<name>.yaml: the demo's recipe, if it needs its own
    off_device_precision = "int4"  # the demo's one precision where this CPU is not the device
    options_model: type[BackendOptions] = BackendOptions  # no options unless a backend has some
    # precision -> what an honest bundle measures (bench/honest_bounds.py prints these); a
    # precision without an entry has no default bounds: the recipe's own only
    honest: dict[str, Honest] = {}
    # the checkpoint `honest` was measured on: `phikit init` warns when a recipe's model is another
    honest_model = "tiny-phi3"
    float_intermediate = False
    # name -> runtime options: the numerics the runtime may choose by itself on some CPU (the
    # `honest` figures are the worst of them; bench/honest_bounds.py validates under each)
    honest_numerics: dict[str, dict] = {}

    def max_context(self, info) -> int | None:
        return None

    def default_thresholds(self, precision: str) -> dict[str, float]:
        """Bounds for what a recipe leaves unset, from this backend's honest measurements."""
        honest = self.honest.get(precision)
        return honest.bounds() if honest else {}

    def artifact_facts(self, model_dir: Path) -> ArtifactFacts:
        """What the artifact's files state about context, EOS and special tokens, and the chat
        templates a front end renders by itself (toolkit/artifact_checks.py compares them with
        the reference): the transformers-format files, where the backend ships them."""
        return transformers_file_facts(model_dir)

    def default_block_size(self, precision: str, target: Target) -> int:
        """Weights per quantization block where the recipe leaves block_size unset: 32, what
        every backend's tool accepts (llama.cpp's Q4_0 / Q8_0 are blocks of 32 by format)."""
        return 32

    def options(self, recipe: Recipe) -> BackendOptions:
        return self.options_model.read(recipe.quantization.options.get(self.name, {}),
                                       f"quantization.options.{self.name}")

    def matrix_form(self, info: ModelInfo, precision: str) -> tuple[dict, dict]:
        """(Quantization fields, Recipe fields) of this backend's usual recipe for `precision`:
        what a support-matrix cell asks support() about."""
        return {"precision": precision}, {}

    def host_notes(self, cpu: dict) -> list[str]:
        return []

    def host_option_notes(self, cpu: dict) -> list[str]:
        """What each option of the runtime module's host table (HOST_TABLE) becomes on this CPU
        when left at auto, and why (phikit doctor). Imports the runtime."""
        from ..runner.core import BundleError, host_table  # noqa: PLC0415
        from ..runner.host import describe_choices  # noqa: PLC0415

        try:
            return describe_choices(host_table(self.runtime_module), cpu)
        except BundleError:  # the runtime is not installed here
            return []

    @property
    def install(self) -> str:
        """What to install where unavailable() says no (doctor, demo --target)."""
        from ..installing import pip_install_hint  # noqa: PLC0415

        return pip_install_hint(f"phikit[{self.name}]")


def first_import_error(*modules: str) -> str | None:
    """None when all modules import, else why the first one does not."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            return f"{module} does not import: {e}"
    return None


QUIET = Path(__file__).resolve().parent / "quiet"  # a stand-in openvino_telemetry that refuses


def quiet_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A converter's environment with the runtimes' telemetry off (runner/core.py's
    quiet_runtimes, for a child process): ORT_DISABLE_TELEMETRY, and QUIET first on PYTHONPATH."""
    env = dict(os.environ if env is None else env)
    env.setdefault("ORT_DISABLE_TELEMETRY", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(QUIET), env.get("PYTHONPATH")) if p)
    return env


_SCRATCH: ContextVar[Path | None] = ContextVar("tool_scratch", default=None)


@contextmanager
def tool_scratch(path: Path) -> Iterator[Path]:
    """The converters run meanwhile keep their own temporary files under `path` (their TMPDIR),
    removed on the way out. optimum-intel's float IR is as large as the checkpoint: in the
    system's temp dir, a conversion killed mid-way would leave it there for good; under the
    conversion's own work dir, the next build sweeps it with the rest."""
    path.mkdir(parents=True, exist_ok=True)
    token = _SCRATCH.set(path)
    try:
        yield path
    finally:
        _SCRATCH.reset(token)
        shutil.rmtree(path, ignore_errors=True)


def run_tool(cmd: list[str], log: Callable[[str], None], what: str, expect: Path,
             cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    """Run a converter, log its output, and fail with its last lines if it did not produce
    `expect` (a tool can exit 0 without writing anything)."""
    log("$ " + " ".join(cmd))
    lines: list[str] = []
    env = quiet_env(env)
    if (scratch := _SCRATCH.get()) is not None:
        env["TMPDIR"] = str(scratch)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", cwd=cwd, env=env)
    except OSError as e:
        raise PhikitError(f"{what}: cannot run {cmd[0]}: {e.strerror}") from None
    with proc:
        for line in proc.stdout:  # as the tool writes it: `build --verbose` shows it live
            lines.append(line.rstrip("\n"))
            log(lines[-1])
    if proc.returncode != 0 or not expect.exists():
        tail = "\n".join([ln for ln in lines if ln.strip()][-5:])
        hints = [hint for marker, hint in KNOWN_FAILURES if any(marker in ln for ln in lines)]
        raise PhikitError(f"{what} failed (exit {proc.returncode}):\n{tail}"
                          + "".join(f"\nhint: {h}" for h in hints))


# A line in a converter's output -> what the user does about it (environment problems that
# otherwise surface as an unrelated import error deep inside the tool)
KNOWN_FAILURES = (
    ("torchvision::nms does not exist",
     "torchvision does not match the installed torch (optimum-intel pulls PyPI's CUDA-built "
     "torchvision beside torch's CPU wheel, and transformers imports it): `pip uninstall "
     "torchvision` (phikit does not use it), or install the matching one from PyTorch's CPU "
     "index"),
)


def versions(*dists: str) -> dict[str, str]:
    out = {}
    for dist in dists:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def with_block_size(recipe: Recipe, backend, target: Target) -> Recipe:
    """The recipe with the backend's block size for the target where the recipe leaves it
    unset: resolved once, before support checks, so what is checked, converted, keyed in the
    conversion cache and recorded in the manifest is one number."""
    quant = recipe.quantization
    if quant.block_size is not None:
        return recipe
    size = backend.default_block_size(quant.precision, target)
    return recipe.model_copy(update={"quantization": quant.model_copy(
        update={"block_size": size})})


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
