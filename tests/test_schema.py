"""Recipe / target files: valid ones load, bad ones give one clear file:line:field message."""

from __future__ import annotations

import shutil
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


@pytest.mark.parametrize("recipe", sorted((REPO / "bench").glob("*.yaml")), ids=lambda p: p.stem)
def test_bench_recipes_plan_for_every_backend_the_benches_build(recipe):
    """`make bench-medium` builds each of these backends' bundles from the recipe after an hour
    of conversions: a check added to a backend since must fail here, not there."""
    for backend, target in (("onnx", "generic-cpu"), ("openvino", "intel-cpu"),
                            ("gguf", "ollama")):
        proc = phikit("build", recipe, "--target", target, "--backend", backend, "--dry-run",
                      check=0)
        assert "convert" in proc.stdout, (backend, proc.stdout)


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


@pytest.mark.parametrize("options, target, message", [
    ("    openvino:\n      ratio: 2\n", "intel-cpu",
     "13: field 'quantization.options.openvino.ratio': OpenVINO option 'ratio'"),
    ("    gguf:\n      colour: blue\n", "ollama",
     "13: field 'quantization.options.gguf': unknown GGUF option 'colour'"),
    ("    onxx:\n      a: 1\n", "generic-cpu", "12: field 'quantization.options.onxx': no backend"),
], ids=["out-of-range", "unknown-option", "unknown-backend"])
def test_backend_options_are_typed_and_checked_at_load(options, target, message, tmp_path):
    """Each backend's options model checks quantization.options.<backend> when the recipe
    loads, naming file, line and field (before any plan or conversion)."""
    text = (REPO / "recipes" / "tiny-phi3-int4.yaml").read_text().replace("../", f"{REPO}/")
    path = tmp_path / "r.yaml"
    path.write_text(text.replace("  symmetric: true\n", "  symmetric: true\n  options:\n"
                                 + options))
    proc = phikit("build", path, "--target", target, "--dry-run")
    assert proc.returncode == 2 and message in proc.stderr.replace("\n", " "), proc.stderr


def test_a_hub_shaped_relative_source_is_the_directory_beside_the_recipe(tmp_path):
    """`source: sub/model` names a directory beside the recipe when there is one (not a hub
    id, and not a path relative to wherever phikit runs): plan and build read the same one."""
    shutil.copytree(REPO / "models" / "tiny-phi3", tmp_path / "sub" / "model")
    text = (REPO / "recipes" / "tiny-phi3-int4.yaml").read_text()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text.replace("../models/tiny-phi3", "sub/model")
                      .replace("../evalsets/", f"{REPO}/evalsets/"))
    assert load_recipe(recipe).source == str((tmp_path / "sub" / "model").resolve())


def test_dry_run_reads_the_eval_set(tmp_path):
    (tmp_path / "bad.jsonl").write_text("not json\n")
    text = (REPO / "recipes" / "tiny-phi3-int4.yaml").read_text()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text.replace("../models/", f"{REPO}/models/")
                      .replace("../evalsets/tiny-phi3.jsonl", str(tmp_path / "bad.jsonl")))
    proc = phikit("build", recipe, "--target", "generic-cpu", "--dry-run", check=2)
    assert f"{tmp_path / 'bad.jsonl'}:1: invalid JSON" in proc.stderr


def test_a_recipe_without_bounds_is_not_silently_ungated(tmp_path):
    from toolkit.build import make_plan

    text = (REPO / "recipes" / "tiny-phi3-w8a16.yaml").read_text()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text.split("thresholds:")[0].replace("../models/", f"{REPO}/models/")
                      .replace("../evalsets/", f"{REPO}/evalsets/"))
    plan = make_plan(str(recipe), "qualcomm-npu", out=tmp_path / "b")
    assert any("kld_mean, kld_p99, top1 not gated" in step for step in plan.steps)
    # where the backend measured its honest error, its defaults gate the same recipe shape
    int4 = make_plan("recipes/tiny-phi3-int4.yaml", "generic-cpu", out=tmp_path / "c")
    assert not any("not gated" in step for step in int4.steps)
    assert int4.recipe.thresholds.kld_mean_max == BACKENDS["onnx"].default_thresholds(
        "int4")["kld_mean_max"]


def test_the_recipe_reference_names_every_field():
    """docs/recipe.md covers the schema: every field of a recipe and every backend option."""
    from toolkit.schema import EvalConfig, Quantization, Recipe, Thresholds

    doc = (REPO / "docs" / "recipe.md").read_text()
    fields = {*Recipe.model_fields, *Quantization.model_fields, *EvalConfig.model_fields,
              *Thresholds.model_fields}
    for backend in BACKENDS.values():
        fields |= set(backend.options_model.model_fields)
    missing = sorted(f for f in fields if f"`{f}`" not in doc)
    assert not missing, f"docs/recipe.md does not name {missing}"


