"""`phikit ci`: every recipe x target built, one verdict for the job (issue 19)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from conftest import REPO, phikit
from toolkit.ci_init import phikit_commands

pytestmark = pytest.mark.slow


def test_a_gate_that_passes_then_one_that_fails(tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    proc = phikit("ci", "run", "recipes/tiny-phi3-int4.yaml", "--target", "generic-cpu",
                  "--target", "intel-cpu", "--out", tmp_path / "dist", "--junit",
                  tmp_path / "j.xml", check=0, timeout=1800)
    text = summary.read_text()
    assert "2 of 2 builds pass" in text and text.count("| PASS |") == 2
    suites = ET.parse(tmp_path / "j.xml").getroot()
    assert suites.tag == "testsuites" and len(suites) == 2
    assert all(s.get("failures") == "0" for s in suites)

    # the same recipe held to a bound no int4 bundle meets: exit 1, the failed check named
    strict = tmp_path / "strict.yaml"
    strict.write_text((REPO / "recipes" / "tiny-phi3-int4.yaml").read_text()
                      .replace("name: tiny-phi3-int4", "name: strict")
                      .replace("../", f"{REPO}/") + "thresholds:\n  kld_mean_max: 1.0e-9\n")
    proc = phikit("ci", "run", strict, "no-such-target", "--target", "generic-cpu", "--out",
                  tmp_path / "dist", "--markdown", tmp_path / "m.md", check=2, timeout=1800)
    text = (tmp_path / "m.md").read_text()
    assert "| FAIL |" in text and "kld_mean" in text
    assert "| ERROR |" in text and "no-such-target" in text  # a recipe that is not there
    assert "Traceback" not in proc.stderr


def test_ci_init_workflows_and_their_steps_run_here(tmp_path):
    """The generated GitHub workflow and GitLab pipeline, and every phikit command their jobs
    run executed here in order on the tiny model (a local dry run of the jobs)."""
    repo = tmp_path / "repo"
    (repo / "recipes").mkdir(parents=True)
    shutil.copy(REPO / "recipes" / "tiny-phi3-int4.yaml", repo / "recipes" / "tiny.yaml")
    shutil.copytree(REPO / "models" / "tiny-phi3", repo / "models" / "tiny-phi3")
    shutil.copytree(REPO / "evalsets", repo / "evalsets")
    recipes, targets = ["recipes/tiny.yaml"], ["generic-cpu", "intel-cpu"]
    args = ["ci", "init", *recipes, "-t", targets[0], "-t", targets[1]]

    def in_repo(*argv: str, check: int) -> subprocess.CompletedProcess:
        """ci init runs from the repository's root: the recipes are paths in it."""
        proc = subprocess.run([sys.executable, "-m", "toolkit.cli", *argv], cwd=repo,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == check, proc.stdout + proc.stderr
        return proc

    workflow = yaml.safe_load(in_repo(*args, "--github", check=0).stdout)
    build = workflow["jobs"]["build"]
    assert build["needs"] == "reference"
    assert build["strategy"]["matrix"] == {"recipe": recipes, "target": targets}
    runs = [s.get("run", "") for s in build["steps"]]
    assert any("phikit build ${{ matrix.recipe }}" in r for r in runs)
    assert any("GITHUB_STEP_SUMMARY" in r for r in runs)
    pipeline = yaml.safe_load(in_repo(*args, "--gitlab", check=0).stdout)
    assert pipeline["phikit-build"]["parallel"]["matrix"] == [{"RECIPE": recipes,
                                                               "TARGET": targets}]
    assert pipeline["phikit-build"]["artifacts"]["reports"]["junit"] == "phikit-junit.xml"
    in_repo("ci", "init", *recipes, "-t", "generic-cpu", check=2)  # neither --github nor --gitlab
    # a recipe that names an absolute path would build on this machine only: refused, named
    (repo / "recipes" / "abs.yaml").write_text((repo / "recipes" / "tiny.yaml").read_text()
                                               .replace("../models", f"{repo}/models"))
    refused = in_repo("ci", "init", "recipes/abs.yaml", "-t", "generic-cpu", "--github", check=2)
    assert "source" in refused.stderr and "absolute path" in refused.stderr
    assert "Traceback" not in refused.stderr
    (repo / "recipes" / "abs.yaml").unlink()

    phikit_bin = Path(sys.executable).parent / "phikit"
    env = {**os.environ, "PHIKIT_CACHE": os.environ.get("PHIKIT_CACHE", str(tmp_path / "c"))}
    outputs = []
    for command in phikit_commands(recipes, targets):
        argv = [str(phikit_bin), *shlex.split(command)[1:]]
        argv = [str(p) for a in argv for p in (sorted(repo.glob(a)) if "*" in a else [a])]
        proc = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True,
                              timeout=1800)
        assert proc.returncode == 0, f"{command}: {proc.stderr[-2000:]}"
        outputs.append(proc.stdout)
    assert "reference" in outputs[0]
    assert "2 of 2 reports pass" in outputs[-1] and outputs[-1].count("| PASS |") == 2


def test_generated_workflows_pass_the_published_ci_schemas(tmp_path):
    """`ci init` output and the examples under examples/ci, against the GitHub Actions and
    GitLab CI JSON schemas that check-jsonschema vendors (SchemaStore's)."""
    check = (shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
             or shutil.which("check-jsonschema"))
    assert check, "check-jsonschema is not installed (requirements.txt installs it)"
    args = ["ci", "init", "recipes/tiny-phi3-int4.yaml", "-t", "generic-cpu", "-t", "intel-cpu"]
    github, gitlab = tmp_path / "phikit.yml", tmp_path / ".gitlab-ci.yml"
    github.write_text(phikit(*args, "--github", check=0).stdout)
    gitlab.write_text(phikit(*args, "--gitlab", check=0).stdout)
    examples = REPO / "examples" / "ci"
    for schema, files in (("vendor.github-workflows", [github, examples / "github-actions.yml"]),
                          ("vendor.gitlab-ci", [gitlab, examples / "gitlab-ci.yml"])):
        proc = subprocess.run([check, "--builtin-schema", schema, *map(str, files)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    # a broken workflow is refused: the check sees the schema, not only YAML syntax
    broken = tmp_path / "broken.yml"
    broken.write_text(github.read_text().replace("runs-on:", "runs_on:", 1))
    proc = subprocess.run([check, "--builtin-schema", "vendor.github-workflows", str(broken)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
