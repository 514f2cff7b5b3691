"""onnxruntime-genai for Olive's ModelBuilder pass (the QNN backend), and how phikit gets it
without a checkout.

Olive 0.13's ModelBuilder imports onnxruntime_genai.models.quantized_model, which the builder the
ONNX backend pins no longer has. The older release (toolkit/data/olive-genai.pin, read here and
by the Makefile's olive-genai target) lives in a directory of its own that only the Olive
subprocess puts on its path. Looked up in order: PHIKIT_OLIVE_GENAI (a directory of one's own),
<venv>/share/phikit/olive-genai (`make install`), then the user cache, which `ensure()` fills
with `pip install --no-deps --target` (pip's own settings, such as PIP_INDEX_URL, apply).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from ..checkpoint import cache_root, fill_cache_dir
from ..errors import PhikitError
from ..installing import pip_error
from ..paths import read_pin

PACKAGE = "onnxruntime-genai"
# what Olive's pass imports: a directory without it is not the one Olive needs
NEEDED = Path("onnxruntime_genai") / "models" / "quantized_model.py"


def version() -> str:
    return read_pin("olive-genai.pin")["version"]


def candidates() -> list[Path]:
    if os.environ.get("PHIKIT_OLIVE_GENAI"):  # one's own directory: used as given
        return [Path(os.environ["PHIKIT_OLIVE_GENAI"])]
    return [Path(sys.prefix) / "share" / "phikit" / "olive-genai",
            cache_root() / "olive-genai" / version()]


def ready(path: Path) -> bool:
    return (path / NEEDED).is_file()


def found() -> Path | None:
    return next((p for p in candidates() if ready(p)), None)


def installed_version(path: Path) -> str | None:
    meta = next(path.glob("onnxruntime_genai-*.dist-info"), None)
    return meta.name.split("-")[1].removesuffix(".dist") if meta else None


def ensure(log: Callable[[str], None] = lambda s: None) -> Path:
    """The directory Olive's subprocess imports it from, installed into the user cache first
    when no candidate has it."""
    have = found()
    if have is not None:
        return have
    if os.environ.get("PHIKIT_OLIVE_GENAI"):
        raise PhikitError(f"PHIKIT_OLIVE_GENAI={candidates()[0]} has no {NEEDED}")
    requirement = f"{PACKAGE}=={version()}"

    def fill(staged: Path) -> None:
        log(f"installing {requirement} for Olive's ModelBuilder pass (pip install --target)")
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                               "--disable-pip-version-check", "--target", str(staged),
                               requirement], capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0 or not ready(staged):
            error = pip_error(proc.stderr or proc.stdout, f"pip installed no {NEEDED}")
            raise PhikitError(f"could not install {requirement} for Olive's ModelBuilder pass: "
                              f"{error} (offline: PHIKIT_OLIVE_GENAI=<a directory holding "
                              "it>, or PIP_FIND_LINKS=<a folder holding its wheel>)")

    dest = fill_cache_dir(candidates()[-1], "olive-genai-" + version(), ready, fill)
    log(f"Olive's onnxruntime-genai: {dest}")
    return dest
