"""`phikit deploy` against a real OpenSSH server on a loopback port (slow)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import once, phikit
from test_server import free_port
from toolkit.package import finish_manifest

pytestmark = pytest.mark.slow

SSHD = Path("/usr/sbin/sshd")
BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if not SSHD.exists():
        pytest.skip("openssh-server is not installed (.ci/run installs it)")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key", "other_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
                       check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d}/host_key
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
""")
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(d / "sshd_config")],
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1)
    assert proc.poll() is None, proc.stderr.read()
    yield port, d
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def wheel_bundle(dist):
    out = dist / "tiny-phi3-int4-with-wheels"
    with once(out):
        if not (out / "manifest.json").exists():
            phikit("build", "recipes/tiny-phi3-int4.yaml", "--target", "generic-cpu", "--out",
                   out, "--with-wheels", check=0)
    return out


def deploy(bundle, dest, port, keydir, key="client_key", *extra):
    return phikit("deploy", bundle, dest, "--ssh-port", port, "--identity", keydir / key,
                  "--python", BASE_PYTHON, "-o", "StrictHostKeyChecking=no",
                  "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", *extra,
                  timeout=1200)


def test_deploy_then_redeploy_copies_only_what_changed(sshd, wheel_bundle, tmp_path):
    port, keydir = sshd
    bundle = tmp_path / "bundle"
    shutil.copytree(wheel_bundle, bundle)
    remote_dir = tmp_path / "device" / "tiny"
    n_files = len(json.loads((bundle / "manifest.json").read_text())["files"]) + 1
    proc = deploy(bundle, f"root@127.0.0.1:{remote_dir}", port, keydir, "client_key", "--tune")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"copying {n_files} of {n_files} files" in proc.stdout
    assert "verified every sha256 on the host" in proc.stdout
    assert "runtime venv: installed" in proc.stdout and "smoke prompt:" in proc.stdout
    assert (remote_dir / ".venv" / "bin" / "python").exists()
    assert (remote_dir / "wheels").is_dir()  # installed offline from the bundle's own wheels
    # the host re-measured parity with its own runtime install; the report came back
    device = json.loads((tmp_path / "bundle.127.0.0.1.parity.json").read_text())
    assert device["verdict"] == "pass" and device["host"]["cpu_flags"]
    assert "parity on root@127.0.0.1" in proc.stdout and ": PASS" in proc.stdout
    assert not (remote_dir / "parity-device.json").exists()  # nothing left in the bundle dir
    compare = phikit("compare", bundle, tmp_path / "bundle.127.0.0.1.parity.json", check=0)
    assert "measured on" in compare.stdout
    # --tune: the host measured its options and keeps the fastest that validated there
    assert "tuned on the host" in proc.stdout
    assert json.loads((remote_dir / "tuned.json").read_text())["options"]["threads"] >= 1

    # Change one file, re-hash the manifest as a re-build would, deploy again.
    with open(bundle / "target.yaml", "a") as f:
        f.write("# retuned\n")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.pop("files")
    for key in ("format", "phikit"):
        manifest.pop(key)
    finish_manifest(bundle, manifest)
    proc = deploy(bundle, f"root@127.0.0.1:{remote_dir}", port, keydir, "client_key",
                  "--no-validate")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"copying 2 of {n_files} files" in proc.stdout  # target.yaml + manifest.json
    assert "runtime venv: unchanged" in proc.stdout
    assert (remote_dir / "target.yaml").read_text().endswith("# retuned\n")

    # Signed (issue 17): with a trusted key configured, the signed bundle deploys, signature
    # included, and the device can check it itself.
    phikit("sign", bundle, "--key", keydir / "other_key", check=0)
    proc = deploy(bundle, f"root@127.0.0.1:{remote_dir}", port, keydir, "client_key",
                  "--key", keydir / "other_key.pub", "--no-validate")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "manifest signed by" in proc.stdout and f"copying 2 of {n_files + 1} files" in proc.stdout
    check = subprocess.run([str(remote_dir / ".venv" / "bin" / "python"), str(remote_dir / "run.py"),
                            "verify", "--key", str(keydir / "other_key.pub")],
                           capture_output=True, text=True)
    assert check.returncode == 0 and "signed by" in check.stdout, check.stderr


def test_unreachable_host(sshd, int4_bundle, tmp_path):
    _, keydir = sshd
    proc = deploy(int4_bundle, f"root@127.0.0.1:{tmp_path}/x", free_port(), keydir)
    assert proc.returncode == 2 and "host unreachable" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_auth_refused(sshd, int4_bundle, tmp_path):
    port, keydir = sshd
    proc = deploy(int4_bundle, f"root@127.0.0.1:{tmp_path}/x", port, keydir, "other_key")
    assert proc.returncode == 2 and "authentication refused" in proc.stderr


def _with_platform(bundle, tmp_path, **platform):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["target"]["platform"].update(platform)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_wrong_architecture_refused_before_copying(sshd, int4_bundle, tmp_path):
    port, keydir = sshd
    bundle = _with_platform(int4_bundle, tmp_path, arch="aarch64")
    remote = tmp_path / "device"
    proc = deploy(bundle, f"root@127.0.0.1:{remote}", port, keydir)
    assert proc.returncode == 2 and "built for aarch64" in proc.stderr
    assert not list(remote.glob("*"))  # nothing copied


def test_python_too_old(sshd, int4_bundle, tmp_path):
    port, keydir = sshd
    bundle = _with_platform(int4_bundle, tmp_path, python="3.99")
    proc = deploy(bundle, f"root@127.0.0.1:{tmp_path}/device", port, keydir)
    assert proc.returncode == 2 and "is too old" in proc.stderr


def test_disk_full(sshd, int4_bundle, tmp_path):
    port, keydir = sshd
    small = tmp_path / "small"
    small.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)],
                           capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mount.stderr.decode().strip()}")
    try:
        proc = deploy(int4_bundle, f"root@127.0.0.1:{small}/tiny", port, keydir)
        assert proc.returncode == 2 and "disk full" in proc.stderr
    finally:
        subprocess.run(["umount", str(small)])
