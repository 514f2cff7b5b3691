"""Bundles: model + standalone runner + requirements.lock + parity report + manifest (sha256 of
every file). Assembled in a staging dir and renamed into place only once complete, so nothing
half-written ever looks like a bundle; a bundle that failed parity is written under
`<out>.failed`, its manifest saying so, and the runner refuses it."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

from . import __version__
from .report import render_html, write_text_atomic
from .runner.core import BUNDLE_FORMAT, MANIFEST, bundle_files, sha256_file

RUNNER_DIR = Path(__file__).resolve().parent / "runner"
RUN_PY = '''#!/usr/bin/env python3
"""Run this bundle: python run.py --prompt "..." | --chat | serve | verify.
Needs only requirements.lock. Nothing from the bundle runs before its sha256 matches
manifest.json: the runner files imported first are checked here, every other file by them."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# No module comes from the bundle's directory until it is verified (a planted argparse.py or
# dataclasses/ would shadow the standard library), and no byte code is read or written there.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.dont_write_bytecode = True
sys.pycache_prefix = os.devnull
FIRST = ("phikit_runner/__init__.py", "phikit_runner/core.py", "phikit_runner/cli.py")


def first_files_changed():
    import hashlib
    import json

    try:
        with open(os.path.join(HERE, "manifest.json"), "rb") as f:
            files = json.load(f)["files"]
        for rel in FIRST:
            path = os.path.join(HERE, *rel.split("/"))
            if os.path.islink(path) or os.path.islink(os.path.dirname(path)):
                return f"{path}: a symbolic link (not allowed)"
            with open(path, "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != files.get(rel):
                    return f"{path}: sha256 does not match manifest.json (modified runner)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{HERE}: cannot verify the runner: {type(e).__name__}: {e}"
    return None


if __name__ == "__main__":
    problem = first_files_changed()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    sys.path.append(HERE)  # last: the standard library and the venv always come first
    from phikit_runner.cli import main

    sys.exit(main())
'''


def write_runner(bundle: Path, runtime_module: str) -> None:
    pkg = bundle / "phikit_runner"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""phikit bundle runner (standard library + one runtime)."""\n')
    for name in ("core.py", "cli.py", "server.py", "rpc.py", "worker.py",
                 f"{runtime_module}.py"):
        shutil.copy2(RUNNER_DIR / name, pkg / name)
    (bundle / "run.py").write_text(RUN_PY)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_report_html(bundle: Path, report: dict[str, Any], manifest: dict[str, Any]) -> Path:
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


def finish_manifest(bundle: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file and write manifest.json last (its presence marks a complete bundle)."""
    drop_runtime_caches(bundle)
    manifest = {"format": BUNDLE_FORMAT, "phikit": __version__, **manifest}
    manifest["files"] = {rel: sha256_file(bundle / rel) for rel in bundle_files(bundle)}
    write_json(bundle / MANIFEST, manifest)
    return manifest


def staging_dir(out: Path) -> Path:
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    return stage


def publish(stage: Path, out: Path, passed: bool) -> Path:
    """Move the staged bundle to `out` (passed) or `out.failed` (failed), replacing old ones."""
    final = out if passed else out.with_name(out.name + ".failed")
    for old in (out, out.with_name(out.name + ".failed")):
        if old.exists():
            shutil.rmtree(old)
    stage.rename(final)
    return final


def write_archive(bundle: Path, archive: Path) -> Path:
    """Deterministic .tar.gz: sorted entries, zero mtimes/owners, gzip header without time."""
    tmp = archive.with_name(archive.name + ".tmp")
    with open(tmp, "wb") as raw, \
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz, \
            tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for rel in [MANIFEST] + bundle_files(bundle):
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
