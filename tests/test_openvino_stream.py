"""optimum-intel's export driven to stream (toolkit/backends/openvino_stream.py: weights mapped
from the shards, their pages given back while OpenVINO writes the float IR and after each
weight NNCF compresses) writes the same files as optimum-cli run as it ships. The memory it
saves is measured by bench/convert.py, not asserted here."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_streamed_export_writes_optimum_clis_own_files(tmp_path):
    from toolkit.backends import BACKENDS
    from toolkit.backends.openvino import STREAMED_EXPORT
    from toolkit.schema import load_recipe

    source = REPO / "models" / "tiny-phi3"
    recipe = load_recipe(REPO / "recipes" / "tiny-phi3-int4.yaml")
    outs = {}
    for module in (STREAMED_EXPORT, "optimum.commands.optimum_cli"):
        out = tmp_path / module
        cmd = BACKENDS["openvino"].cli_command(source, out, recipe)
        proc = subprocess.run([sys.executable, "-m", module, *cmd[1:]], capture_output=True,
                              text=True, timeout=600, cwd=REPO)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        if module == STREAMED_EXPORT:  # every step streamed, not optimum-intel's own loading
            assert "weights mapped from tiny-phi3's safetensors" in proc.stdout, proc.stdout[-2000:]
            assert "float IR's pages released after each weight" in proc.stdout
        outs[module] = out
    streamed, shipped = outs.values()
    names = sorted(p.relative_to(shipped) for p in shipped.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(streamed) for p in streamed.rglob("*") if p.is_file())
    assert any(n.name == "openvino_model.bin" for n in names)
    for name in names:
        assert (streamed / name).read_bytes() == (shipped / name).read_bytes(), name
