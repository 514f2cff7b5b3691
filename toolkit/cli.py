"""phikit command line: thin commands over build / validate / runner / demo / doctor."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import PhikitError
from .runner.core import BundleError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Convert, validate, package and run Phi-3 / Phi-3.5 models for devices.")
console = Console(stderr=True)
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
        table.add_row(c["metric"], f"{c['measured']:.4g}", f"{op} {c['bound']}",
                      "[green]ok[/]" if c["passed"] else "[red]FAIL[/]", c["detail"])
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
) -> None:
    """Build a bundle: convert, validate against the reference, package."""
    from .build import execute, make_plan

    plan = make_plan(recipe, target, backend=backend, source=source, out=out_dir)
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


@app.command()
def validate(
    path: Path = typer.Argument(..., help="phikit bundle or bare artifact directory"),
    reference: Optional[str] = typer.Option(None, help="reference checkpoint (dir or hub id)"),
    recipe: Optional[Path] = typer.Option(None, help="recipe for thresholds and eval set"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the full report here"),
    threads: Optional[int] = typer.Option(None, help="runtime threads"),
    emulate: Optional[str] = typer.Option(None, help="run the bundle's runtime on an emulated "
                                          "ISA (aarch64: qemu + a Debian bookworm root)"),
) -> None:
    """Compare an artifact with the reference. Exit 0 pass, 1 fail, 2 error."""
    from .parity import format_checks
    from .validate import open_candidate, run_parity

    candidate = open_candidate(path, reference, recipe, {"threads": threads} if threads else None,
                               emulate=emulate, log=lambda s: console.print(s, markup=False))
    try:
        with progress_bars() as bars:
            report = run_parity(candidate, bars)
    finally:
        if hasattr(candidate.session, "close"):
            candidate.session.close()
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
    from .runner.core import main as runner_main

    raise typer.Exit(runner_main(["generate", "--bundle", str(bundle), *ctx.args],
                                 prog="phikit run"))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(ctx: typer.Context, bundle: Path = typer.Argument(..., help="bundle directory")) -> None:
    """OpenAI-compatible server for a bundle (--host 127.0.0.1 --port 8000 [--api-key KEY])."""
    from .runner.core import main as runner_main

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
def list_cmd() -> None:
    """Recipes and targets shipped with phikit."""
    from .doctor import list_tables

    for table in list_tables():
        out.print(table)


def main() -> None:
    try:
        app()
    except (PhikitError, BundleError) as e:
        console.print(f"error: {e}", style="red", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
