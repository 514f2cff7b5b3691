"""A bundle is verified by code it cannot change (issue 17, item 1): every file is hashed (no
skipped directories), links are refused, and run.py imports nothing from the bundle before the
runner files it needs first match manifest.json. Each case plants what an attacker would and
checks that its code never ran."""

from __future__ import annotations

import importlib.util
import os
from importlib._bootstrap_external import (
    _code_to_timestamp_pyc,  # the format CPython reads
)

import pytest
from conftest import phikit

from .conftest import payload, run_py, synthetic_bundle


@pytest.fixture
def bundle(tmp_path):
    return synthetic_bundle(tmp_path / "b")


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


@pytest.mark.parametrize("module", ["core", "host", "device"])
def test_edited_runner_is_refused_before_it_runs(module, bundle, tmp_path):
    """core and host are imported by run.py itself; device by `run.py validate`."""
    marker = tmp_path / "ran"
    core = bundle / "phikit_runner" / f"{module}.py"
    core.write_text(payload(marker) + core.read_text())
    for args in (("verify",), ("--prompt", "hi"), ("validate",)):
        proc = run_py(bundle, *args)
        assert proc.returncode == 2 and f"{module}.py: sha256 does not match" in proc.stderr
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


@pytest.mark.parametrize("field, value, message", [
    ("model_dir", "/etc", "field 'model_dir'"),
    ("model_dir", "../elsewhere", "field 'model_dir'"),
    ("runtime", {"module": "../../evil"}, "field 'runtime.module'"),
    ("runtime", {"module": "json"}, "field 'runtime.module'"),  # not one of the bundle's files
    ("runtime", {"module": "server"}, "field 'runtime.module'"),  # the runner's own module
    ("runtime", [], "field 'runtime.module'"),
    ("files", [], "field 'files'"),
    ("name", "x;touch${IFS}PWNED;", "field 'name'"),
])
def test_manifest_fields_point_only_into_the_bundle(bundle, field, value, message):
    """manifest.json is the one file no hash covers: what the runner acts on in it (the model
    directory, the runtime module, the name) is checked against the bundle's hashed files."""
    import json

    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    refused(bundle, message)


def test_eval_and_reference_files_are_the_bundles_own(bundle):
    """`run.py validate` and `tune` open the manifest's eval_file and reference_file: each must
    be one of the bundle's hashed files (not a path out of it, a directory or not a path at
    all), refused by every command naming the manifest and the field."""
    import json

    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    for field, value in [("eval_file", "../../outside.jsonl"), ("eval_file", 3),
                         ("reference_file", "/etc/passwd"), ("reference_file", "model")]:
        path.write_text(json.dumps({**data, field: value}))
        refused(bundle, f"manifest.json: field {field!r}")


def test_pickle_checkpoints_are_refused(tmp_path):
    """Unpickling runs code: a checkpoint with only pytorch_model.bin is refused by name, before
    transformers (or anything) opens it."""
    import shutil

    from conftest import TINY

    ckpt = tmp_path / "ckpt"
    shutil.copytree(TINY, ckpt, ignore=shutil.ignore_patterns("*.safetensors"))
    (ckpt / "pytorch_model.bin").write_bytes(b"planted pickle")
    proc = phikit("build", "recipes/tiny-phi3-int4.yaml", "--target", "generic-cpu",
                  "--source", ckpt, "--out", tmp_path / "out")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "pytorch_model.bin" in proc.stderr and "safetensors" in proc.stderr
    assert "Traceback" not in proc.stderr
