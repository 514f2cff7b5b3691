"""No hand-written file (issue 19): `phikit init` writes a commented recipe that builds into a
passing bundle; `phikit build --source --precision` does the same without a file."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import TINY, phikit
from toolkit.backends import BACKENDS

pytestmark = pytest.mark.slow


def test_init_then_build(tmp_path):
    recipe = tmp_path / "mine.yaml"
    proc = phikit("init", "--source", TINY, "--target", "intel-cpu", "--output", recipe,
                  check=0)
    assert "next: phikit build" in proc.stdout
    data = yaml.safe_load(recipe.read_text())
    assert data["thresholds"] == BACKENDS["openvino"].default_thresholds("int4")
    assert "# openvino int4 defaults" in recipe.read_text()
    phikit("init", "--source", TINY, "--output", recipe, check=2)  # never overwritten silently
    phikit("build", recipe, "--target", "intel-cpu", "--out", tmp_path / "b", check=0,
           timeout=1800)
    assert json.loads((tmp_path / "b" / "parity.json").read_text())["verdict"] == "pass"


def test_build_without_a_recipe_file(tmp_path):
    phikit("build", "--source", TINY, "--precision", "int4", "--target", "generic-cpu",
           "--out", tmp_path / "b", check=0, timeout=1800)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["recipe"]["name"] == "tiny-phi3-int4" and manifest["parity"]["verdict"] == "pass"
    assert "Written by `phikit init`" in (tmp_path / "b" / "recipe.yaml").read_text()
    proc = phikit("build", "--source", TINY, "--precision", "fp16", "--target", "generic-cpu",
                  "--dry-run", check=2)
    assert "precision fp16 is not allowed on target generic-cpu" in proc.stderr
    assert "give a recipe, or --source and --precision" in phikit(
        "build", "--target", "generic-cpu", check=2).stderr
