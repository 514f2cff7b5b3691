"""Recipe / target files: valid ones load, bad ones give one clear file:line:field message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO, phikit
from toolkit.backends import BACKENDS
from toolkit.errors import PhikitError
from toolkit.schema import load_recipe, load_target

GOOD = (REPO / "recipes" / "tiny-phi3-int4.yaml").read_text()


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    # Relative paths in the recipe point at the repo's model and eval set.
    (tmp_path / "models").mkdir(exist_ok=True)
    return path


def recipe_text(**replace: str) -> str:
    text = GOOD.replace("../models/tiny-phi3", str(REPO / "models" / "tiny-phi3")).replace(
        "../evalsets/", str(REPO / "evalsets") + "/")
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_load(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe.eval.file.is_file()


@pytest.mark.parametrize("path", sorted((REPO / "targets").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_targets_load(path):
    target = load_target(path, set(BACKENDS))
    assert target.name == path.stem
    assert target.backend in BACKENDS


def test_unknown_key_names_file_line_and_field(tmp_path):
    path = write(tmp_path, recipe_text(**{"  symmetric: true": "  symmetric: true\n  symetric: 1"}))
    with pytest.raises(PhikitError) as e:
        load_recipe(path)
    line = path.read_text().splitlines().index("  symetric: 1") + 1
    assert str(e.value).startswith(f"{path}:{line}: field 'quantization.symetric': unknown field")


def test_typo_in_precision(tmp_path):
    path = write(tmp_path, recipe_text(**{"precision: int4": "precision: int3"}))
    with pytest.raises(PhikitError) as e:
        load_recipe(path)
    line = path.read_text().splitlines().index("  precision: int3") + 1
    assert f"{path}:{line}:" in str(e.value)
    assert "quantization.precision" in str(e.value) and "'int3'" in str(e.value)


def test_missing_eval_file(tmp_path):
    path = write(tmp_path, recipe_text(**{"tiny-phi3.jsonl": "nope.jsonl"}))
    with pytest.raises(PhikitError) as e:
        load_recipe(path)
    assert "field 'eval.file': file not found" in str(e.value)
    assert f"{path}:" in str(e.value)


def test_missing_source_dir(tmp_path):
    path = write(tmp_path, recipe_text(**{str(REPO / "models" / "tiny-phi3"): "./no-such-model"}))
    with pytest.raises(PhikitError, match="field 'source'"):
        load_recipe(path)


def test_yaml_syntax_error_has_line(tmp_path):
    path = write(tmp_path, recipe_text(**{"  block_size: 32": "  block_size: [32"}))
    with pytest.raises(PhikitError) as e:
        load_recipe(path)
    assert str(e.value).startswith(f"{path}:") and "invalid YAML" in str(e.value)


def test_bad_block_size(tmp_path):
    path = write(tmp_path, recipe_text(**{"block_size: 32": "block_size: 48"}))
    with pytest.raises(PhikitError, match="quantization.block_size.*power of two"):
        load_recipe(path)


def test_target_unknown_backend(tmp_path):
    text = (REPO / "targets" / "generic-cpu.yaml").read_text().replace("backend: onnx",
                                                                        "backend: tensorrt")
    path = write(tmp_path, text, "t.yaml")
    with pytest.raises(PhikitError) as e:
        load_target(path, set(BACKENDS))
    line = text.splitlines().index("backend: tensorrt") + 1
    assert f"{path}:{line}: field 'backend': unknown backend 'tensorrt'" in str(e.value)


def test_cli_unknown_key_exit_2_without_traceback(tmp_path):
    path = write(tmp_path, recipe_text(**{"  max_tokens: 128": "  max_tokens: 128\n  colour: red"}))
    proc = phikit("build", path, "--target", "generic-cpu", "--dry-run")
    assert proc.returncode == 2
    line = path.read_text().splitlines().index("  colour: red") + 1
    assert f"{path}:{line}: field 'eval.colour': unknown field" in proc.stderr.replace("\n", "")
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_unknown_target_exit_2():
    proc = phikit("build", "recipes/tiny-phi3-int4.yaml", "--target", "toaster", "--dry-run")
    assert proc.returncode == 2 and "unknown target 'toaster'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_precision_not_allowed_on_target(tmp_path):
    text = (REPO / "targets" / "generic-cpu.yaml").read_text().replace(
        "precisions: [int4, int8, fp32]", "precisions: [int8]")
    path = write(tmp_path, text, "t.yaml")
    proc = phikit("build", "recipes/tiny-phi3-int4.yaml", "--target", path, "--dry-run")
    assert proc.returncode == 2 and "precision int4 is not allowed" in proc.stderr


@pytest.mark.parametrize("recipe", ["phi-3-mini-4k-instruct-int4", "phi-3.5-mini-instruct-int4"])
def test_real_checkpoint_recipes_dry_run_offline(recipe):
    proc = phikit("build", f"recipes/{recipe}.yaml", "--target", "generic-cpu", "--dry-run",
                  check=0)
    assert "microsoft/Phi-3" in proc.stdout and "convert" in proc.stdout
    assert "onnxruntime_genai.models.builder" in proc.stdout


def _mutations():
    """Replace the value or key of one line of a good recipe with an arbitrary scalar."""
    lines = recipe_text().splitlines()
    keyed = [i for i, line in enumerate(lines) if ":" in line and not line.lstrip().startswith("#")]
    return st.tuples(st.sampled_from(keyed), st.booleans(),
                     st.one_of(st.text(max_size=12), st.integers(), st.floats(allow_nan=False),
                               st.none(), st.booleans()))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_mutations())
def test_fuzzed_recipes_never_traceback(tmp_path, mutation):
    """Any mutation either loads or raises PhikitError naming the file; nothing else escapes."""
    index, as_key, value = mutation
    lines = recipe_text().splitlines()
    key, _, _ = lines[index].partition(":")
    scalar = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    lines[index] = f"{key.rstrip()}x{abs(hash(str(value))) % 97}: 1" if as_key else \
        f"{key}: {scalar}"
    path = tmp_path / "fuzz.yaml"
    path.write_text("\n".join(lines) + "\n")
    try:
        load_recipe(path)
    except PhikitError as e:
        assert str(e).startswith(str(path))
