"""Where phikit's own files are: one place, imported by every module that needs one."""

from __future__ import annotations

import sys
from pathlib import Path


def data_root(package_parent: Path, prefix: Path) -> Path:
    """A checkout (or editable install): the repository around the package. An installed
    wheel: <prefix>/share/phikit, where pyproject.toml's data-files put the same layout."""
    if (package_parent / "recipes").is_dir():
        return package_parent
    return prefix / "share" / "phikit"


REPO = data_root(Path(__file__).resolve().parent.parent, Path(sys.prefix))
TARGETS_DIR = REPO / "targets"
RECIPES_DIR = REPO / "recipes"
EVALSETS_DIR = REPO / "evalsets"
MODELS_DIR = REPO / "models"
