"""phikit as a Python package (issue 19): the wheel carries one extra per backend and the
recipes, targets, eval sets and embedded model; installed from the wheel alone, away from any
checkout, `phikit list` and `phikit build --dry-run` find them."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO, build_wheel

# one worker runs the module: its fixture builds the wheel once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_packaging")]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("src"))


def test_the_wheel_carries_extras_and_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA")))
    extras = {line.split(": ")[1] for line in metadata.decode().splitlines()
              if line.startswith("Provides-Extra")}
    assert {"onnx", "openvino", "mlx", "gguf", "qnn"} <= extras
    data = [n.split("/data/share/phikit/", 1)[1] for n in names if "/data/share/phikit/" in n]
    assert {"recipes/tiny-phi3-int4.yaml", "targets/generic-cpu.yaml", "evalsets/tiny-phi3.jsonl",
            "models/tiny-phi3/model.safetensors"} <= set(data)
    # every recipe the wheel lists can be built from it: a local source is a model it carries
    wheel_zip = zipfile.ZipFile(wheel)
    for name in names:
        if "/data/share/phikit/recipes/" in name:
            recipe = yaml.safe_load(wheel_zip.read(name))
            source = recipe["source"]
            if source.startswith("../"):
                assert f"{source[3:]}/model.safetensors" in data, f"{name}: {source} not carried"
            eval_file = recipe.get("eval", {}).get("file")
            if eval_file:
                assert eval_file[3:] in data, f"{name}: {eval_file} not carried"
    # package data: what `pip install -c <path phikit prints>` and the GGUF fetch read
    assert {"toolkit/data/constraints.txt", "toolkit/data/llama-cpp.pin",
            "toolkit/data/evalset-real.jsonl"} <= set(names)


def test_extras_pin_what_the_constraints_verified():
    """constraints.txt stays the one truth: every extra's pin is its version there; the cuda
    extra's runtime is the one the nvidia-cuda target locks."""
    import re
    import tomllib

    import yaml

    def name(req: str) -> str:
        return re.split(r"[\[=<>!~; ]", req, 1)[0].lower().replace("_", "-")

    pins = {name(line): line.split("==", 1)[1].split("+")[0]
            for line in (REPO / "toolkit" / "data" / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    target = yaml.safe_load((REPO / "targets" / "nvidia-cuda.yaml").read_text())
    cuda = {name(r): r.split("==")[1] for r in target["runtime"]["packages"]["onnx"] if "==" in r}
    for extra, requirements in extras.items():
        for req in requirements:
            if req.startswith("phikit["):
                continue
            version = re.search(r"==([^;\s]+)", req)
            assert version, f"[{extra}] {req} is not pinned"
            expected = cuda.get(name(req)) if extra == "cuda" and name(req) in cuda else \
                pins.get(name(req))
            assert version.group(1) == expected, f"[{extra}] {req}: constraints say {expected}"


@pytest.mark.longest
def test_one_extra_into_a_fresh_venv_runs_the_demo(wheel, tmp_path):
    """What a user does: a new venv away from any checkout, torch's CPU wheel, then the wheel
    with the `openvino` extra and constraints.txt, and `phikit demo --target intel-cpu` from an
    empty directory. The session's PHIKIT_CACHE is shared, so the demo's conversions and
    validations are the ones this session measured (nothing installed here is trusted for more
    than running them)."""
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"

    def pip(*args: str) -> None:
        proc = subprocess.run([str(py), "-m", "pip", "install", "-q",
                               "--disable-pip-version-check", *args], capture_output=True,
                              text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]

    pip("torch==2.13.0")  # the CPU wheel first, as the README says
    pip("-c", str(REPO / "toolkit" / "data" / "constraints.txt"),
        f"phikit[openvino] @ {wheel.as_uri()}")
    empty = tmp_path / "empty"
    empty.mkdir()
    phikit = venv / "bin" / "phikit"
    where = subprocess.run([str(py), "-c", "import toolkit.paths as p; print(p.REPO)"],
                           capture_output=True, text=True, cwd=empty)
    assert where.stdout.strip() == str(venv / "share" / "phikit"), where.stderr

    def doctor() -> dict:
        proc = subprocess.run([str(phikit), "doctor", "--json"], capture_output=True,
                              text=True, cwd=empty, timeout=300)
        return {r["name"]: r for r in json.loads(proc.stdout)[0]["rows"]}

    # optimum-intel pulls PyPI's torchvision, built for CUDA torch: with the CPU wheel it breaks
    # transformers' model imports. doctor says so and what to do; the README's step does it.
    rows = doctor()
    if "torchvision" in subprocess.run([str(py), "-m", "pip", "list"], capture_output=True,
                                       text=True).stdout:
        assert "broken" in rows["torch"]["status"] and "pip uninstall torchvision" in \
            rows["torch"]["why"]
        subprocess.run([str(py), "-m", "pip", "uninstall", "-q", "-y", "torchvision"],
                       check=True)
        rows = doctor()
    assert "usable" in rows["torch"]["status"] and "usable" in rows["openvino"]["status"]
    assert "no" in rows["gguf"]["status"] and "phikit[gguf]" in rows["gguf"]["why"]
    # the hint pastes: its -c path is the installed package's own constraints file
    hint_path = rows["gguf"]["why"].split("pip install -c ", 1)[1].split(" ", 1)[0]
    assert Path(hint_path).is_file() and str(venv) in hint_path, rows["gguf"]["why"]
    demo = subprocess.run([str(phikit), "demo", "--target", "intel-cpu", "--out", "dist"],
                          capture_output=True, text=True, cwd=empty, timeout=1800)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert sorted(p.name for p in (empty / "dist").iterdir()) == [
        f"tiny-phi3-{p}-intel-cpu" for p in ("fp32", "int4", "int8")]
    assert "FAIL" not in demo.stdout
    refused = subprocess.run([str(phikit), "demo", "--target", "ollama"], capture_output=True,
                             text=True, cwd=empty)
    assert refused.returncode == 2 and "phikit doctor" in refused.stderr
