"""The first code that runs from a bundle verifies all of it: run.py's bootstrap (its own code,
the standard library only) checks the whole file set, every hash and the signature before it
imports anything else of the bundle. One trust policy for every command that runs a bundle: a
configured key (--key, PHIKIT_TRUSTED_KEY) is enforced, by phikit run / serve / validate as by
run.py. Each attack plants code that would leave a canary file, and checks it never ran."""

from __future__ import annotations

import os

import pytest
from conftest import phikit

from toolkit.runner.core import SIGNATURE

from .conftest import payload, rehash, run_py, sign, synthetic_bundle

# Every place code planted in a bundle could be imported from, with the path it is planted at.
PLANTED = {
    # a package directory beside a hashed module: Python imports the package, not cli.py
    "package-shadows-cli": "phikit_runner/cli/__init__.py",
    "package-shadows-core": "phikit_runner/core/__init__.py",
    # the bundle's directory is the last entry of sys.path: a module the runtime imports
    "module-for-the-runtime": "onnxruntime_genai.py",
    "module-in-the-runner": "phikit_runner/readline.py",
    # a portion of a namespace package (`google` merges the portions of every sys.path entry)
    "namespace-portion": "google/planted/__init__.py",
    "pth-file": "phikit.pth",
    "sitecustomize": "sitecustomize.py",
    "init-at-the-top": "__init__.py",
    "init-in-the-model-dir": "model/__init__.py",
    "dotfile-module": ".planted.py",
    "dot-directory-package": "phikit_runner/.hidden/__init__.py",
    "venv-below-the-top": "phikit_runner/.venv/cli.py",  # only the top-level .venv is exempt
    "deep-tree": "/".join(f"d{i}" for i in range(40)) + "/__init__.py",
}


@pytest.fixture
def bundle(tmp_path):
    return synthetic_bundle(tmp_path / "b")


def refused_without_running(bundle, canary, *runs, what: str | None = None) -> None:
    """Each run (args, env) of run.py exits 2 with one error line (naming `what`), and the
    planted code never ran."""
    for args, env in runs:
        proc = run_py(bundle, *args, env=env)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: "), proc.stderr
        if what is not None:
            assert what in proc.stderr, proc.stderr
        assert not canary.exists(), f"planted code ran: run.py {' '.join(args)}"


@pytest.mark.parametrize("where", PLANTED.values(), ids=PLANTED.keys())
def test_planted_code_never_runs(where, bundle, tmp_path):
    canary = tmp_path / "canary"
    path = bundle / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("import os; " if where.endswith(".pth") else "") + payload(canary))
    refused_without_running(bundle, canary, (("verify",), None), (("--prompt", "hi"), None),
                            what=f"{where}: not listed in the manifest")
    assert phikit("verify", bundle).returncode == 2 and not canary.exists()


def test_unlisted_empty_directory_is_refused(bundle, tmp_path):
    """An empty directory named like a module holds no file to hash, yet it is a namespace
    package where a module is looked for."""
    (bundle / "phikit_runner" / "cli").mkdir()
    refused_without_running(bundle, tmp_path / "canary", (("verify",), None),
                            what="cli: a directory not in the manifest")
    proc = phikit("verify", bundle)
    assert proc.returncode == 2 and "not in the manifest" in proc.stderr


def test_runner_rehashed_after_signing_never_runs(bundle, keys, tmp_path):
    """Code appended to core.py with its hash updated in the manifest: the hashes agree, only
    the signature can tell, and it is checked before any runner code is imported, whether the
    key comes from --key, from PHIKIT_TRUSTED_KEY, or no key is configured (a signed bundle's
    signature must still be one of its manifest)."""
    canary = tmp_path / "canary"
    sign(bundle, keys / "signer")
    core = bundle / "phikit_runner" / "core.py"
    core.write_text(core.read_text() + payload(canary))  # runs when core is imported
    rehash(bundle)
    key = str(keys / "signer.pub")
    refused_without_running(
        bundle, canary,
        (("verify", "--key", key), None),
        (("verify",), {"PHIKIT_TRUSTED_KEY": key}),
        (("--prompt", "hi"), {"PHIKIT_TRUSTED_KEY": key}),
        (("validate",), {"PHIKIT_TRUSTED_KEY": key}),
        (("verify",), None),
        what=SIGNATURE)


