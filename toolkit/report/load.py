"""Reading a parity report from a bundle or a `phikit validate --json` file, and writing the
rendered pages so that no reader sees half a file."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PhikitError
from ..runner.core import MANIFEST
from .model import ParityReport

PARITY = "parity.json"


@dataclass
class LoadedReport:
    parity: ParityReport
    manifest: dict[str, Any] | None
    path: Path            # what the user named
    bundle: Path | None   # the bundle directory, when the report came from one

    @property
    def name(self) -> str:
        if self.manifest and self.manifest.get("name"):
            return str(self.manifest["name"])
        return (self.bundle or self.path).name


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PhikitError("no such file", file=path) from None
    except json.JSONDecodeError as e:
        raise PhikitError(f"invalid JSON: {e.msg} (column {e.colno})", file=path,
                          line=e.lineno) from None
    except UnicodeDecodeError:
        raise PhikitError("not a text file (invalid UTF-8)", file=path) from None
    except OSError as e:
        raise PhikitError(f"cannot read: {e.strerror}", file=path) from None


def check_report(report: Any, path: Path) -> ParityReport:
    """The typed report, upgraded from the version that wrote it; a PhikitError naming the file
    and the first field that is wrong otherwise."""
    try:
        return ParityReport.read(report)
    except ValueError as e:
        raise PhikitError(f"not a parity report ({e}); expected a bundle directory or the "
                          "JSON `phikit validate --json` writes", file=path) from None


def load_report(path: str | Path) -> LoadedReport:
    """A bundle directory, its parity.json or manifest.json, or a `phikit validate --json` file."""
    path = Path(path)
    bundle = None
    if path.is_dir():
        bundle = path
    elif path.name == MANIFEST or (path.name == PARITY and (path.parent / MANIFEST).is_file()):
        bundle = path.parent
    elif not path.exists():
        raise PhikitError("no such file or directory", file=path)
    if bundle is None:
        return LoadedReport(check_report(read_json(path), path), None, path, None)
    report_file = bundle / PARITY
    if not report_file.is_file():
        raise PhikitError(f"not a phikit bundle: no {PARITY} in it", file=bundle)
    manifest = None
    if (bundle / MANIFEST).is_file():
        manifest = read_json(bundle / MANIFEST)
        if not isinstance(manifest, dict):
            raise PhikitError("not a bundle manifest (not a JSON object)", file=bundle / MANIFEST)
    return LoadedReport(check_report(read_json(report_file), report_file), manifest, path, bundle)


def write_text_atomic(path: Path, text: str) -> None:
    """Readers (a CI artifact upload, a browser reload) never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # same directory: replace is atomic
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise PhikitError(f"cannot write: {e.strerror}", file=path) from None
