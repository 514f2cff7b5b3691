"""pip-only GGUF (issue 40): with no checkout, phikit fetches llama.cpp's converter itself, the
llama-cpp-python sdist and sha256 that toolkit/data/llama-cpp.pin names (the Makefile reads the
same file). The sdist comes from a local folder (PIP_FIND_LINKS, pip's own setting) holding the
one `make llama-cpp` downloaded; pip takes the sdist's build backend from the configured index,
and the test skips when that is unreachable."""

from __future__ import annotations

import filecmp
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO
from toolkit.backends import llama_cpp_source as src
from toolkit.errors import PhikitError

MAKE_TREE = Path(sys.prefix) / "share" / "phikit" / "llama.cpp"
SDIST_DIR = Path(sys.prefix) / "share" / "phikit" / "src"


def local_sdist() -> Path:
    sdist = SDIST_DIR / f"{src.pin().stem}.tar.gz"
    if not sdist.is_file():
        pytest.skip(f"no pinned sdist at {sdist} (make llama-cpp downloads it)")
    return sdist


@pytest.fixture
def no_tree(tmp_path, monkeypatch):
    """A machine with no `make install` tree and an empty cache: only the fetch can help."""
    monkeypatch.setenv("PHIKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PHIKIT_LLAMA_CPP", raising=False)
    monkeypatch.setattr(src, "candidates", lambda: [src.cache_dir()])
    return tmp_path


def index_of(folder: Path, monkeypatch, only: bool = False) -> None:
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    if only:
        monkeypatch.setenv("PIP_NO_INDEX", "1")


def test_the_makefile_and_the_code_read_one_pin():
    make = subprocess.run(["make", "-s", "-n", "llama-cpp"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout
    pin = src.pin()
    assert f'"llama-cpp-python=={pin.version}"' in make
    assert f"{pin.sha256}  " in make  # what `sha256sum -c` checks
    extras = (REPO / "pyproject.toml").read_text()
    assert f'"llama-cpp-python=={pin.version}"' in extras  # the quantizer: the same llama.cpp
    assert not re.search(r"LLAMA_CPP_SHA256\s*:=\s*[0-9a-f]{64}", (REPO / "Makefile").read_text())


def test_a_build_fetches_the_pinned_converter(no_tree, monkeypatch):
    """ensure() downloads through pip, checks the sha256, unpacks the converter tree into the
    user cache; the fetched converter runs and is byte for byte make's."""
    index_of(local_sdist().parent, monkeypatch)
    logs: list[str] = []
    try:
        tree = src.ensure(logs.append)
    except PhikitError as e:
        if "build" in str(e) or "satisfies the requirement" in str(e):
            pytest.skip(f"the sdist's build backend is not on a reachable index: {e}")
        raise
    assert tree == src.cache_dir() and tree.is_relative_to(no_tree / "cache")
    assert any("pip download llama-cpp-python==" in line for line in logs)
    assert (tree / "SOURCE").read_text().strip() == src.source_line()
    proc = subprocess.run([sys.executable, str(tree / src.CONVERTER), "--help"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--outtype" in proc.stdout, proc.stderr[-2000:]
    if MAKE_TREE.is_dir():
        cmp = filecmp.dircmp(MAKE_TREE, tree)
        assert not cmp.left_only and not cmp.right_only and not cmp.diff_files
    # the second build finds it: no download (an index that has nothing would fail it)
    index_of(no_tree / "empty", monkeypatch, only=True)
    assert src.ensure() == tree


def test_a_sdist_that_is_not_the_pinned_one_is_refused(no_tree, monkeypatch):
    forged = no_tree / "index"
    forged.mkdir()
    sdist = local_sdist()
    copy = forged / sdist.name
    shutil.copy(sdist, copy)
    with open(copy, "ab") as f:
        f.write(b"\0")  # still a valid gzip stream to pip; another sha256
    # pip's side stubbed (two files of one version on two indexes: pip may take either)
    monkeypatch.setattr(src, "pip_download", lambda into: (
        into.mkdir(parents=True), shutil.copy(copy, into / copy.name),
        subprocess.CompletedProcess([], 0, "", ""))[-1])
    with pytest.raises(PhikitError, match="refusing it"):
        src.ensure()
    assert not (src.cache_dir() / src.CONVERTER).exists()


def test_no_index_is_one_clear_error(no_tree, monkeypatch):
    (no_tree / "empty").mkdir()
    index_of(no_tree / "empty", monkeypatch, only=True)
    with pytest.raises(PhikitError, match="PHIKIT_LLAMA_CPP"):
        src.ensure()


def test_the_doctor_hint_pastes():
    """The hint names the installed package's constraints file by absolute path (it exists),
    with the extra quoted so that a shell keeps `[gguf]`."""
    from toolkit.backends import BACKENDS

    hint = BACKENDS["gguf"].install
    m = re.match(r'pip install -c (\S+) "phikit\[gguf\]"', hint)
    assert m and Path(m.group(1)).is_file() and Path(m.group(1)).is_absolute(), hint
    assert "==" in Path(m.group(1)).read_text()


def test_the_package_index_serves_the_pinned_sdist(tmp_path):
    """The real index (the only network a test may use): the pinned version's sdist is there
    with the pinned sha256, so a pip-only user's fetch can succeed."""
    import json

    try:
        with urllib.request.urlopen(f"https://pypi.org/pypi/llama-cpp-python/"
                                    f"{src.pin().version}/json", timeout=20) as r:
            files = json.load(r)["urls"]
    except OSError as e:
        pytest.skip(f"the package index is unreachable here: {e}")
    sdists = [f for f in files if f["packagetype"] == "sdist"]
    assert [f["digests"]["sha256"] for f in sdists] == [src.pin().sha256]
