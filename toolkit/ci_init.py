"""`phikit ci init --github | --gitlab`: a CI workflow for a repository of recipes. The CI system
is the distributed engine: one job computes the transformers references once and shares them as
an artifact, one job per recipe x target builds and gates (a matrix), one job renders the
combined table; pip, HF_HOME and PHIKIT_CACHE are cached; bundles and reports (the `.failed`
ones too) are uploaded. `phikit_commands` lists the phikit commands the jobs run, in order, so a
test can run them on the tiny model as a local dry run of the workflow."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .errors import PhikitError

# the extras the targets' backends need, at the version that wrote the workflow
PHIKIT_SPEC = f"phikit[onnx,openvino]=={__version__}"
GITHUB_PATH = ".github/workflows/phikit.yml"
# the CPU wheel first: a plain `torch` requirement would pull the CUDA build
TORCH_CPU = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
CONSTRAINTS = '"$(python -m toolkit.installing constraints)"'
# optimum-intel requires torchvision and phikit does not use it; PyPI's build of it is CUDA's,
# which breaks every transformers model import beside torch's CPU wheel
NO_TORCHVISION = "pip uninstall -y torchvision"


def install_commands(spec: str) -> list[str]:
    """A build job's install: torch's CPU wheel, phikit itself (for its constraints file), then
    its extras within those constraints."""
    return [TORCH_CPU, f"pip install --no-deps {_q(spec)}",
            f"pip install -c {CONSTRAINTS} {_q(spec)}", NO_TORCHVISION]


def report_install_commands(spec: str) -> list[str]:
    """The summary job's install: phikit without its dependencies, then the `report` extra."""
    return [f"pip install --no-deps {_q(spec)}",
            "python -m toolkit.installing report > phikit-report.txt",
            f"pip install -c {CONSTRAINTS} -r phikit-report.txt"]


def _q(spec: str) -> str:
    return "'" + spec.replace("'", "'\\''") + "'"


def repo_paths(recipes: list[str], root: Path | None = None) -> list[str]:
    """The recipes as paths relative to the repository root (here): a runner checks the
    repository out elsewhere, so an absolute path, or one outside it, would not be found."""
    root = (root or Path.cwd()).resolve()
    out = []
    for recipe in recipes:
        full = (root / recipe).resolve()
        if not full.is_file():
            raise PhikitError("recipe not found (ci init takes paths in the repository, from "
                              "its root)", file=recipe)
        if not full.is_relative_to(root):
            raise PhikitError(f"outside the repository {root}: a CI runner would not have it",
                              file=recipe)
        _relative_fields(full)
        out.append(full.relative_to(root).as_posix())
    return out


def _relative_fields(recipe: Path) -> None:
    """A recipe whose own paths are absolute builds on this machine only."""
    data = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
    fields = {"source": data.get("source"),
              "eval.file": (data.get("eval") or {}).get("file"),
              "quantization.calibration": (data.get("quantization") or {}).get("calibration")}
    for field, value in fields.items():
        if isinstance(value, str) and os.path.isabs(os.path.expanduser(value)):
            raise PhikitError(f"absolute path {value}: a CI runner checks the repository out "
                              "elsewhere; write it relative to the recipe (phikit init does)",
                              file=recipe, field=field)


