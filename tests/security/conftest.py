"""A synthetic bundle (no model needed) for the attacks in this directory, and what attacks on
it need: signing keys, a re-hashed manifest, planted code that leaves a canary file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.package import finish_manifest, publish, staging_dir, write_runner
from toolkit.runner.core import bundle_files, sha256_file


def synthetic_bundle(out: Path, name: str = "b") -> Path:
    """A well-formed ONNX-runner bundle whose model dir holds only a config.json."""
    stage = staging_dir(out)
    (stage / "model").mkdir()
    (stage / "model" / "config.json").write_text("{}")
    write_runner(stage, "ortgenai")
    finish_manifest(stage, {"name": name, "model_dir": "model",
                            "runtime": {"module": "ortgenai"}, "parity": {"verdict": "pass"}})
    return publish(stage, out, passed=True)


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> Path:
    """signer and stranger: OpenSSH ed25519 key pairs (NAME, NAME.pub)."""
    d = tmp_path_factory.mktemp("keys")
    for name in ("signer", "stranger"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                        str(d / name)], check=True)
    return d


def sign(bundle: Path, private_key: Path, namespace: str = "phikit-bundle") -> None:
    """manifest.json.sig as `phikit sign` writes it (ssh-keygen -Y sign), in any namespace."""
    (bundle / "manifest.json.sig").unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", str(private_key), "-n", namespace,
                    str(bundle / "manifest.json")], check=True, capture_output=True)


def rehash(bundle: Path) -> None:
    """The manifest's file table made to match the files again, as an attacker would."""
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"] = {rel: sha256_file(bundle / rel) for rel in bundle_files(bundle)}
    path.write_text(json.dumps(manifest))


def payload(canary: Path) -> str:
    """Python that leaves `canary` behind when it runs."""
    return f"open({str(canary)!r}, 'w').write('ran')\n"


def run_py(bundle: Path, *args: str, env: dict | None = None,
           timeout: int = 60) -> subprocess.CompletedProcess:
    """The bundle's own run.py, as a device runs it."""
    return subprocess.run([sys.executable, str(bundle / "run.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=bundle.parent,
                          env={**os.environ, **(env or {})})