def unsigned(bundle, keys):
    """As built without --sign."""


def signed_by_stranger(bundle, keys):
    sign(bundle, keys / "stranger")


def tampered_after_signing(bundle, keys):
    sign(bundle, keys / "signer")
    (bundle / "model" / "config.json").write_text('{"planted": true}')
    rehash(bundle)


def through_a_trusted_runner(bundle, keys):
    """`run.py --bundle B`: a runner the key signed, opening another bundle."""
    runner = synthetic_bundle(bundle.parent / "runner")
    sign(runner, keys / "signer")
    return run_py(runner, "--bundle", str(bundle), "--prompt", "hi")


# what a configured key must refuse, each in every command that runs a bundle
UNTRUSTED = {"unsigned": unsigned, "signed-by-another-key": signed_by_stranger,
             "tampered-and-rehashed": tampered_after_signing}
RUNS = {
    "phikit run": lambda b, keys: phikit("run", b, "--prompt", "hi", timeout=60),
    "phikit serve": lambda b, keys: phikit("serve", b, "--port", "0", timeout=60),
    "phikit validate": lambda b, keys: phikit("validate", b, timeout=60),
    "phikit tune": lambda b, keys: phikit("tune", b, timeout=60),
    "run.py --prompt": lambda b, keys: run_py(b, "--prompt", "hi"),
    "run.py serve": lambda b, keys: run_py(b, "serve", "--port", "0"),
    "run.py --bundle": through_a_trusted_runner,
}


@pytest.mark.parametrize("attack", UNTRUSTED.values(), ids=UNTRUSTED.keys())
def test_trusted_key_is_enforced_by_every_command(attack, keys, tmp_path, monkeypatch):
    monkeypatch.setenv("PHIKIT_TRUSTED_KEY", str(keys / "signer.pub"))
    bundle = synthetic_bundle(tmp_path / "b")
    attack(bundle, keys)
    for name, run in RUNS.items():
        proc = run(bundle, keys)
        assert proc.returncode == 2, (name, proc.stdout, proc.stderr)
        assert SIGNATURE in proc.stderr and "Traceback" not in proc.stderr, (name, proc.stderr)


def test_the_configured_key_lets_its_own_bundle_through(keys, tmp_path, monkeypatch):
    """The same commands with the bundle the key signed: past the signature (the synthetic
    bundle's model cannot open, which is the next thing they say)."""
    monkeypatch.setenv("PHIKIT_TRUSTED_KEY", str(keys / "signer.pub"))
    bundle = synthetic_bundle(tmp_path / "b")
    sign(bundle, keys / "signer")
    proc = phikit("verify", bundle)
    assert proc.returncode == 0 and f"signed by {keys / 'signer.pub'}" in proc.stdout
    proc = run_py(bundle, "verify")
    assert proc.returncode == 0 and f"signed by {keys / 'signer.pub'}" in proc.stdout
    for proc in (phikit("run", bundle, "--prompt", "hi", timeout=60),
                 run_py(bundle, "--prompt", "hi")):
        assert proc.returncode == 2 and SIGNATURE not in proc.stderr, proc.stderr
        assert "ortgenai" in proc.stderr  # the runtime or the model, not the trust check


def test_a_listed_fifo_is_refused_without_waiting(bundle):
    """A FIFO where a listed file was: hashing it would wait for a writer forever."""
    config = bundle / "model" / "config.json"
    config.unlink()
    os.mkfifo(config)
    for proc in (run_py(bundle, "verify", timeout=20), phikit("verify", bundle, timeout=20)):
        assert proc.returncode == 2 and "config.json: not a regular file" in proc.stderr
    sig = bundle / SIGNATURE
    config.unlink()
    config.write_text("{}")
    os.mkfifo(sig)
    for proc in (run_py(bundle, "verify", timeout=20), phikit("verify", bundle, timeout=20)):
        assert proc.returncode == 2 and f"{SIGNATURE}: not a regular file" in proc.stderr