class _Dumper(yaml.SafeDumper):
    """Plain YAML for CI systems: no anchors for repeated steps, multi-line strings as blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(str, lambda d, v: d.represent_scalar(
    "tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def _dump(header: str, data: dict) -> str:
    return header + yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=4096)


def reference_command(recipes: list[str]) -> str:
    return "phikit ci reference " + " ".join(recipes)


def build_command(recipe: str, target: str) -> str:
    return f"phikit build {recipe} --target {target} --out dist/{_stem(recipe)}-{target}"


SUMMARY_COMMAND = "phikit report dist/* --markdown"


def _stem(recipe: str) -> str:
    return recipe.rsplit("/", 1)[-1].removesuffix(".yaml").removesuffix(".yml")


def phikit_commands(recipes: list[str], targets: list[str]) -> list[str]:
    """The phikit commands of the workflow, in the order its jobs run them."""
    return ([reference_command(recipes)]
            + [build_command(r, t) for r in recipes for t in targets] + [SUMMARY_COMMAND])


def github(recipes: list[str], targets: list[str], spec: str = PHIKIT_SPEC,
           path: str = GITHUB_PATH) -> str:
    """`path`: where the workflow is committed; setup-python keys its pip cache on that file,
    which exists on every run and changes when the install lines do."""
    setup = [{"uses": "actions/checkout@v4"},
             {"uses": "actions/setup-python@v5", "with": {
                 "python-version": "3.11", "cache": "pip", "cache-dependency-path": path}}]
    install = [*setup, *({"run": c} for c in install_commands(spec)),
               {"uses": "actions/cache@v4", "with": {
                   "path": "~/.cache/huggingface\n~/.cache/phikit/artifacts",
                   "key": "phikit-${{ hashFiles(%s) }}" % ", ".join(
                       f"'{r}'" for r in [*recipes, path]),
                   "restore-keys": "phikit-"}}]
    reference_dir = "~/.cache/phikit/reference"
    workflow: dict[str, Any] = {
        "name": "phikit quantization gate",
        "on": {"pull_request": {}, "workflow_dispatch": {}},
        "jobs": {
            "reference": {
                "runs-on": "ubuntu-24.04",
                "steps": [*install, {"run": reference_command(recipes)},
                          {"uses": "actions/upload-artifact@v4",
                           "with": {"name": "phikit-reference", "path": reference_dir}}]},
            "build": {
                "needs": "reference", "runs-on": "ubuntu-24.04",
                "strategy": {"fail-fast": False,
                             "matrix": {"recipe": recipes, "target": targets}},
                "steps": [*install,
                          {"uses": "actions/download-artifact@v4",
                           "with": {"name": "phikit-reference", "path": reference_dir}},
                          {"run": build_command("${{ matrix.recipe }}", "${{ matrix.target }}")
                           .replace("dist/${{ matrix.recipe }}", "dist/$(basename "
                                    "${{ matrix.recipe }} .yaml)")},
                          {"if": "always()",
                           "run": f'{SUMMARY_COMMAND} >> "$GITHUB_STEP_SUMMARY" || true'},
                          {"if": "always()", "uses": "actions/upload-artifact@v4",
                           "with": {"name": "bundle-${{ strategy.job-index }}",
                                    "path": "dist/", "if-no-files-found": "ignore"}}]},
            "summary": {
                "needs": "build", "if": "always()", "runs-on": "ubuntu-24.04",
                "steps": [*setup, *({"run": c} for c in report_install_commands(spec)),
                          {"uses": "actions/download-artifact@v4",
                           "with": {"pattern": "bundle-*", "path": "dist",
                                    "merge-multiple": True}},
                          {"run": f'{SUMMARY_COMMAND} >> "$GITHUB_STEP_SUMMARY"'}]},
        },
    }
    return _dump(f"# Written by `phikit ci init --github`: commit it as {path}\n", workflow)


def gitlab(recipes: list[str], targets: list[str], spec: str = PHIKIT_SPEC) -> str:
    install = install_commands(spec)
    pipeline: dict[str, Any] = {
        "stages": ["reference", "build", "summary"],
        "default": {"image": "python:3.11-bookworm",
                    "cache": {"key": "phikit", "paths": [".pip-cache/", ".hf/",
                                                          ".phikit-cache/artifacts/"]}},
        "variables": {"PIP_CACHE_DIR": "$CI_PROJECT_DIR/.pip-cache",
                      "HF_HOME": "$CI_PROJECT_DIR/.hf",
                      "PHIKIT_CACHE": "$CI_PROJECT_DIR/.phikit-cache"},
        "phikit-reference": {
            "stage": "reference", "script": [*install, reference_command(recipes)],
            "artifacts": {"paths": [".phikit-cache/reference/"]}},
        "phikit-build": {
            "stage": "build", "needs": ["phikit-reference"],
            "parallel": {"matrix": [{"RECIPE": recipes, "TARGET": targets}]},
            "script": [*install, build_command("$RECIPE", "$TARGET").replace(
                "dist/$RECIPE", "dist/$(basename $RECIPE .yaml)")],
            "after_script": ["phikit report dist/* --junit phikit-junit.xml || true"],
            "artifacts": {"when": "always", "paths": ["dist/"],
                          "reports": {"junit": "phikit-junit.xml"}}},
        "phikit-summary": {
            "stage": "summary", "when": "always", "needs": ["phikit-build"],
            "script": [*report_install_commands(spec),
                       f"{SUMMARY_COMMAND} | tee phikit-summary.md"],
            "artifacts": {"when": "always", "paths": ["phikit-summary.md"]}},
    }
    return _dump("# Written by `phikit ci init --gitlab`: .gitlab-ci.yml\n", pipeline)
