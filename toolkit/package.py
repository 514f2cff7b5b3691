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
from .runner.core import BUNDLE_FORMAT, IGNORED_PARTS, MANIFEST, bundle_files, sha256_file

RUNNER_DIR = Path(__file__).resolve().parent / "runner"
RUN_PY = '''#!/usr/bin/env python3
"""Run this bundle: python run.py --prompt "..." | --chat | serve | verify.
Needs only requirements.lock."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from phikit_runner.cli import main  # noqa: E402

if __name__ == "__main__":
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
    """Caches a runtime wrote while phikit validated the staged bundle (OpenVINO's compiled
    models, byte code) belong to this machine, not to the device."""
    for path in sorted(bundle.rglob("*"), reverse=True):
        if path.is_dir() and path.name in IGNORED_PARTS:
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
