"""`phikit ci init --github` writes a workflow that runs (issue 40), proved by running it: every
job's `run:` steps in order, in a fresh venv each (no checkout, no phikit cache of this session),
in a repository of recipes that is not phikit's; phikit comes from a wheel of this tree (the
--spec a user gives for an unreleased phikit). The `uses:` steps are played by this test:
checkout is the repository folder, setup-python a fresh venv, artifacts are folders; the pip and
phikit caches are not restored (a first run). The only network is the package index."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, build_wheel, reachable

pytestmark = [pytest.mark.slow, pytest.mark.longest, pytest.mark.xdist_group("test_ci_workflow")]
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"




def user_repository(root: Path) -> Path:
    """A repository of one's own: a recipe, the checkpoint and eval set it names, relatively."""
    (root / "recipes").mkdir(parents=True)
    shutil.copy(REPO / "recipes" / "tiny-phi3-int4.yaml", root / "recipes" / "mine.yaml")
    shutil.copytree(REPO / "models" / "tiny-phi3", root / "models" / "tiny-phi3")
    (root / "evalsets").mkdir()
    shutil.copy(REPO / "evalsets" / "tiny-phi3.jsonl", root / "evalsets")
    return root




class Runner:
    """Plays one GitHub Actions job on this machine."""

    def __init__(self, repo: Path, work: Path, env: dict[str, str], notes: list[str]):
        self.repo, self.work, self.env, self.notes = repo, work, env, notes
        self.artifacts = work / "artifacts"

    def expand(self, text: str, matrix: dict, index: int) -> str:
        text = re.sub(r"\$\{\{\s*matrix\.(\w+)\s*\}\}", lambda m: str(matrix[m.group(1)]), text)
        return text.replace("${{ strategy.job-index }}", str(index))

    def job(self, name: str, job: dict, matrix: dict | None = None, index: int = 0) -> Path:
        venv = self.work / f"venv-{name}-{index}"
        env = dict(self.env)
        summary = self.work / f"summary-{name}-{index}.md"
        for step in job["steps"]:
            uses = step.get("uses", "")
            with_ = {k: self.expand(str(v), matrix or {}, index)
                     for k, v in step.get("with", {}).items()}
            if uses.startswith("actions/checkout"):
                continue  # the repository folder is the checkout
            if uses.startswith("actions/setup-python"):
                dep = with_.get("cache-dependency-path")
                assert dep and (self.repo / dep).is_file(), \
                    f"setup-python's pip cache needs {dep} in the repository"
                base = getattr(sys, "_base_executable", sys.executable)
                subprocess.run([base, "-m", "venv", str(venv)], check=True)
                env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
                env["VIRTUAL_ENV"] = str(venv)
                continue
            if uses.startswith("actions/cache"):
                for pattern in re.findall(r"'([^']+)'", with_["key"]):
                    assert (self.repo / pattern).is_file(), f"hashFiles({pattern}): no such file"
                continue  # a first run: nothing restored
            if uses.startswith("actions/upload-artifact"):
                src = Path(os.path.expanduser(with_["path"].replace("~", env["HOME"], 1)))
                src = src if src.is_absolute() else self.repo / src
                if src.exists():
                    shutil.copytree(src, self.artifacts / with_["name"], dirs_exist_ok=True)
                continue
            if uses.startswith("actions/download-artifact"):
                dest = Path(with_["path"].replace("~", env["HOME"], 1))
                dest = dest if dest.is_absolute() else self.repo / dest
                names = ([with_["name"]] if "name" in with_ else
                         [p.name for p in self.artifacts.glob(with_["pattern"])])
                for artifact in names:
                    shutil.copytree(self.artifacts / artifact, dest, dirs_exist_ok=True)
                continue
            assert not uses, f"a step this test cannot play: {uses}"
            command = self.expand(step["run"], matrix or {}, index)
            if TORCH_INDEX in command and not reachable(TORCH_INDEX + "/torch/"):
                command = command.replace(f"--index-url {TORCH_INDEX}", "")
                self.notes.append(f"{TORCH_INDEX} unreachable: torch==2.13.0 from the "
                                  "configured index instead")
            proc = subprocess.run(["bash", "-e", "-c", command], cwd=self.repo,
                                  env={**env, "GITHUB_STEP_SUMMARY": str(summary)},
                                  capture_output=True, text=True, timeout=2400)
            assert proc.returncode == 0, (f"[{name}] {command}\n{proc.stdout[-3000:]}\n"
                                          f"{proc.stderr[-3000:]}")
        return venv


def test_the_generated_github_workflow_runs_in_fresh_venvs(tmp_path):
    wheel = build_wheel(tmp_path / "wheel", tmp_path / "src")
    repo = user_repository(tmp_path / "repo")
    home = tmp_path / "home"
    home.mkdir()
    # a runner's environment: its own HOME (so no phikit or HF cache of this session), the
    # machine's pip settings (the package index) kept
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PHIKIT", "HF_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), PATH=os.environ["PATH"])
    spec = f"phikit[onnx] @ {wheel.as_uri()}"
    init = subprocess.run([sys.executable, "-m", "toolkit.cli", "ci", "init", "recipes/mine.yaml",
                           "-t", "generic-cpu", "--github", "--spec", spec,
                           "-o", ".github/workflows/phikit.yml"], cwd=repo,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=300)
    assert init.returncode == 0, init.stderr
    workflow = yaml.safe_load((repo / ".github" / "workflows" / "phikit.yml").read_text())
    jobs = workflow["jobs"]
    notes: list[str] = []
    runner = Runner(repo, tmp_path / "runner", env, notes)

    runner.job("reference", jobs["reference"])
    assert list((runner.artifacts / "phikit-reference").glob("*.npz")), "no reference shared"
    matrix = jobs["build"]["strategy"]["matrix"]
    cells = [{"recipe": r, "target": t} for r in matrix["recipe"] for t in matrix["target"]]
    for i, cell in enumerate(cells):
        build_venv = runner.job("build", jobs["build"], cell, i)
    assert (repo / "dist" / "mine-generic-cpu" / "manifest.json").is_file()
    vision = subprocess.run([str(build_venv / "bin" / "python"), "-m", "pip", "show",
                             "torchvision"], capture_output=True, text=True)
    assert vision.returncode != 0, "torchvision left in the build job's venv"

    shutil.rmtree(repo / "dist")  # the summary job has only the uploaded bundles
    summary_venv = runner.job("summary", jobs["summary"])
    text = (runner.work / "summary-summary-0.md").read_text()
    assert "PASS — tiny-phi3-int4" in text and "FAIL" not in text, text[-2000:]
    for heavy in ("torch", "transformers", "onnxruntime"):
        proc = subprocess.run([str(summary_venv / "bin" / "python"), "-m", "pip", "show", heavy],
                              capture_output=True, text=True)
        assert proc.returncode != 0, f"the summary job installed {heavy}"
    print("\n".join(notes))
