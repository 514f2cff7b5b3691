"""A bundle is verified by code it cannot change (issue 17, item 1): every file is hashed (no
skipped directories), links are refused, and run.py imports nothing from the bundle before the
runner files it needs first match manifest.json. Each case plants what an attacker would and
checks that its code never ran."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from importlib._bootstrap_external import (
    _code_to_timestamp_pyc,  # the format CPython reads
)

import pytest
from conftest import phikit

from .conftest import synthetic_bundle


@pytest.fixture
def bundle(tmp_path):
    return synthetic_bundle(tmp_path / "b")


def payload(marker) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')\n"


def run_py(bundle, *args):
    return subprocess.run([sys.executable, str(bundle / "run.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=bundle.parent)


def refused(bundle, what: str) -> None:
    for proc in (run_py(bundle, "verify"), run_py(bundle, "--prompt", "hi"),
                 phikit("verify", bundle)):
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert what in proc.stderr and "Traceback" not in proc.stderr


def test_planted_stdlib_module_never_runs(bundle, tmp_path):
    marker = tmp_path / "ran"
    (bundle / "argparse.py").write_text(payload(marker))
    refused(bundle, "argparse.py: not listed in the manifest")
    assert not marker.exists()


def test_planted_byte_code_is_never_read(bundle, tmp_path):
    """A .pyc whose header matches core.py's mtime and size: CPython would run it instead of the
    source. run.py reads no byte code from the bundle, and verification refuses the file."""
    marker = tmp_path / "ran"
    source = bundle / "phikit_runner" / "core.py"
    stat = source.stat()
    code = compile(payload(marker), str(source), "exec")
    pyc = importlib.util.cache_from_source(str(source))
    os.makedirs(os.path.dirname(pyc))
    with open(pyc, "wb") as f:
        f.write(_code_to_timestamp_pyc(code, int(stat.st_mtime), stat.st_size))
    refused(bundle, "__pycache__")
    assert not marker.exists()


def test_symbolic_links_are_refused(bundle, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "__init__.py").write_text(payload(tmp_path / "ran"))
    (bundle / "dataclasses").symlink_to(elsewhere)
    refused(bundle, "symbolic link")
    assert not (tmp_path / "ran").exists()


def test_edited_runner_is_refused_before_it_runs(bundle, tmp_path):
    marker = tmp_path / "ran"
    core = bundle / "phikit_runner" / "core.py"
    core.write_text(payload(marker) + core.read_text())
    for args in (("verify",), ("--prompt", "hi")):
        proc = run_py(bundle, *args)
        assert proc.returncode == 2 and "modified runner" in proc.stderr
    assert not marker.exists()
    assert phikit("verify", bundle).returncode == 2


def test_runtime_cache_stays_outside_the_bundle(monkeypatch, tmp_path):
    pytest.importorskip("openvino")
    from toolkit.runner.openvino_rt import _cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "bundle" / "model"
    model.mkdir(parents=True)
    (model / "openvino_model.xml").write_text("<net/>")
    path = _cache_dir(model, ".cache/openvino")
    assert str(path).startswith(str(tmp_path / "cache" / "phikit" / "openvino"))
