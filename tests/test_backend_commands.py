"""The converter command lines each backend builds from a recipe, and what each refuses (fast)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO
from toolkit.backends import BACKENDS
from toolkit.build import find_target, make_plan
from toolkit.errors import PhikitError
from toolkit.schema import load_recipe, load_target


def recipe(precision="int4", **quant):
    r = load_recipe(REPO / "recipes" / f"tiny-phi3-{precision}.yaml")
    return r.model_copy(update={"quantization": r.quantization.model_copy(update=quant)})


def target(name):
    return load_target(find_target(name), set(BACKENDS))


def test_onnx_builder_command():
    cmd = BACKENDS["onnx"].builder_command(Path("src"), Path("out"), recipe(
        accuracy_level=4, symmetric=False, options={"onnx": {"extra_options": {
            "matmul_mixed_precision": "last_matmul:int8"}}}), target("generic-cpu"), Path("c"))
    assert cmd[1:3] == ["-m", "toolkit.backends.onnx_stream"]  # the builder, streamed
    assert cmd[cmd.index("-p") + 1] == "int4" and cmd[cmd.index("-e") + 1] == "cpu"
    extra = cmd[cmd.index("--extra_options") + 1:]
    assert {"block_size=32", "is_symmetric=false", "accuracy_level=4", "prune_lm_head=true",
            "matmul_mixed_precision=last_matmul:int8"} == set(extra)


def test_onnx_cpu_defaults_and_recipe_overrides():
    """Measured CPU defaults (accuracy level 4, pruned lm_head) apply when the recipe is silent;
    the recipe's own fields and raw extra_options win; other providers keep the builder's."""
    onnx = BACKENDS["onnx"]
    assert onnx.extra_options(recipe(), target("generic-cpu")) == {
        "block_size": 32, "is_symmetric": "true", "accuracy_level": 4, "prune_lm_head": "true"}
    custom = onnx.extra_options(recipe(accuracy_level=0, options={"onnx": {"extra_options": {
        "prune_lm_head": "false"}}}), target("generic-cpu"))
    assert custom["accuracy_level"] == 0 and custom["prune_lm_head"] == "false"
    assert "prune_lm_head=true" in onnx.describe(recipe(), target("generic-cpu"))


@pytest.mark.parametrize("target_name, backend, block", [
    ("generic-cpu", "onnx", 128), ("raspberry-pi", "onnx", 32), ("nvidia-cuda", "onnx", 32),
    ("intel-cpu", "openvino", 32), ("apple-metal", "mlx", 32)])
def test_block_size_left_to_the_backend_is_resolved_once_in_the_plan(target_name, backend, block,
                                                                     tmp_path):
    """A recipe without block_size gets its backend's default for the target, in the plan's
    recipe (what is converted, cache-keyed and recorded in the manifest) and its plan line; a
    recipe's own block size wins."""
    plan = make_plan("recipes/phi-3-mini-4k-instruct-int4.yaml", target_name, backend=backend,
                     out=tmp_path / "b")
    assert plan.recipe.quantization.block_size == block
    assert f"block {block}," in plan.steps[1]
    pinned = make_plan("recipes/tiny-phi3-int4.yaml", target_name, backend=backend,
                       out=tmp_path / "p")
    assert pinned.recipe.quantization.block_size == 32


def test_openvino_cli_command_with_options():
    r = recipe(symmetric=True, block_size=64, options={"openvino": {"ratio": 0.8,
                                                                    "all_layers": True}})
    cmd = BACKENDS["openvino"].cli_command(Path("src"), Path("out"), r)
    assert cmd[:3] == ["optimum-cli", "export", "openvino"]
    assert cmd[cmd.index("--weight-format") + 1] == "int4" and "--sym" in cmd
    assert cmd[cmd.index("--group-size") + 1] == "64" and cmd[cmd.index("--ratio") + 1] == "0.8"
    assert "--all-layers" in cmd and cmd[-1] == "out"
    int8 = BACKENDS["openvino"].cli_command(Path("s"), Path("o"), recipe("int8"))
    assert "--group-size" not in int8 and int8[int8.index("--weight-format") + 1] == "int8"


def test_openvino_convert_runs_the_cli_streamed(monkeypatch, tmp_path):
    import toolkit.backends.openvino as openvino

    ran = []
    monkeypatch.setattr(openvino, "run_tool", lambda cmd, *a, **k: ran.append(cmd))
    with pytest.raises(PhikitError):  # nothing was converted: no tokenizer written
        openvino.BACKEND.convert(Path("src"), tmp_path, recipe(), target("intel-cpu"), print)
    cli = openvino.BACKEND.cli_command(Path("src"), tmp_path, recipe())
    assert ran == [[ran[0][0], "-m", "toolkit.backends.openvino_stream", *cli[1:]]]


def test_openvino_unknown_option_and_data_aware_without_text():
    with pytest.raises(PhikitError, match="unknown OpenVINO option 'awk'"):
        BACKENDS["openvino"].support(None, target("intel-cpu"), recipe(
            options={"openvino": {"awk": True}}))
    reason = BACKENDS["openvino"].support(None, target("intel-cpu"), recipe(
        options={"openvino": {"awq": True}}))
    assert "need quantization.calibration" in reason


def test_mlx_command_and_presets():
    r = recipe(block_size=64, options={"mlx": {"quant_predicate": "mixed_3_6"}})
    cmd = BACKENDS["mlx"].command(Path("src"), Path("out"), r)
    assert cmd[1:4] == ["-m", "mlx_lm", "convert"]
    assert cmd[cmd.index("--q-bits") + 1] == "4" and cmd[cmd.index("--q-group-size") + 1] == "64"
    assert cmd[cmd.index("--quant-predicate") + 1] == "mixed_3_6"
    fp32 = BACKENDS["mlx"].command(Path("s"), Path("o"), recipe("fp32"))
    assert "-q" not in fp32 and fp32[fp32.index("--dtype") + 1] == "float32"
    assert "group sizes are 32, 64 or 128" in BACKENDS["mlx"].support(
        None, target("apple-metal"), recipe(block_size=16))
    assert "unknown mlx-lm quant_predicate" in BACKENDS["mlx"].support(
        None, target("apple-metal"), recipe(options={"mlx": {"quant_predicate": "mixed_9_9"}}))


def test_onnx_refusals():
    assert "GPU execution provider" in BACKENDS["onnx"].support(
        None, target("generic-cpu"), recipe("fp32").model_copy(update={
            "quantization": recipe("fp32").quantization.model_copy(update={"precision": "fp16"})}))
    assert "block-wise only" in BACKENDS["onnx"].support(None, target("generic-cpu"),
                                                         recipe(block_size=-1))
