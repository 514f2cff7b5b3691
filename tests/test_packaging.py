"""phikit as a Python package (issue 19): the wheel carries one extra per backend and the
recipes, targets, eval sets and embedded model; installed from the wheel alone, away from any
checkout, `phikit list` and `phikit build --dry-run` find them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # from a copy: setuptools keeps a build/ directory in the source tree, and a stale one
    # would put modules into the wheel that the source no longer has
    src = tmp_path_factory.mktemp("src")
    for part in ("toolkit", "recipes", "targets", "evalsets", "models/tiny-phi3"):
        shutil.copytree(REPO / part, src / part,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(src)], check=True, timeout=600)
    (path,) = out.glob("phikit-*.whl")
    return path


def test_the_wheel_carries_extras_and_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA")))
    extras = {line.split(": ")[1] for line in metadata.decode().splitlines()
              if line.startswith("Provides-Extra")}
    assert {"onnx", "openvino", "mlx", "gguf", "qnn"} <= extras
    data = [n.split("/data/share/phikit/", 1)[1] for n in names if "/data/share/phikit/" in n]
    assert {"recipes/tiny-phi3-int4.yaml", "targets/generic-cpu.yaml", "evalsets/tiny-phi3.jsonl",
            "models/tiny-phi3/model.safetensors"} <= set(data)


def test_installed_from_the_wheel_alone(wheel, tmp_path):
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   timeout=600)
    # phikit's dependencies from this environment (a .pth line), phikit itself from the wheel
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "zz-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    phikit = venv / "bin" / "phikit"
    where = subprocess.run([str(py), "-c", "import toolkit.paths as p; print(p.REPO)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert where.stdout.strip() == str(venv / "share" / "phikit"), where.stderr
    listed = subprocess.run([str(phikit), "list"], capture_output=True, text=True, cwd=tmp_path)
    assert listed.returncode == 0 and "tiny-phi3-int4" in listed.stdout and \
        "generic-cpu" in listed.stdout, listed.stderr
    plan = subprocess.run([str(phikit), "build", "tiny-phi3-int4", "--target", "generic-cpu",
                           "--dry-run"], capture_output=True, text=True, cwd=tmp_path)
    assert plan.returncode == 0 and str(venv / "share" / "phikit" / "models") in plan.stdout, \
        plan.stderr
