"""Where phikit's own files are: one place, imported by every module that needs one."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGETS_DIR = REPO / "targets"
RECIPES_DIR = REPO / "recipes"
EVALSETS_DIR = REPO / "evalsets"
MODELS_DIR = REPO / "models"
