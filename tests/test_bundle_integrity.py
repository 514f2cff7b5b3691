"""Manifests and archives on a synthetic bundle (no model needed): tampering is named."""

from __future__ import annotations

import hashlib

import pytest

from toolkit.package import finish_manifest, publish, staging_dir, write_archive, write_runner
from toolkit.runner.core import BundleError, open_bundle, verify_bundle


@pytest.fixture
def bundle(tmp_path):
    out = tmp_path / "b"
    stage = staging_dir(out)
    (stage / "model").mkdir()
    (stage / "model" / "weights.bin").write_bytes(bytes(range(256)) * 64)
    (stage / "model" / "config.json").write_text('{"a": 1}')
    write_runner(stage, "ortgenai")
    finish_manifest(stage, {"model_dir": "model", "runtime": {"module": "ortgenai"},
                            "parity": {"verdict": "pass"}})
    return publish(stage, out, passed=True)


def test_verify_ok(bundle):
    manifest = verify_bundle(bundle)
    from toolkit.runner.core import RUNNER_MODULES

    assert set(manifest["files"]) == {"model/weights.bin", "model/config.json", "run.py",
                                      "phikit_runner/__init__.py", "phikit_runner/ortgenai.py",
                                      *(f"phikit_runner/{m}.py" for m in RUNNER_MODULES)}


def test_flipped_byte_is_named(bundle):
    path = bundle / "model" / "weights.bin"
    data = bytearray(path.read_bytes())
    data[1000] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model/weights.bin: sha256 does not match"):
        verify_bundle(bundle)


def test_extra_and_missing_files_are_named(bundle):
    (bundle / "model" / "extra.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match="extra.onnx: not listed"):
        verify_bundle(bundle)
    (bundle / "model" / "extra.onnx").unlink()
    (bundle / "model" / "config.json").unlink()
    with pytest.raises(BundleError, match="config.json: listed in the manifest but missing"):
        verify_bundle(bundle)


def test_failed_bundle_is_refused_by_runner(tmp_path):
    out = tmp_path / "b"
    stage = staging_dir(out)
    write_runner(stage, "ortgenai")
    finish_manifest(stage, {"model_dir": "model", "runtime": {"module": "ortgenai"},
                            "parity": {"verdict": "fail"}})
    final = publish(stage, out, passed=False)
    assert final.name == "b.failed" and not out.exists()
    with pytest.raises(BundleError, match="parity verdict is 'fail'"):
        open_bundle(final)


def test_no_partial_dir_left_looking_complete(tmp_path):
    out = tmp_path / "b"
    stage = staging_dir(out)
    assert stage.name.startswith(".b.partial-") and not (stage / "manifest.json").exists()


def test_archive_is_deterministic(bundle, tmp_path):
    a = write_archive(bundle, tmp_path / "a.tar.gz")
    (bundle / "run.py").touch()  # a new mtime must not change the archive
    b = write_archive(bundle, tmp_path / "b.tar.gz")
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
