"""Bundles: model + standalone runner + requirements.lock + parity report + manifest (sha256 of
every file). Assembled in a staging dir and renamed into place only once complete, so nothing
half-written ever looks like a bundle; a bundle that failed parity is written under
`<out>.failed`, its manifest saying so, and the runner refuses it."""

from __future__ import annotations

import gzip
import inspect
import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

from . import __version__
from .report import render_html, write_text_atomic
from .checkpoint import file_sha256
from .report.model import ParityReport
from .errors import PhikitError
from .manifest import BundleManifest
from .runner.core import (BUNDLE_FORMAT, MANIFEST, RUNNER_MODULES, SIGNATURE, SIGNATURE_NAMESPACE,
                          BundleError, bundle_files, read_manifest)
from .runner.rpc import source_only_imports

RUNNER_DIR = Path(__file__).resolve().parent / "runner"
RUN_PY = '''#!/usr/bin/env python3
"""Run this bundle: python run.py --prompt "..." | --chat | serve | verify.
Needs only requirements.lock. Nothing from the bundle runs before the whole bundle passes its
trust policy: this file, with the standard library alone, checks every file against
manifest.json (no file or directory more or less, regular files only, every sha256) and the
signature (--key, else $PHIKIT_TRUSTED_KEY; or the bundle is signed) before it imports the
runner. That check is phikit_runner/trust.py's source, copied in below (one definition)."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# No module comes from the bundle's directory until it is verified (a planted argparse.py or
# dataclasses/ would shadow the standard library), and no byte code is read or written there.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.dont_write_bytecode = True


@TRUST@


@SOURCE_ONLY_IMPORTS@


def key_option(argv):
    """The --key of this command line, read before its own parser (cli.py, bundle code) may be
    imported; None when not given (then $PHIKIT_TRUSTED_KEY, if set, is the key)."""
    import argparse

    parser = argparse.ArgumentParser(prog="run.py", add_help=False)
    parser.add_argument("--key")
    return parser.parse_known_args(argv)[0].key


if __name__ == "__main__":
    try:
        _, manifest_sha256, _ = verify(HERE, key_option(sys.argv[1:]))
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    source_only_imports(HERE)
    sys.path.append(HERE)  # last: the standard library and the venv always come first
    from phikit_runner import trust

    trust.HASHED_IN_THIS_PROCESS.add((os.path.realpath(HERE), manifest_sha256))
    from phikit_runner.cli import main

    sys.exit(main())
'''


# one definition of each: the trust policy in trust.py (which the runner imports), the import
# guard in rpc.py (which a child runs before any bundle import)
RUN_PY = RUN_PY.replace("@TRUST@", (RUNNER_DIR / "trust.py").read_text(encoding="utf-8").strip())
RUN_PY = RUN_PY.replace("@SOURCE_ONLY_IMPORTS@", inspect.getsource(source_only_imports).strip())


