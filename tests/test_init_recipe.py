"""`phikit init` for one's own checkpoint (issue 40): paths relative to the recipe, so the folder
builds wherever it is copied; a real checkpoint gets phikit's shipped real-text eval set and a
warning that the default bounds were measured on the tiny fixture. All offline (--dry-run)."""

from __future__ import annotations

import shutil

import yaml

from conftest import REPO, TINY, phikit
from toolkit.evalset import load_evalset
from toolkit.paths import data_file


def own_checkpoint(root):
    """A checkpoint outside phikit's models/: to phikit, a real model (the tiny one's files)."""
    ck = root / "checkpoints" / "my-phi3"
    shutil.copytree(TINY, ck)
    return ck


def test_the_recipe_names_paths_relative_to_itself_and_moves_with_its_folder(tmp_path):
    project = tmp_path / "project"
    own_checkpoint(project)
    recipe = project / "recipes" / "mine.yaml"
    phikit("init", "--source", project / "checkpoints" / "my-phi3", "--target", "raspberry-pi",
           "--output", recipe, check=0)
    data = yaml.safe_load(recipe.read_text())
    assert data["source"] == "../checkpoints/my-phi3"
    assert str(tmp_path) not in recipe.read_text()  # nothing machine-specific
    moved = tmp_path / "elsewhere"
    shutil.move(project, moved)
    plan = phikit("build", moved / "recipes" / "mine.yaml", "--target", "raspberry-pi",
                  "--dry-run", check=0).stdout
    assert str(moved / "checkpoints" / "my-phi3") in plan  # read from the moved folder


def test_a_real_checkpoint_gets_the_real_eval_set_and_a_bounds_warning(tmp_path):
    ck = own_checkpoint(tmp_path)
    recipe = tmp_path / "r.yaml"
    proc = phikit("init", "--source", ck, "--target", "generic-cpu", "--output", recipe,
                  check=0)
    text = recipe.read_text()
    assert yaml.safe_load(text)["eval"]["file"] == "phikit:evalset-real.jsonl"
    assert "measured on tiny-phi3" in " ".join(proc.stderr.split())
    assert "WARNING: measured on tiny-phi3" in text
    plan = phikit("build", recipe, "--target", "generic-cpu", "--dry-run", check=0).stdout
    assert "validate  evalset-real.jsonl" in plan  # what validation will read


def test_a_fixture_keeps_its_own_eval_set_and_no_warning(tmp_path):
    recipe = REPO / "recipes" / f"zz-init-test-{tmp_path.name}.yaml"
    try:
        proc = phikit("init", "--source", TINY, "--output", recipe, check=0)
        data = yaml.safe_load(recipe.read_text())
        assert data["source"] == "../models/tiny-phi3"
        assert data["eval"]["file"] == "../evalsets/tiny-phi3.jsonl"
        assert "warning" not in proc.stderr.lower()
    finally:
        recipe.unlink(missing_ok=True)


def test_the_shipped_real_eval_set_covers_chat_code_long_context_and_system_turns():
    evalset = load_evalset(data_file("evalset-real.jsonl"))
    rows = evalset.rows
    assert len(rows) >= 30
    kinds = {r.kind for r in rows}
    assert kinds == {"text", "prompt", "messages"}
    chats = [r for r in rows if r.kind == "messages"]
    assert sum(any(role == "system" for role, _ in r.value) for r in chats) >= 5
    assert sum(len(r.value) > 2 for r in chats) >= 2  # multi-turn
    assert sum(r.id.startswith("text:code-") for r in rows) >= 5
    longest = max(len(r.value) if r.kind == "text" else sum(len(c) for _, c in r.value)
                  for r in rows if r.kind != "prompt")
    assert longest > 5000  # characters: a long-context row well past one short turn


def test_a_missing_shipped_file_is_one_error_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: x\nsource: {TINY}\nquantization:\n  precision: int4\n"
                      "eval:\n  file: phikit:no-such.jsonl\n")
    proc = phikit("build", recipe, "--target", "generic-cpu", "--dry-run", check=2)
    assert "file not found" in proc.stderr and "eval.file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_runtime_that_caps_the_context_gets_it_written(tmp_path):
    """llama.cpp serves Phi-3 as trained only within its sliding window: the recipe init writes
    for ollama says so, and plans (where the uncapped one is refused)."""
    ck = own_checkpoint(tmp_path)
    recipe = tmp_path / "r.yaml"
    phikit("init", "--source", ck, "--target", "ollama", "--output", recipe, check=0)
    data = yaml.safe_load(recipe.read_text())
    assert data["context_length"] == 2048 and data["eval"]["max_tokens"] <= 2048
    phikit("build", recipe, "--target", "ollama", "--dry-run", check=0)
    recipe.write_text(recipe.read_text().replace("context_length: 2048\n", ""))
    assert "serves at most 2048" in phikit("build", recipe, "--target", "ollama", "--dry-run",
                                          check=2).stderr


def test_bounds_of_ones_own_replace_the_defaults(tmp_path):
    ck = own_checkpoint(tmp_path)
    recipe = tmp_path / "r.yaml"
    phikit("init", "--source", ck, "--output", recipe, "--bound", "ppl_ratio_max=1.02", check=0)
    assert yaml.safe_load(recipe.read_text())["thresholds"]["ppl_ratio_max"] == 1.02
    plan = phikit("build", recipe, "--target", "generic-cpu", "--dry-run", check=0).stdout
    assert "ppl_ratio_max=1.02" in plan  # what validation will hold the bundle to
    bad = phikit("init", "--source", ck, "--output", tmp_path / "x.yaml", "--bound", "ppl=2",
                 check=2)
    assert "--bound ppl=2" in bad.stderr and "Traceback" not in bad.stderr
