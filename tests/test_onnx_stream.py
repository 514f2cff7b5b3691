"""The ORT GenAI builder driven to stream (toolkit/backends/onnx_stream.py: weights mapped from
the shards, quantized one MatMul at a time) writes the same model as the builder run as it
ships: the same nodes, the same initializer bytes, the same genai_config.json. The memory it
saves is measured by bench/convert.py, not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import REPO

pytestmark = pytest.mark.slow


def graph_of(model_dir):
    model = onnx.load(str(model_dir / "model.onnx"))
    nodes = {n.name: (n.op_type, n.domain, list(n.input), list(n.output),
                      sorted((a.name, str(onnx.helper.get_attribute_value(a)))
                             for a in n.attribute))
             for n in model.graph.node}
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    opsets = {o.domain: o.version for o in model.opset_import}
    return nodes, weights, opsets


@pytest.mark.parametrize("model, precision", [("tiny-phi3", "int4"), ("tiny-phi3-gqa", "int4"),
                                              ("tiny-phi3", "int8")])
def test_streamed_builder_writes_the_builders_own_model(model, precision, tmp_path):
    from toolkit.backends import BACKENDS
    from toolkit.checkpoint import read_model_info
    from toolkit.schema import load_recipe, load_target

    backend = BACKENDS["onnx"]
    source = REPO / "models" / model
    recipe = load_recipe(REPO / "recipes" / f"tiny-phi3-{precision}.yaml")
    target = load_target(REPO / "targets" / "generic-cpu.yaml", set(BACKENDS))
    outs = {}
    for module in ("toolkit.backends.onnx_stream", "onnxruntime_genai.models.builder"):
        out = tmp_path / module
        cmd = backend.builder_command(source, out, recipe, target, tmp_path / f"{module}.cache",
                                      read_model_info(source))
        assert cmd[1:3] == ["-m", "toolkit.backends.onnx_stream"]  # what phikit runs
        proc = subprocess.run([sys.executable, "-m", module, *cmd[3:]], capture_output=True,
                              text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        if module.startswith("toolkit"):  # both steps streamed, not the builder's fallbacks
            assert "weights mapped from" in proc.stdout, proc.stdout[-2000:]
            assert "quantizing one weight at a time" in proc.stdout
        outs[module] = out
    streamed, builder = (graph_of(outs[m]) for m in outs)
    assert streamed[0] == builder[0]  # nodes: names, ops, wiring, attributes
    assert streamed[2] == builder[2]  # opsets
    assert streamed[1].keys() == builder[1].keys()
    for name, array in builder[1].items():
        assert streamed[1][name].dtype == array.dtype and np.array_equal(streamed[1][name], array), name
    assert sum(n[0] == "MatMulNBits" for n in streamed[0].values()) >= 4
    configs = [json.loads((outs[m] / "genai_config.json").read_text()) for m in outs]
    assert configs[0] == configs[1]
