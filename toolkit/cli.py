"""phikit command line: thin commands over build / validate / runner / demo / doctor."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import PhikitError
from .runner.core import BundleError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Convert, validate, package and run Phi-3 / Phi-3.5 models for devices.")
console = Console(stderr=True)
TRUST_HELP = ("let transformers and the converter import and run the Python code a checkpoint "
              "ships (Phi-3-small, Phi-3/3.5-vision); off by default, read that code first")
out = Console()


@contextmanager
def progress_bars():
    """A rich Progress and a factory of per-stage advance callbacks for the parity engine."""
    with Progress(TextColumn("{task.description:<32}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as bars:
        def factory(description: str, total: int):
            task = bars.add_task(description, total=total)
            return lambda: bars.advance(task)

        yield factory


def print_checks(report: dict) -> None:
    table = Table(title=f"parity: {report['verdict'].upper()}", title_justify="left")
    for col in ("metric", "measured", "bound", "result", "where"):
        table.add_column(col)
    for c in report["checks"]:
        op = "<=" if c["kind"] == "max" else ">="
        table.add_row(escape(c["metric"]), f"{c['measured']:.4g}", f"{op} {c['bound']}",
                      "[green]ok[/]" if c["passed"] else "[red]FAIL[/]", escape(c["detail"]))
    m = report["metrics"]
    out.print(table)
    out.print(f"KLD mean {m.get('kld_mean', 0):.4g} median {m.get('kld_median', 0):.4g} "
              f"p99 {m.get('kld_p99', 0):.4g} max {m.get('kld_max', 0):.4g} | top-1 "
              f"{m.get('top1', 0):.4f} | ppl {m.get('ppl_reference', 0):.2f} -> "
              f"{m.get('ppl_candidate', 0):.2f} | greedy match {m.get('greedy_match_mean', 0):.1f}"
              f" tokens | token agreement {m.get('token_agreement', 0):.3f}")
    for note in report.get("notes", []):
        out.print(f"[yellow]note:[/] {note}", highlight=False)


@app.command()
def build(
    recipe: str = typer.Argument(..., help="recipe YAML (or name in recipes/)"),
    target: str = typer.Option(..., "--target", "-t", help="target name or YAML"),
    backend: Optional[str] = typer.Option(None, help="override the target's default backend"),
    source: Optional[str] = typer.Option(None, help="checkpoint dir or hub id (overrides recipe)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="bundle directory"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate inputs and print the plan"),
    archive: bool = typer.Option(False, help="also write a deterministic <out>.tar.gz"),
    with_wheels: bool = typer.Option(False, "--with-wheels",
                                     help="carry the lock's wheels (offline installs on device)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
) -> None:
    """Build a bundle: convert, validate against the reference, package."""
    from .build import execute, make_plan

    plan = make_plan(recipe, target, backend=backend, source=source, out=out_dir,
                     trust_remote_code=trust_remote_code)
    out.print(f"[bold]plan[/] {plan.recipe.name} -> {plan.target.name} ({plan.backend.name})")
    for step in plan.steps:
        out.print("  " + step)
    if dry_run:
        return
    log_lines: list[str] = []
    with progress_bars() as bars:
        result = execute(plan, archive=archive, with_wheels=with_wheels, log=log_lines.append,
                         stage_cb=lambda s: console.print(f"[cyan]> {s}[/]"), progress=bars)
    print_checks(result.report)
    if not result.passed:
        console.print(f"[red]validation failed[/]: bundle written to {result.bundle} "
                      "(marked failed; the runner refuses it)")
        raise typer.Exit(1)
    out.print(f"[green]bundle[/] {result.bundle}")


def parse_option(text: str) -> tuple[str, Any]:
    """KEY=VALUE, the value read as YAML (true, 4, f32, [a, b])."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise PhikitError(f"expected KEY=VALUE, got {text!r}", field="--option")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value


