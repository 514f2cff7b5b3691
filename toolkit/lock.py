"""requirements.lock for a target's platform: exact versions + sha256 of the wheels pip picks.

pip itself resolves the runtime closure for the *target* platform (`pip download --platform ...`),
pinned to the versions this build used (installed versions and the repo's constraints.txt), so a
bundle built on x86_64 Linux gets a lock that installs on, say, a Raspberry Pi.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .checkpoint import cache_root
from .errors import PhikitError
from .runner.core import sha256_file
from .schema import Platform

CONSTRAINTS = Path(__file__).resolve().parent.parent / "constraints.txt"
WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)-.*\.whl$")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_requirements(packages: list[str]) -> list[str]:
    """Pin each unpinned package to the version installed here (what validation ran with)."""
    out = []
    for spec in packages:
        if re.search(r"[=<>!~]", spec):
            out.append(spec)
            continue
        try:
            out.append(f"{spec}=={md.version(spec)}")
        except md.PackageNotFoundError:
            out.append(spec)  # resolved by pip within the constraints
    return out


def _pip_download(requirements: list[str], platform: Platform, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
           "--only-binary=:all:", "--python-version", platform.python, "--implementation", "cp",
           "-d", str(dest)]
    for tag in platform.pip_platforms:
        cmd += ["--platform", tag]
    if CONSTRAINTS.is_file():
        cmd += ["-c", str(CONSTRAINTS)]
    proc = subprocess.run(cmd + requirements, capture_output=True, text=True)
    if proc.returncode != 0:
        err = "\n".join(proc.stderr.strip().splitlines()[-4:])
        raise PhikitError(f"cannot resolve the runtime lock for {platform.os}/{platform.arch} "
                          f"(python {platform.python}) with pip:\n{err}")


def resolve_lock(packages: list[str], platform: Platform, wheel_dir: Path | None = None) -> str:
    """The lock text; wheels land in `wheel_dir` (for bundles that carry them) if given."""
    requirements = sorted(pinned_requirements(packages))
    constraints = CONSTRAINTS.read_bytes() if CONSTRAINTS.is_file() else b""
    key = hashlib.sha256(repr((requirements, platform.model_dump(), constraints)).encode())
    cached = cache_root() / "locks" / f"{key.hexdigest()[:32]}.lock"
    if cached.is_file() and wheel_dir is None:
        return cached.read_text()
    with tempfile.TemporaryDirectory(prefix="phikit-lock-") as tmp:
        _pip_download(requirements, platform, Path(tmp))
        lines = []
        for wheel in sorted(Path(tmp).glob("*.whl"), key=lambda p: _canonical(p.name)):
            m = WHEEL.match(wheel.name)
            if not m:
                continue
            lines.append(f"{_canonical(m['name'])}=={m['version']} \\\n"
                         f"    --hash=sha256:{sha256_file(wheel)}")
            if wheel_dir is not None:
                wheel_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy2(wheel, wheel_dir / wheel.name)
    header = (f"# phikit runtime lock for {platform.os}/{platform.arch}, CPython {platform.python}\n"
              f"# platforms: {', '.join(platform.pip_platforms)}\n"
              f"# install: pip install --require-hashes -r requirements.lock\n")
    text = header + "\n".join(lines) + "\n"
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp_path.write_text(text)
    tmp_path.replace(cached)
    return text
