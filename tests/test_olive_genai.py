"""pip-only QNN (issue 40): with no `make install` directory, a QNN build installs the
onnxruntime-genai that Olive's ModelBuilder pass imports itself, the version
toolkit/data/olive-genai.pin names (the Makefile reads the same file), into the user cache, whole
or not at all."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from toolkit.backends import olive_genai
from toolkit.errors import PhikitError


@pytest.fixture
def no_dir(tmp_path, monkeypatch):
    """A machine with no `make install` directory and an empty cache: only the install helps."""
    monkeypatch.setenv("PHIKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PHIKIT_OLIVE_GENAI", raising=False)
    monkeypatch.setattr(olive_genai, "candidates",
                        lambda: [tmp_path / "cache" / "olive-genai" / olive_genai.version()])
    return tmp_path


def test_the_makefile_and_the_code_read_one_pin():
    make = subprocess.run(["make", "-s", "-n", "-B", "olive-genai"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout
    assert f"onnxruntime-genai=={olive_genai.version()}" in make


@pytest.mark.slow
def test_a_qnn_build_installs_olives_runtime_once(no_dir, monkeypatch):
    path = olive_genai.ensure()
    assert path == olive_genai.candidates()[-1]
    # what Olive's subprocess does with it: import the module the 0.18 builder lacks, from there
    probe = subprocess.run(
        [sys.executable, "-c", "import onnxruntime_genai, onnxruntime_genai.models.quantized_model"
         " as q; print(onnxruntime_genai.__version__, q.__file__)"],
        env={"PYTHONPATH": str(path), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr[-2000:]
    version, module = probe.stdout.split()
    assert version == olive_genai.version() and module.startswith(str(path))
    assert olive_genai.installed_version(path) == olive_genai.version()
    # found again without pip
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip ran again"))
    assert olive_genai.ensure() == path


def test_no_index_is_one_clear_error_and_leaves_nothing(no_dir, monkeypatch):
    (no_dir / "empty").mkdir()
    monkeypatch.setenv("PIP_FIND_LINKS", str(no_dir / "empty"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(PhikitError, match="PHIKIT_OLIVE_GENAI"):
        olive_genai.ensure()
    dest = olive_genai.candidates()[-1]
    assert not dest.exists() and list(dest.parent.iterdir()) == []
