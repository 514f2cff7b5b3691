"""Signature hardening in the style of OpenSSF model-signing's tests: a signed bundle whose
signature is damaged, replaced or moved, or whose files changed after signing (the manifest
re-hashed, so that the hashes alone cannot tell; and not re-hashed), is refused by run.py's
bootstrap and by `phikit verify`, with the trusted key configured and, where the bundle itself
shows it, with none."""

from __future__ import annotations

import base64
import json
import os
import shutil

import pytest
from conftest import phikit

from toolkit.runner.core import SIGNATURE

from .conftest import rehash, run_py, sign, synthetic_bundle


@pytest.fixture(scope="module")
def signed_template(keys, tmp_path_factory):
    bundle = synthetic_bundle(tmp_path_factory.mktemp("signed") / "b")
    sign(bundle, keys / "signer")
    return bundle


@pytest.fixture
def bundle(signed_template, tmp_path):
    return shutil.copytree(signed_template, tmp_path / "b", symlinks=True)


def _rewrite_signature(bundle, change) -> None:
    path = bundle / SIGNATURE
    path.write_bytes(change(path.read_bytes()))


def _flip_a_signature_bit(armored: bytes) -> bytes:
    """The last bit of the ed25519 signature inside the SSHSIG armor, re-armored."""
    lines = armored.decode().strip().splitlines()
    blob = bytearray(base64.b64decode("".join(lines[1:-1])))
    blob[-1] ^= 0x01
    body = base64.b64encode(bytes(blob)).decode()
    return "\n".join([lines[0], *(body[i:i + 70] for i in range(0, len(body), 70)),
                      lines[-1]]).encode() + b"\n"


def _replay(bundle, keys) -> None:
    """The signer's valid signature of another bundle's manifest."""
    other = synthetic_bundle(bundle.parent / "other", name="other")
    sign(other, keys / "signer")
    shutil.copy(other / SIGNATURE, bundle / SIGNATURE)


def _symlinked_signature(bundle, keys) -> None:
    moved = bundle.parent / "elsewhere.sig"
    (bundle / SIGNATURE).rename(moved)
    (bundle / SIGNATURE).symlink_to(moved)


def _signature_dir(bundle, keys) -> None:
    (bundle / SIGNATURE).unlink()
    (bundle / SIGNATURE).mkdir()


def _signature_fifo(bundle, keys) -> None:
    (bundle / SIGNATURE).unlink()
    os.mkfifo(bundle / SIGNATURE)


# (attack, refused even with no key configured: the bundle shows it on its own)
SIGNATURE_ATTACKS = {
    "truncated": (lambda b, k: _rewrite_signature(b, lambda s: s[:len(s) // 2]), True),
    "bit-flipped": (lambda b, k: _rewrite_signature(b, _flip_a_signature_bit), True),
    "empty": (lambda b, k: _rewrite_signature(b, lambda s: b""), True),
    "garbage": (lambda b, k: _rewrite_signature(b, lambda s: b"not a signature\n"), True),
    "other-namespace": (lambda b, k: sign(b, k / "signer", namespace="file"), True),
    "replayed-from-another-bundle": (_replay, True),
    "symlink": (_symlinked_signature, True),
    "directory": (_signature_dir, True),
    "fifo": (_signature_fifo, True),
    "other-signer": (lambda b, k: sign(b, k / "stranger"), False),
    "removed": (lambda b, k: (b / SIGNATURE).unlink(), False),
}


def _deep_tree(bundle) -> None:
    deep = bundle / "model" / "/".join(f"d{i}" for i in range(60))
    deep.mkdir(parents=True)
    (deep / "weights.bin").write_bytes(b"planted")


def _edit_manifest(bundle, change) -> None:
    path = bundle / "manifest.json"
    path.write_text(change(path.read_text()))


FILE_ATTACKS = {
    "added-file": lambda b: (b / "model" / "extra.bin").write_bytes(b"planted"),
    "removed-file": lambda b: (b / "model" / "config.json").unlink(),
    "renamed-file": lambda b: (b / "model" / "config.json").rename(b / "model" / "c.json"),
    "modified-file": lambda b: (b / "model" / "config.json").write_text('{"a": 1}'),
    "added-dotfile": lambda b: (b / ".pth").write_text("import os\n"),
    "added-dot-directory": lambda b: ((b / "model" / ".git").mkdir(),
                                      (b / "model" / ".git" / "config").write_text("x")),
    "deep-tree": _deep_tree,
    "manifest-reformatted": lambda b: _edit_manifest(
        b, lambda t: json.dumps(json.loads(t), indent=1)),
    "manifest-field-changed": lambda b: _edit_manifest(
        b, lambda t: t.replace('"name": "b"', '"name": "c"')),
}


def verifiers(bundle, monkeypatch, key=None):
    """The exit codes and messages of run.py's bootstrap and of phikit, with `key` configured
    (PHIKIT_TRUSTED_KEY: what every command reads) or none."""
    if key is None:
        monkeypatch.delenv("PHIKIT_TRUSTED_KEY", raising=False)
    else:
        monkeypatch.setenv("PHIKIT_TRUSTED_KEY", str(key))
    return [run_py(bundle, "verify", timeout=30), phikit("verify", bundle, timeout=30)]


def assert_refused(procs, what: str) -> None:
    for proc in procs:
        assert proc.returncode == 2, (proc.args, proc.stdout, proc.stderr)
        assert what in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_the_untouched_bundle_verifies(bundle, keys, monkeypatch):
    for proc in verifiers(bundle, monkeypatch, keys / "signer.pub"):
        assert proc.returncode == 0 and "signed by" in proc.stdout, proc.stderr


@pytest.mark.parametrize("attack, shows_itself", SIGNATURE_ATTACKS.values(),
                         ids=SIGNATURE_ATTACKS.keys())
def test_damaged_or_replaced_signatures_are_refused(attack, shows_itself, bundle, keys,
                                                    monkeypatch):
    attack(bundle, keys)
    assert_refused(verifiers(bundle, monkeypatch, keys / "signer.pub"), SIGNATURE)
    if shows_itself:
        assert_refused(verifiers(bundle, monkeypatch), SIGNATURE)


@pytest.mark.parametrize("rehashed", [True, False], ids=["rehashed", "as-is"])
@pytest.mark.parametrize("name", FILE_ATTACKS)
def test_changes_after_signing_are_refused(name, rehashed, bundle, keys, monkeypatch):
    FILE_ATTACKS[name](bundle)
    if rehashed:
        rehash(bundle)
    # a changed manifest no longer matches its signature, key or not; else the file is named
    # (the signature still holds: it is the file list that does not)
    what = SIGNATURE if rehashed or name.startswith("manifest") else " the manifest"
    for procs in (verifiers(bundle, monkeypatch, keys / "signer.pub"),
                  verifiers(bundle, monkeypatch)):
        assert_refused(procs, what)
        assert what == SIGNATURE or all(SIGNATURE not in p.stderr for p in procs)
