"""requirements.lock for a target's platform: exact versions + sha256 of the wheels pip picks.

pip itself resolves the runtime closure for the *target* platform (`pip download --platform ...`),
pinned to the versions this build used (installed versions and phikit's constraints, toolkit/data/constraints.txt), so a
bundle built on x86_64 Linux gets a lock that installs on, say, a Raspberry Pi.
"""

from __future__ import annotations

import email.parser
import hashlib
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .checkpoint import cache_root
from .errors import PhikitError
from .paths import CONSTRAINTS
from .runner.core import lock_install_args, sha256_file
from .schema import Platform

WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)-.*\.whl$")
SDIST = re.compile(r"^(?P<name>.+)-(?P<version>[^-]+)\.tar\.gz$")


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


def _pip_download(requirements: list[str], platform: Platform, dest: Path,
                  no_deps: bool = False) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
           "--only-binary=:all:", "--python-version", platform.python, "--implementation", "cp",
           "-d", str(dest)] + (["--no-deps"] if no_deps else [])
    for tag in platform.pip_platforms:
        cmd += ["--platform", tag]
    if CONSTRAINTS.is_file():
        cmd += ["-c", str(CONSTRAINTS)]
    proc = subprocess.run(cmd + requirements, capture_output=True, text=True)
    if proc.returncode != 0:
        err = "\n".join(proc.stderr.strip().splitlines()[-4:])
        raise PhikitError(f"cannot resolve the runtime lock for {platform.os}/{platform.arch} "
                          f"(python {platform.python}) with pip:\n{err}")


def _source_packages(requirements: list[str], dest: Path) -> list[str]:
    """Download source packages (platform-independent) and return their runtime dependencies,
    which are then resolved as wheels for the target platform like everything else."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
           "--no-deps", "--no-binary=:all:", "-d", str(dest)]
    proc = subprocess.run(cmd + requirements, capture_output=True, text=True)
    if proc.returncode != 0:
        err = "\n".join(proc.stderr.strip().splitlines()[-4:])
        raise PhikitError(f"cannot download the source packages {requirements}:\n{err}")
    deps = []
    for sdist in dest.glob("*.tar.gz"):
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.count("/") == 1
                          and m.name.endswith("/PKG-INFO"))
            info = email.parser.BytesParser().parsebytes(tar.extractfile(member).read())
        deps += [d.split(";")[0].replace(" ", "") for d in info.get_all("Requires-Dist") or []
                 if "extra ==" not in d]
    return deps


def _named(requirements: list[str], names: list[str]) -> list[str]:
    wanted = {_canonical(n) for n in names}
    return [r for r in requirements if _canonical(re.split(r"[=<>!~\[]", r)[0]) in wanted]


def resolve_lock(packages: list[str], platform: Platform, wheel_dir: Path | None = None,
                 source_builds: list[str] = (), without_dependencies: list[str] = ()) -> str:
    """The lock text; wheels land in `wheel_dir` (for bundles that carry them) if given.
    Packages named in `source_builds` are pinned as source packages (the device compiles them);
    those in `without_dependencies` are pinned alone. The lock is the whole closure, so it is
    installed with --no-deps."""
    requirements = sorted(pinned_requirements(packages))
    sources = _named(requirements, list(source_builds))
    alone = _named(requirements, list(without_dependencies))
    requirements = [r for r in requirements if r not in sources and r not in alone]
    constraints = CONSTRAINTS.read_bytes() if CONSTRAINTS.is_file() else b""
    key = hashlib.sha256(repr((requirements, sources, alone, platform.model_dump(),
                               constraints)).encode())
    cached = cache_root() / "locks" / f"{key.hexdigest()[:32]}.lock"
    if cached.is_file() and wheel_dir is None:
        return cached.read_text()
    with tempfile.TemporaryDirectory(prefix="phikit-lock-") as tmp:
        if sources:
            requirements += _source_packages(sources, Path(tmp))
        _pip_download(requirements, platform, Path(tmp))
        if alone:
            _pip_download(alone, platform, Path(tmp), no_deps=True)
        lines = []
        files = [*Path(tmp).glob("*.whl"), *Path(tmp).glob("*.tar.gz")]
        for file in sorted(files, key=lambda p: _canonical(p.name)):
            m = WHEEL.match(file.name) or SDIST.match(file.name)
            if not m:
                continue
            lines.append(f"{_canonical(m['name'])}=={m['version']} \\\n"
                         f"    --hash=sha256:{sha256_file(file)}")
            if wheel_dir is not None:
                wheel_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, wheel_dir / file.name)
    header = (f"# phikit runtime lock for {platform.os}/{platform.arch}, CPython {platform.python}\n"
              f"# platforms: {', '.join(platform.pip_platforms)}\n"
              f"# install: pip {' '.join(lock_install_args())}\n")
    if sources:
        header += (f"# built from source on the device (no {platform.arch} wheels): "
                   f"{', '.join(sources)}; needs a C/C++ compiler and cmake >= 3.21 "
                   "(Debian: apt install build-essential cmake)\n")
    if alone:
        header += (f"# locked without their declared dependencies (unused by the runner): "
                   f"{', '.join(alone)}\n")
    text = header + "\n".join(lines) + "\n"
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp_path.write_text(text)
    tmp_path.replace(cached)
    return text