@app.command()
def validate(
    path: Path = typer.Argument(..., help="phikit bundle or bare artifact directory"),
    reference: Optional[str] = typer.Option(None, help="reference checkpoint (dir or hub id)"),
    recipe: Optional[Path] = typer.Option(None, help="recipe for thresholds and eval set"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the full report here"),
    threads: Optional[int] = typer.Option(None, help="runtime threads"),
    option: list[str] = typer.Option([], "--option", help="runtime option KEY=VALUE over the "
                                     "bundle's (repeatable), e.g. extra_buffer_types=false"),
    emulate: Optional[str] = typer.Option(None, help="run the bundle's runtime on an emulated "
                                          "CPU: aarch64 (qemu + a Debian bookworm root) or "
                                          "x86-64-v3 (qemu's AVX2-only Haswell model)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
) -> None:
    """Compare an artifact with the reference. Exit 0 pass, 1 fail, 2 error."""
    from .parity import format_checks
    from .validate import open_candidate, run_parity

    overrides = dict(parse_option(o) for o in option)
    if threads:
        overrides["threads"] = threads
    candidate = open_candidate(path, reference, recipe, overrides or None,
                               emulate=emulate, log=lambda s: console.print(s, markup=False),
                               trust_remote_code=trust_remote_code)
    try:
        with progress_bars() as bars:
            report = run_parity(candidate, bars)
    finally:
        candidate.close()
    if json_out:
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    print_checks(report)
    if report["verdict"] != "pass":
        for line in format_checks(report):
            if line.startswith("FAIL"):
                console.print(line, markup=False)
        raise typer.Exit(1)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(ctx: typer.Context, bundle: Path = typer.Argument(..., help="bundle directory")) -> None:
    """Generate with a bundle (same options as BUNDLE/run.py: --prompt, --chat, --max-tokens...)."""
    from .runner.cli import main as runner_main

    raise typer.Exit(runner_main(["generate", "--bundle", str(bundle), *ctx.args],
                                 prog="phikit run"))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(ctx: typer.Context, bundle: Path = typer.Argument(..., help="bundle directory")) -> None:
    """OpenAI-compatible server for a bundle (--host 127.0.0.1 --port 8000 [--api-key KEY])."""
    from .runner.cli import main as runner_main

    raise typer.Exit(runner_main(["serve", "--bundle", str(bundle), *ctx.args],
                                 prog="phikit serve"))


@app.command()
def deploy(
    bundle: Path = typer.Argument(..., help="bundle directory"),
    destination: str = typer.Argument(..., help="user@host[:dir] (dir defaults to phikit/NAME)"),
    port: int = typer.Option(8000, help="port of the server that --service starts"),
    identity: Optional[Path] = typer.Option(None, help="SSH private key"),
    ssh_port: Optional[int] = typer.Option(None, help="SSH port of the host"),
    python: str = typer.Option("python3", help="Python interpreter on the host"),
    service: bool = typer.Option(False, help="install and start a systemd unit for `serve`"),
    ssh_option: list[str] = typer.Option([], "-o", help="extra ssh -o options (repeatable)"),
) -> None:
    """Copy a bundle over SSH (only changed files), verify, install its lock, smoke-run."""
    from .deploy import deploy as run_deploy

    options = [arg for opt in ssh_option for arg in ("-o", opt)]
    run_deploy(bundle, destination, port=port, identity=identity, ssh_port=ssh_port,
               python=python, service=service, ssh_options=options,
               log=lambda s: out.print(s, highlight=False))


@app.command()
def verify(bundle: Path = typer.Argument(..., help="bundle directory")) -> None:
    """Check every file of a bundle against its manifest's sha256."""
    from .runner.core import verify_bundle

    manifest = verify_bundle(bundle)
    out.print(f"ok: {len(manifest['files'])} files match manifest.json "
              f"(parity verdict: {manifest.get('parity', {}).get('verdict')})")


@app.command()
def demo(out_dir: Path = typer.Option(Path("dist"), "--out", help="where bundles go")) -> None:
    """The embedded tiny-phi3 through every target runnable here, with a summary table."""
    from .demo import run_demo

    raise typer.Exit(run_demo(out_dir, out, console, progress_bars))


@app.command()
def doctor() -> None:
    """Which backends and targets are usable here, and why not."""
    from .doctor import doctor_table

    table, ok = doctor_table()
    out.print(table)
    if not ok:
        raise typer.Exit(1)


@app.command("list")
def list_cmd(
    matrix: bool = typer.Option(False, "--matrix", help="the support matrix: family member x "
                                "backend x precision, from the same checks builds run"),
    markdown: bool = typer.Option(False, "--markdown", help="with --matrix: Markdown (README)"),
) -> None:
    """Recipes and targets shipped with phikit (--matrix: what each backend supports)."""
    from .doctor import list_tables, matrix_table

    if matrix and markdown:
        from .family import matrix_markdown

        print(matrix_markdown(), end="")
        return
    for table in ([matrix_table()] if matrix else list_tables()):
        out.print(table)


@app.command("report")
def report_cmd(
    path: Path = typer.Argument(..., help="bundle directory (<name>.failed too) or the JSON "
                                "`phikit validate --json` wrote"),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="write the self-contained HTML report here "
                                          "(a name ending in .md gets the Markdown summary)"),
    markdown: bool = typer.Option(False, "--markdown",
                                  help="print a Markdown summary to stdout (CI job summaries)"),
    junit: Optional[Path] = typer.Option(None, "--junit", help="write JUnit XML: a test case "
                                         "per check, prompt and text"),
) -> None:
    """Render a parity report as HTML, Markdown or JUnit.

    Exit 0 when the verdict is pass, 1 when fail (CI can gate on it; files are still written).

    Exit 2 when PATH is not a readable bundle or report.
    """
    from .report import (bundle_facts, junit_xml, load_report, render_html, render_markdown,
                         write_text_atomic)

    loaded = load_report(path)
    report, manifest, name = loaded.report, loaded.manifest, loaded.name
    if output is not None:
        as_markdown = output.suffix.lower() == ".md"
        write_text_atomic(output, render_markdown(report, manifest, name) if as_markdown
                          else render_html(report, manifest, name))
        console.print(f"wrote {output}", markup=False, highlight=False)
    if junit is not None:
        write_text_atomic(junit, junit_xml(report, name))
        console.print(f"wrote {junit}", markup=False, highlight=False)
    if markdown:
        sys.stdout.write(render_markdown(report, manifest, name))
    elif output is None and junit is None:
        facts = bundle_facts(report, manifest, name)
        out.print(" · ".join([name, *(f"{k} {facts[k]}" for k in (
            "backend", "precision", "target", "runtime"))]), markup=False, highlight=False)
        print_checks(report)
    if report["verdict"] != "pass":
        raise typer.Exit(1)


@app.command("compare")
def compare_cmd(
    a: Path = typer.Argument(..., help="bundle directory or report JSON (A)"),
    b: Path = typer.Argument(..., help="bundle directory or report JSON (B), same source model"),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="also write a side-by-side HTML page here"),
) -> None:
    """Two bundles of one model side by side: metrics, per band, sizes, generations."""
    from rich.text import Text

    from .report import compare_html, compare_notes, compare_rows, load_report, write_text_atomic

    first, second = load_report(a), load_report(b)
    table = Table(title="compare", title_justify="left")
    for col in ("", f"A: {first.name}", f"B: {second.name}", "B − A"):
        table.add_column(Text(col))
    for row in compare_rows(first, second):
        table.add_row(*map(Text, row))  # Text: band names such as kld_mean[past_window] are
        # not rich markup
    out.print(table)
    for note in compare_notes(first, second):
        out.print(f"[yellow]note:[/] {note}", highlight=False)
    if output is not None:
        write_text_atomic(output, compare_html(first, second))
        console.print(f"wrote {output}", markup=False, highlight=False)


def main() -> None:
    try:
        app()
    except (PhikitError, BundleError) as e:
        console.print(f"error: {e}", style="red", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
