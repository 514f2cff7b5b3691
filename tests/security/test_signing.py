"""Signed bundles (issue 17): `phikit sign` / `build --sign` write manifest.json.sig in OpenSSH's
SSHSIG format; `phikit verify --key`, `run.py verify --key` and `deploy --key` refuse a bundle
whose files were changed and manifest re-hashed, an unsigned one, or one another key signed."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import phikit

from toolkit.errors import PhikitError
from toolkit.runner.core import SIGNATURE, SIGNATURE_NAMESPACE

from .conftest import rehash, synthetic_bundle


def verifiers(bundle, public_key):
    """(name, exit code, output) of each way a user checks the signature."""
    cli = phikit("verify", bundle, "--key", public_key)
    run_py = subprocess.run([sys.executable, str(bundle / "run.py"), "verify", "--key",
                             str(public_key)], capture_output=True, text=True, timeout=120)
    return [("phikit verify", cli.returncode, cli.stdout + cli.stderr),
            ("run.py verify", run_py.returncode, run_py.stdout + run_py.stderr)]


def deploy_refusal(bundle, public_key) -> str:
    from toolkit.deploy import deploy

    with pytest.raises(PhikitError, match="refusing to deploy") as e:
        deploy(bundle, "nobody@127.0.0.1:/nonexistent", key=public_key, log=lambda s: None)
    return str(e.value)


def test_signed_bundle_verifies_with_phikit_the_runner_and_ssh_keygen(keys, tmp_path):
    bundle = synthetic_bundle(tmp_path / "b")
    phikit("sign", bundle, "--key", keys / "signer", check=0)
    assert (bundle / SIGNATURE).is_file()
    for name, rc, output in verifiers(bundle, keys / "signer.pub"):
        assert rc == 0 and "ok:" in output, (name, output)
    # the standard tool agrees (what a user without phikit runs)
    allowed = tmp_path / "allowed"
    allowed.write_text(f"phikit {(keys / 'signer.pub').read_text()}")
    with open(bundle / "manifest.json", "rb") as f:
        proc = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", "phikit",
                               "-n", SIGNATURE_NAMESPACE, "-s", str(bundle / SIGNATURE)],
                              stdin=f, capture_output=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("attack", ["tampered-and-rehashed", "unsigned", "other-signer"])
def test_bad_signatures_are_refused_everywhere(keys, tmp_path, attack):
    bundle = synthetic_bundle(tmp_path / "b")
    if attack != "unsigned":
        signer = keys / ("stranger" if attack == "other-signer" else "signer")
        phikit("sign", bundle, "--key", signer, check=0)
    if attack == "tampered-and-rehashed":
        (bundle / "model" / "config.json").write_text('{"planted": true}')
        rehash(bundle)
        # the hashes alone cannot tell; the signature, checked even with no key configured, can
        unkeyed = phikit("verify", bundle)
        assert unkeyed.returncode == 2 and "changed after it was signed" in unkeyed.stderr
    for name, rc, output in verifiers(bundle, keys / "signer.pub"):
        assert rc == 2 and SIGNATURE in output and "Traceback" not in output, (name, output)
    assert SIGNATURE in deploy_refusal(bundle, keys / "signer.pub")


def test_signing_needs_an_ed25519_key(tmp_path):
    bundle = synthetic_bundle(tmp_path / "b")
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f",
                    str(tmp_path / "rsa")], check=True)
    proc = phikit("sign", bundle, "--key", tmp_path / "rsa")
    assert proc.returncode == 2 and "ed25519" in proc.stderr and "Traceback" not in proc.stderr