def test_every_problem_of_a_recipe_at_once_with_hints(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: x\nsource: {REPO}/models/tiny-phi3\nquantization:\n"
                      "  precison: int4\n  symetric: true\neval:\n"
                      f"  file: {REPO}/evalsets/tiny-phi3.jsonl\n  max_token: 12\n")
    with pytest.raises(PhikitError) as e:
        load_recipe(recipe)
    text = str(e.value)
    assert f"{recipe}:4: field 'quantization.precision': required field missing" in text
    assert "'quantization.precison': unknown field (did you mean 'precision'?)" in text
    assert f"{recipe}:5: field 'quantization.symetric'" in text and "'symmetric'?" in text
    assert f"{recipe}:8: field 'eval.max_token'" in text and "'max_tokens'?" in text


def test_bounds_per_backend_in_one_recipe(tmp_path):
    """thresholds.backends.<name> wins for that backend; the general bound for the others; the
    backend's measured default where the recipe says nothing."""
    from toolkit.validate import effective_thresholds

    text = (REPO / "recipes" / "tiny-phi3-int4.yaml").read_text().replace("../", f"{REPO}/")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text + "thresholds:\n  kld_mean_max: 0.03\n  backends:\n"
                      "    openvino: {kld_mean_max: 0.005, top1_min: 0.9}\n")
    loaded = load_recipe(recipe)
    onnx, ov = (effective_thresholds(loaded, BACKENDS[b]) for b in ("onnx", "openvino"))
    assert onnx.kld_mean_max == 0.03 and ov.kld_mean_max == 0.005 and ov.top1_min == 0.9
    assert onnx.top1_min == BACKENDS["onnx"].default_thresholds("int4")["top1_min"]
    assert "backends" not in onnx.bounds()
    recipe.write_text(text + "thresholds:\n  backends:\n    openvno: {kld_mean_max: 0.1}\n")
    with pytest.raises(PhikitError, match="no backend 'openvno'"):
        load_recipe(recipe)


def test_json_schema_for_editors():
    import json

    from toolkit.schema import Recipe

    schema = json.loads(phikit("schema", "recipe", check=0).stdout)
    assert set(schema["properties"]) == set(Recipe.model_fields)
    assert "BoundOverrides" in json.dumps(schema)
    assert "properties" in json.loads(phikit("schema", "target", check=0).stdout)
    phikit("schema", "nothing", check=2)


def test_a_search_path_of_ones_own_recipes_and_targets(tmp_path):
    """`phikit --path DIR` (or PHIKIT_PATH): DIR/recipes and DIR/targets are found by name,
    before phikit's own, by list, build and doctor."""
    (tmp_path / "recipes").mkdir()
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "my-box.yaml").write_text(
        (REPO / "targets" / "generic-cpu.yaml").read_text().replace("name: generic-cpu",
                                                                    "name: my-box"))
    (tmp_path / "recipes" / "my-tiny.yaml").write_text(
        (REPO / "recipes" / "tiny-phi3-int4.yaml").read_text().replace("../", f"{REPO}/")
        .replace("name: tiny-phi3-int4", "name: my-tiny"))
    listed = phikit("--path", tmp_path, "list", "--json", check=0).stdout
    assert "my-tiny" in listed and "my-box" in listed and "tiny-phi3-int4" in listed
    plan = phikit("--path", tmp_path, "build", "my-tiny", "--target", "my-box", "--dry-run",
                  check=0).stdout
    assert "plan my-tiny -> my-box (onnx)" in plan
    unknown = phikit("build", "tiny-phi3-int4", "--target", "my-box", "--dry-run", check=2)
    assert "unknown target 'my-box'" in unknown.stderr and "Traceback" not in unknown.stderr


def test_default_bounds_cover_every_numerics_a_runtime_picks_per_cpu():
    """A runtime that computes differently per CPU (OpenVINO: bf16, int8 activations) has
    bounds from the worst of its numerics, each a set of options its host table accepts, so
    bench/honest_bounds.py can validate under each on one machine."""
    import importlib

    from toolkit.backends.common import Honest

    a = Honest(kld_mean=1e-3, kld_p99=1e-2, top1=0.95, ppl_ratio=0.99, greedy_match_mean=14)
    b = Honest(kld_mean=2e-3, kld_p99=5e-3, top1=0.96, ppl_ratio=1.005, greedy_match_mean=16)
    assert a.worst(b) == Honest(kld_mean=2e-3, kld_p99=1e-2, top1=0.95, ppl_ratio=0.99,
                                greedy_match_mean=14)
    assert BACKENDS["openvino"].honest_numerics, "OpenVINO picks bf16 / int8 activations per CPU"
    for backend in (b for b in BACKENDS.values() if not b.unavailable()):
        for options in backend.honest_numerics.values():
            table = importlib.import_module(f"toolkit.runner.{backend.runtime_module}").HOST_TABLE
            resolved, _ = table.choose(options, {"class": "avx2", "flags": []})
            assert {k: resolved[k] for k in options} == options
