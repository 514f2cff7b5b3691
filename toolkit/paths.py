"""Where phikit's own files are: one place, imported by every module that needs one."""

from __future__ import annotations

import os
import sys
from importlib.resources import files
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


def data_file(name: str) -> Path:
    """A file of toolkit/data, the package data a wheel carries (not a checkout's copy)."""
    return Path(str(files("toolkit") / "data" / name))


def read_pin(name: str) -> dict[str, str]:
    """A toolkit/data pin file's `key value` lines (comments and blank lines skipped): what the
    Makefile's awk reads from the same file."""
    return {k: v.strip() for k, v in (line.split(None, 1) for line in
            data_file(name).read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#"))}


# the versions verified together: `pip install -c CONSTRAINTS ...`, the lock step, the Makefile
CONSTRAINTS = data_file("constraints.txt")


def search_dirs(kind: str) -> list[Path]:
    """Where a recipe or target is found by name (kind: "recipes" or "targets"): each directory
    of PHIKIT_PATH (`phikit --path DIR`), as DIR/recipes and DIR/targets, before phikit's own.
    A user's file of the same name shadows the shipped one."""
    extra = [Path(p).expanduser() for p in os.environ.get("PHIKIT_PATH", "").split(os.pathsep)
             if p]
    return [d / kind for d in extra] + [REPO / kind]


def named_files(kind: str) -> dict[str, Path]:
    """name -> YAML file, the first found along search_dirs(kind)."""
    found: dict[str, Path] = {}
    for directory in search_dirs(kind):
        for path in sorted(directory.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return dict(sorted(found.items()))