def write_runner(bundle: Path, runtime_module: str) -> None:
    pkg = bundle / "phikit_runner"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""phikit bundle runner (standard library + one runtime)."""\n')
    for name in [f"{m}.py" for m in RUNNER_MODULES] + [f"{runtime_module}.py"]:
        shutil.copy2(RUNNER_DIR / name, pkg / name)
    (bundle / "run.py").write_text(RUN_PY)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_report_html(bundle: Path, report: ParityReport, manifest: dict[str, Any]) -> Path:
    """report.html: the parity report a person reads, next to parity.json. Written before
    finish_manifest so it is hashed like every other file; it cannot list those hashes itself."""
    path = bundle / "report.html"
    write_text_atomic(path, render_html(report, manifest, manifest.get("name")))
    return path


def drop_runtime_caches(bundle: Path) -> None:
    """Byte code a tool may have written while phikit validated the staged bundle belongs to
    this machine, not to the device (and would be refused there as an unexpected file)."""
    for path in sorted(bundle.rglob("__pycache__"), reverse=True):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def finish_manifest(bundle: Path, manifest: BundleManifest | dict[str, Any]) -> dict[str, Any]:
    """Hash every file and write manifest.json last (its presence marks a complete bundle). A
    build's BundleManifest is completed through the model, so what is written is one; a plain
    dict (a test's hand-made bundle, a re-hashed copy) is completed as it is."""
    drop_runtime_caches(bundle)
    given = manifest.fields() if isinstance(manifest, BundleManifest) else manifest
    document = {"format": BUNDLE_FORMAT, "phikit": __version__, **given,
                "files": {rel: file_sha256(bundle / rel) for rel in bundle_files(bundle)}}
    if isinstance(manifest, BundleManifest):
        document = BundleManifest.model_validate(document).fields()
    write_json(bundle / MANIFEST, document)
    return document


def sign_manifest(bundle: Path, private_key: Path) -> Path:
    """manifest.json.sig: an SSHSIG signature of manifest.json by an OpenSSH ed25519 key (what
    `verify --key`, `run.py verify --key` and `deploy --key` check; `ssh-keygen -Y verify`
    checks it too). A passphrase is asked for on the terminal, by ssh-keygen."""
    private_key = Path(private_key)
    if not private_key.is_file():
        raise PhikitError("no such key file", file=private_key)
    try:
        public = subprocess.run(["ssh-keygen", "-y", "-f", str(private_key)], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    except FileNotFoundError:
        raise PhikitError("signing needs ssh-keygen (OpenSSH; Debian: openssh-client)") from None
    if public.returncode != 0 or not public.stdout.startswith("ssh-ed25519 "):
        raise PhikitError("not an OpenSSH ed25519 private key (make one with ssh-keygen -t "
                          f"ed25519): {(public.stderr or public.stdout).strip()[:200]}",
                          file=private_key)
    signature = bundle / SIGNATURE
    signature.unlink(missing_ok=True)
    proc = subprocess.run(["ssh-keygen", "-Y", "sign", "-f", str(private_key), "-n",
                           SIGNATURE_NAMESPACE, str(bundle / MANIFEST)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    if proc.returncode != 0 or not signature.is_file():
        raise PhikitError(f"ssh-keygen could not sign: {proc.stderr.strip()[-300:]}",
                          file=private_key)
    return signature


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def sweep_leftovers(parent: Path, pattern: str) -> list[Path]:
    """Remove `<pattern>-PID` directories whose process is gone (a build killed mid-way): they
    are complete-looking copies nobody will finish or clean. Live builds' dirs are left."""
    removed = []
    for path in parent.glob(f"{pattern}-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def staging_dir(out: Path) -> Path:
    if out.parent.is_dir():
        for kind in ("partial", "old0", "old1"):
            sweep_leftovers(out.parent, f".{out.name}.{kind}")
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    return stage


def is_bundle(path: Path) -> bool:
    """A directory holding a phikit manifest (a passed or a failed bundle, verified or not)."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        read_manifest(path)
    except BundleError:
        return False
    return True


def check_replaceable(out: Path, force: bool = False) -> None:
    """A build replaces `out` and `out.failed`: only a bundle or an empty directory is replaced
    unasked, never a directory of someone's files (PhikitError unless `force`)."""
    for path in (out, out.with_name(out.name + ".failed")):
        if force or not os.path.lexists(path) or is_bundle(path):
            continue
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            continue
        raise PhikitError("exists and is not a phikit bundle: building would delete it; choose "
                          "another --out, or pass --force to replace it", file=path,
                          field="--out")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


def publish(stage: Path, out: Path, passed: bool, force: bool = False) -> Path:
    """Move the staged bundle to `out` (passed) or `out.failed` (failed), replacing old ones:
    bundles, or with `force` whatever is there (check_replaceable, again: a build takes a while)."""
    check_replaceable(out, force)
    final = out if passed else out.with_name(out.name + ".failed")
    # old bundles are moved aside first (renames are instant) and deleted after: the window in
    # which neither the old nor the new bundle is in place is two renames, not a tree removal
    aside = []
    for n, old in enumerate((out, out.with_name(out.name + ".failed"))):
        if os.path.lexists(old):
            moved = old.with_name(f".{out.name}.old{n}-{os.getpid()}")
            _remove(moved)
            old.rename(moved)
            aside.append(moved)
    stage.rename(final)
    for moved in aside:
        _remove(moved)
    return final


def write_archive(bundle: Path, archive: Path) -> Path:
    """Deterministic .tar.gz: sorted entries, zero mtimes/owners, gzip header without time."""
    tmp = archive.with_name(archive.name + ".tmp")
    with open(tmp, "wb") as raw, \
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz, \
            tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        signed = [SIGNATURE] if (bundle / SIGNATURE).is_file() else []
        for rel in [MANIFEST, *signed] + bundle_files(bundle):
            path = bundle / rel
            info = tarfile.TarInfo(f"{bundle.name}/{rel}")
            info.size = path.stat().st_size
            info.mode = 0o755 if rel == "run.py" else 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)
    tmp.replace(archive)
    return archive


def bundle_size(bundle: Path) -> int:
    """Bytes of what ships (runtime caches made since, e.g. OpenVINO's, do not count)."""
    return sum((bundle / rel).stat().st_size for rel in [MANIFEST, *bundle_files(bundle)])


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
