"""`phikit ci run | init | reference`: the quantization gate in CI (toolkit/ci.py, ci_init.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .errors import PhikitError
from .terminal import console, out

ci_app = typer.Typer(no_args_is_help=True, help="The quantization gate in CI: run it in one job, "
                     "or write a workflow that spreads it over jobs.")


@ci_app.command("run")
def ci_run(
    recipes: list[str] = typer.Argument(..., help="recipe YAMLs (or names in recipes/)"),
    target: list[str] = typer.Option(..., "--target", "-t", help="target (repeatable): every "
                                     "recipe is built for every target"),
    out_dir: Path = typer.Option(Path("dist"), "--out", "-o", help="where the bundles go"),
    junit: Optional[Path] = typer.Option(None, "--junit", help="write one JUnit file with "
                                         "every build's test suite"),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="write the summary here "
                                            "(default on GitHub Actions: appended to "
                                            "$GITHUB_STEP_SUMMARY)"),
) -> None:
    """Build every recipe for every target in this job; exit 1 when one misses a threshold.

    One combined table, Markdown summary and JUnit file; exit 2 when a build cannot run."""
    from .ci import (COLUMNS, combined_junit, exit_code, run_gate, step_summary_path,
                     summary_markdown, summary_rows)
    from .report import write_text_atomic

    rows = run_gate(recipes, target, out_dir, log=lambda s: console.print(s, markup=False))
    table = Table(title="phikit gate", title_justify="left")
    for col in COLUMNS:
        table.add_column(col)
    for row in summary_rows(rows):
        table.add_row(*(escape(c) for c in row))
    out.print(table)
    if junit is not None:
        write_text_atomic(junit, combined_junit(rows))
    summary = step_summary_path(markdown)
    if summary is not None:
        text = summary_markdown(rows)
        if markdown is None:  # GitHub's job summary: other steps write there too
            with open(summary, "a", encoding="utf-8") as f:
                f.write(text)
        else:
            write_text_atomic(summary, text)
    raise typer.Exit(exit_code(rows))


@ci_app.command("init")
def ci_init(
    recipes: list[str] = typer.Argument(..., help="recipe YAMLs, as paths in the repository "
                                        "(run from its root)"),
    target: list[str] = typer.Option(..., "--target", "-t", help="target (repeatable)"),
    github: bool = typer.Option(False, "--github", help="a GitHub Actions workflow"),
    gitlab: bool = typer.Option(False, "--gitlab", help="a GitLab CI pipeline"),
    spec: Optional[str] = typer.Option(None, help="what the jobs pip-install: a requirement "
                                       "(default: phikit[onnx,openvino]==this version), or "
                                       "'phikit[...] @ <wheel or git URL>'"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="write it here "
                                          "(default: stdout)"),
) -> None:
    """Write a workflow: references once, a job per recipe x target, a combined summary."""
    from . import ci_init as gen

    if github == gitlab:
        raise PhikitError("choose one of --github and --gitlab")
    recipes = gen.repo_paths(recipes)
    spec = spec or gen.PHIKIT_SPEC
    if github:
        where = output.as_posix() if output is not None and not output.is_absolute() else \
            gen.GITHUB_PATH
        text = gen.github(recipes, target, spec, path=where)
    else:
        text = gen.gitlab(recipes, target, spec)
    if output is None:
        sys.stdout.write(text)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
        console.print(f"wrote {output}", markup=False, highlight=False)


@ci_app.command("reference")
def ci_reference(recipes: list[str] = typer.Argument(..., help="recipe YAMLs")) -> None:
    """Compute the recipes' transformers references into PHIKIT_CACHE (once, for every job)."""
    from .build import find_recipe
    from .schema import load_recipe
    from .validate import prepare_reference

    for ref in recipes:
        recipe = load_recipe(find_recipe(ref))
        prepared = prepare_reference(recipe, recipe.source)
        out.print(f"{recipe.name}: reference {'cached' if prepared.cached else 'computed'} "
                  f"({prepared.seconds:.1f} s)", highlight=False)


