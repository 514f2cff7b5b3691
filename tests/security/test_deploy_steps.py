"""Deploy reports each remote step as it went (issue: "runtime venv: installed" after pip failed,
then "unchanged" on every later deploy) and leaves the host holding the bundle only (a
`__pycache__/` left there failed every later `run.py verify`). Against the loopback sshd of
tests/test_deploy.py, with synthetic bundles: seconds, no model."""

from __future__ import annotations

import platform
import sys

import pytest
from test_deploy import BASE_PYTHON, deploy, sshd  # noqa: F401 - sshd: the fixture

from toolkit.package import finish_manifest, publish, staging_dir, write_runner

pytestmark = pytest.mark.slow

MISSING = "not-a-package-anywhere==1.0 --hash=sha256:" + "0" * 64 + "\n"


def deployable(out, lock: str):
    """A bundle deploy accepts for this machine: its lock `lock`, installed offline from its
    wheels/ (which hold none of it: pip fails at once, without a network)."""
    stage = staging_dir(out)
    (stage / "model").mkdir()
    (stage / "model" / "config.json").write_text("{}")
    (stage / "wheels").mkdir()
    (stage / "wheels" / "README").write_text("no wheels\n")
    (stage / "requirements.lock").write_text(lock)
    write_runner(stage, "ortgenai")
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    finish_manifest(stage, {"name": "b", "model_dir": "model", "runtime": {"module": "ortgenai"},
                            "parity": {"verdict": "pass"},
                            "target": {"name": "generic-cpu", "platform": {
                                "arch": platform.machine(), "python": python}}})
    return publish(stage, out, passed=True)


def test_a_failed_pip_install_is_reported_and_retried(sshd, tmp_path):  # noqa: F811
    port, keydir = sshd
    bundle = deployable(tmp_path / "b", MISSING)
    remote = tmp_path / "device" / "b"
    for attempt in range(2):  # the second deploy installs again: nothing cached the failure
        proc = deploy(bundle, f"root@127.0.0.1:{remote}", port, keydir, "client_key",
                      "--no-validate")
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "the runtime venv (pip install of requirements.lock) failed" in proc.stderr
        assert "runtime venv:" not in proc.stdout and "Traceback" not in proc.stderr
        assert not (remote / ".venv").exists()  # no half-made venv left to be taken as done


def test_what_a_run_left_on_the_host_is_removed(sshd, tmp_path):  # noqa: F811
    port, keydir = sshd
    bundle = deployable(tmp_path / "b", "")  # an empty lock: the venv installs, nothing runs
    remote = tmp_path / "device" / "b"
    dest = f"root@127.0.0.1:{remote}"
    first = deploy(bundle, dest, port, keydir, "client_key", "--no-validate")
    assert "runtime venv: installed" in first.stdout, first.stdout + first.stderr
    # what a host's own runs leave: byte code, a cache directory, a file of an older bundle
    (remote / "phikit_runner" / "__pycache__").mkdir()
    (remote / "phikit_runner" / "__pycache__" / "core.cpython-311.pyc").write_bytes(b"x")
    (remote / "model" / ".cache" / "ov").mkdir(parents=True)
    (remote / "model" / "old-weights.bin").write_bytes(b"old")
    (remote / "manifest.json.sig").write_text("a signature of an older manifest")
    proc = deploy(bundle, dest, port, keydir, "client_key", "--no-validate")
    assert "verified every sha256 on the host" in proc.stdout, proc.stdout + proc.stderr
    assert "runtime venv: unchanged" in proc.stdout
    assert not (remote / "phikit_runner" / "__pycache__").exists()
    assert not (remote / "model" / ".cache").exists()
    assert not (remote / "model" / "old-weights.bin").exists()
    assert not (remote / "manifest.json.sig").exists()
    assert (remote / "model" / "config.json").is_file()
