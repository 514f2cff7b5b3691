"""Build-side backends: one module each, one small Protocol, one registry.

A backend answers: can it run here (`unavailable`), does it support this model x target x
precision (`support`), does a directory hold its artifact (`recognizes`), convert with the real
tool (`convert`), and which runner module + options the bundle uses (`runtime_module`,
`runtime_options`). Adding a backend = one module here + one in toolkit/runner + one line below; every fact about it
(home target, matrix recipe form, demo recipe, ...) is a member of its class, never an
`if name == ...` elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

from ..checkpoint import ModelInfo
from ..errors import PhikitError
from ..schema import OPTION_MODELS, BackendOptions, Recipe, Target


class Backend(Protocol):
    name: str
    runtime_module: str  # module in toolkit/runner that runs its artifacts
    tool: str  # the real converter it drives, for plans and doctor
    # True when the candidate must tokenize every row exactly as transformers does: its runner
    # uses the checkpoint's own tokenizer.json, or the backend wrote the tokenizer into its
    # format (GGUF); a row tokenized otherwise is a defect, and validation requires all rows.
    exact_tokenizer: bool
    home_target: str  # the target a user picks it for (support matrix, planted defects)
    # Defaults for the members below: common.BackendDefaults.
    revision: int  # part of the conversion cache key
    demo_recipe: str | None  # `phikit demo` builds this recipe for its targets, if set
    off_device_precision: str  # the demo's precision where this CPU is not the target's device
    options_model: type[BackendOptions]  # its quantization.options (schema), checked at load
    honest: dict  # precision -> common.Honest: what an honest bundle of it measures
    honest_numerics: dict  # name -> runtime options: numerics the runtime picks per CPU
    install: str  # what to install where unavailable() says no (default: its pip extra)
    # True when its converter writes the whole model in float to disk before quantizing it
    # (as large as the checkpoint): the disk a quantized conversion needs beyond its artifact
    float_intermediate: bool

    def default_thresholds(self, precision: str) -> dict[str, float]:
        """Bounds (Thresholds fields) for what a recipe leaves unset, from `honest`."""

    def artifact_facts(self, model_dir: Path):
        """artifact_checks.ArtifactFacts: what its files state (context, EOS, special tokens)
        and the chat templates a front end renders itself, for validation's static checks."""

    def default_block_size(self, precision: str, target: Target) -> int:
        """Weights per quantization block where the recipe leaves block_size unset."""

    def options(self, recipe: Recipe) -> BackendOptions:
        """The recipe's quantization.options.<name>, validated by options_model."""

    def matrix_form(self, info: ModelInfo, precision: str) -> tuple[dict, dict]:
        """(Quantization fields, Recipe fields) of the backend's usual recipe for a precision."""

    def unavailable(self) -> str | None:
        """None when the converter and runtime import here, else why not."""

    def max_context(self, info: ModelInfo) -> int | None:
        """The most tokens a bundle of this model can serve as trained, where the runtime caps
        it below the model's own window (None: no cap)."""

    def support(self, info: ModelInfo | None, target: Target, recipe: Recipe) -> str | None:
        """None when supported, else the reason (checked before any conversion)."""

    def recognizes(self, path: Path) -> bool:
        """Does this directory hold an artifact of this backend (made by phikit or by hand)?"""

    def convert(self, source: Path, out: Path, recipe: Recipe, target: Target,
                log: Callable[[str], None]) -> None:
        """Write the artifact into `out` (an empty directory) with the backend's own tool."""

    def describe(self, recipe: Recipe, target: Target, info: ModelInfo | None = None) -> str:
        """One plan line: what the tool will be asked to do with this recipe (and model, when
        its config is known: some defaults depend on it)."""

    def runtime_options(self, target: Target, recipe: Recipe) -> dict:
        """Options for the runner module (threads, execution provider, ...)."""

    def toolchain(self) -> dict[str, str]:
        """Versions of the tools that produced the artifact, for the manifest."""

    def host_notes(self, cpu: dict) -> list[str]:
        """What this host's CPU (runner.core.host_cpu()) changes for this backend's runtime:
        a protection or fallback in force, a precision the CPU cannot honour (phikit doctor)."""

    def host_option_notes(self, cpu: dict) -> list[str]:
        """What the runtime's host table decides on this CPU for options left at auto."""


def _registry() -> dict[str, Backend]:
    from . import gguf, mlx, onnx, openvino, qnn

    return {b.name: b for b in (onnx.BACKEND, openvino.BACKEND, mlx.BACKEND, gguf.BACKEND,
                                      qnn.BACKEND)}


BACKENDS: dict[str, Backend] = _registry()
OPTION_MODELS.update({name: b.options_model for name, b in BACKENDS.items()})


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise PhikitError(f"unknown backend {name!r} (known: {', '.join(sorted(BACKENDS))})",
                          field="backend") from None


def detect_backend(path: Path) -> Backend:
    for backend in BACKENDS.values():
        if backend.recognizes(path):
            return backend
    raise PhikitError("not a phikit bundle and no backend recognizes this directory "
                      "(expected e.g. genai_config.json for ONNX Runtime GenAI)", file=path)
