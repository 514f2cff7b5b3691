"""phikit command line: thin commands over build / validate / runner / demo / doctor."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from rich.markup import escape
from rich.table import Table

from .errors import PhikitError
from .runner.core import BundleError
from .terminal import JSON_HELP, console, out, print_checks, progress_bars, tables_json

__all__ = ["app", "main", "progress_bars"]  # progress_bars: demo callers (tests) take it here

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Convert, validate, package and run Phi-3 / Phi-3.5 models for devices.")
KEY_HELP = ("OpenSSH ed25519 public key (id_ed25519.pub) that must have signed the manifest; "
            "an unsigned or otherwise signed bundle is refused")
TRUST_HELP = ("let transformers and the converter import and run the Python code a checkpoint "
              "ships (Phi-3-small, Phi-3/3.5-vision); off by default, read that code first")


def _version(value: bool) -> None:
    if value:
        from . import __version__

        out.print(f"phikit {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="print phikit's version and exit"),
             path: list[Path] = typer.Option([], "--path", help="a directory holding your own "
                                             "recipes/ and targets/, searched by name before "
                                             "phikit's (repeatable; or PHIKIT_PATH)")) -> None:
    """Convert, validate, package and run Phi-3 / Phi-3.5 models for devices."""
    if path:  # the environment, so that child processes (ci, demo) search the same way
        import os

        os.environ["PHIKIT_PATH"] = os.pathsep.join(
            [str(p.resolve()) for p in path] + [os.environ.get("PHIKIT_PATH", "")]).rstrip(
                os.pathsep)


@app.command()
def build(
    recipe: Optional[str] = typer.Argument(None, help="recipe YAML (or name in recipes/); "
                                           "without one: --source and --precision"),
    target: str = typer.Option(..., "--target", "-t", help="target name or YAML"),
    backend: Optional[str] = typer.Option(None, help="override the target's default backend"),
    source: Optional[str] = typer.Option(None, help="checkpoint dir or hub id (overrides recipe)"),
    revision: Optional[str] = typer.Option(None, help="hub branch, tag or commit of the source "
                                           "(overrides the recipe's `revision`)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="bundle directory (a bundle "
                                           "there is replaced; anything else only with --force)"),
    force: bool = typer.Option(False, "--force", help="replace --out (and --out.failed) even "
                               "when it is not a phikit bundle: what is there is deleted"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate inputs and print the plan"),
    archive: bool = typer.Option(False, help="also write a deterministic <out>.tar.gz"),
    with_wheels: bool = typer.Option(False, "--with-wheels",
                                     help="carry the lock's wheels (offline installs on device)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    sign_key: Optional[Path] = typer.Option(None, "--sign", help="sign the manifest with this "
                                            "OpenSSH ed25519 private key"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the parity report "
                                            "here (as validate --json), pass or fail"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show the converter's own "
                                 "output as it runs"),
    precision: Optional[str] = typer.Option(None, help="without a recipe: the precision (the "
                                            "recipe `phikit init` would write is used)"),
    revalidate: bool = typer.Option(False, "--revalidate", help="measure parity even when this "
                                    "very bundle was validated on this CPU with this runtime "
                                    "before (the report says when a validation is reused)"),
) -> None:
    """Build a bundle: convert, validate against the reference, package."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        if recipe is None:  # the recipe `phikit init` would write, kept in the bundle
            if source is None or precision is None:
                raise PhikitError("give a recipe, or --source and --precision")
            from .backends import BACKENDS
            from .build import find_target
            from .init import recipe_name, recipe_text
            from .schema import load_target

            text = recipe_text(source, load_target(find_target(target), set(BACKENDS)),
                               precision, backend)
            recipe = str(Path(tmp) / f"{recipe_name(source, precision)}.yaml")
            Path(recipe).write_text(text, encoding="utf-8")
            source = None
        plan_args = dict(backend=backend, source=source, out=out_dir,
                         trust_remote_code=trust_remote_code, revision=revision, force=force)
        _build(recipe, target, plan_args, dry_run, json_out, verbose,
               dict(archive=archive, with_wheels=with_wheels, sign=sign_key,
                    revalidate=revalidate))


def _build(recipe, target, plan_args: dict, dry_run, json_out, verbose, packaging: dict) -> None:
    """plan_args: make_plan()'s keyword options; packaging: execute()'s (archive, wheels,
    signing, revalidation)."""
    from .build import execute, make_plan

    plan = make_plan(recipe, target, **plan_args)
    out.print(f"[bold]plan[/] {plan.recipe.name} -> {plan.target.name} ({plan.backend.name})")
    for step in plan.steps:
        out.print("  " + step)
    if dry_run:
        return
    log_lines: list[str] = []
    with progress_bars() as bars:
        result = execute(plan, **packaging,
                         log=(lambda s: console.print(s, markup=False, highlight=False))
                         if verbose else log_lines.append,
                         stage_cb=bars.stage, progress=bars)
    if json_out:
        json_out.write_text(json.dumps(result.report.to_json(), indent=2) + "\n")
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
        json_out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    print_checks(report)
    if not report.passed:
        for check in report.failed_checks():
            console.print(check.describe(mark=True, detail=True), markup=False)
        raise typer.Exit(1)


# run and serve hand every option to the bundle's own command line (BUNDLE/run.py): -h shows
# that parser's options, the ones these commands take
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True,
                "help_option_names": []}


def _runner(name: str, command: str, bundle: Optional[Path], args: list[str]) -> int:
    from .runner.cli import main as runner_main

    if bundle is None or {"-h", "--help"} & set(args) or str(bundle) in ("-h", "--help"):
        return runner_main(["--help"], prog=f"phikit {name} BUNDLE")
    return runner_main([command, "--bundle", str(bundle), *args], prog=f"phikit {name}")


@app.command(context_settings=PASS_THROUGH)
def run(ctx: typer.Context,
        bundle: Optional[Path] = typer.Argument(None, help="bundle directory")) -> None:
    """Generate with a bundle: --prompt, --chat, --max-tokens ... (-h: all of them)."""
    raise typer.Exit(_runner("run", "generate", bundle, ctx.args))


@app.command(context_settings=PASS_THROUGH)
def serve(ctx: typer.Context,
          bundle: Optional[Path] = typer.Argument(None, help="bundle directory")) -> None:
    """OpenAI-compatible server for a bundle: --host, --port, --api-key ... (-h: all of them)."""
    raise typer.Exit(_runner("serve", "serve", bundle, ctx.args))


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
    key: Optional[Path] = typer.Option(None, envvar="PHIKIT_TRUSTED_KEY", help=KEY_HELP),
    validate: bool = typer.Option(True, help="re-measure parity on the host (run.py validate) "
                                  "and fail when it does not pass there"),
    report: Optional[Path] = typer.Option(None, help="where the host's parity report goes "
                                          "(default: BUNDLE.HOST.parity.json beside the bundle)"),
    tune: bool = typer.Option(False, help="then run.py tune on the host: the fastest runtime "
                              "options that validate there, kept in its tuned.json"),
) -> None:
    """Copy a bundle over SSH, verify, install, smoke-run and validate it on the host.

    Only changed files are copied; --tune then keeps the host's fastest options that validate."""
    from .deploy import deploy as run_deploy

    options = [arg for opt in ssh_option for arg in ("-o", opt)]
    run_deploy(bundle, destination, port=port, identity=identity, ssh_port=ssh_port,
               python=python, service=service, ssh_options=options, key=key,
               validate=validate, report=report, tune=tune,
               log=lambda s: out.print(s, highlight=False))


@app.command()
def schema(kind: str = typer.Argument("recipe", help="recipe or target")) -> None:
    """JSON Schema of a recipe or target file (for editors: yaml-language-server)."""
    from .schema import Recipe, Target

    models = {"recipe": Recipe, "target": Target}
    if kind not in models:
        raise PhikitError(f"no schema {kind!r} (known: recipe, target)")
    print(json.dumps(models[kind].model_json_schema(mode="validation"), indent=2))


@app.command()
def init(
    source: str = typer.Option(..., help="checkpoint directory or hub id (org/name)"),
    target: str = typer.Option("generic-cpu", "--target", "-t", help="target name or YAML"),
    precision: str = typer.Option("int4", help="int4, int8, fp16 or fp32 (as the target allows)"),
    backend: Optional[str] = typer.Option(None, help="override the target's default backend"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="where the recipe goes "
                                          "(default: NAME.yaml here)"),
    force: bool = typer.Option(False, help="overwrite an existing file"),
    bound: list[str] = typer.Option([], "--bound", help="KEY=VALUE: a bound you accept for "
                                    "your model, in place of the default (repeatable), e.g. "
                                    "ppl_ratio_max=1.02"),
) -> None:
    """Write a commented recipe for a checkpoint, with the backend's default bounds."""
    from .backends import BACKENDS
    from .build import find_target
    from .init import bounds_warning, parse_bounds, recipe_name, recipe_text
    from .schema import load_target

    loaded = load_target(find_target(target), set(BACKENDS))
    path = output or Path(f"{recipe_name(source, precision)}.yaml")
    if path.exists() and not force:
        raise PhikitError("exists; pass --force to overwrite it", file=path)
    text = recipe_text(source, loaded, precision, backend, recipe_dir=path.parent,
                       bounds=parse_bounds(bound))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    warning = bounds_warning(source, backend or loaded.backend, precision)
    if warning:
        console.print(f"[yellow]warning[/]: {escape(warning)}", highlight=False)
    out.print(f"wrote {path}; next: phikit build {path} --target {target}", highlight=False)


@app.command()
def tune(bundle: Path = typer.Argument(..., help="bundle directory"),
         candidates: Optional[str] = typer.Option(None, help="thread counts to try, e.g. "
                                                  "1,2,4 (default: 1, half the cores, all)")) -> None:
    """Keep the fastest runtime options that still validate on this machine (tuned.json).

    Measures each candidate set, validates the fastest, writes BUNDLE/tuned.json; `deploy
    --tune` does the same on the host."""
    from .runner.cli import main as runner_main

    raise typer.Exit(runner_main(["tune", "--bundle", str(bundle),
                                  *(["--candidates", candidates] if candidates else [])],
                                 prog="phikit tune"))


@app.command()
def verify(bundle: Path = typer.Argument(..., help="bundle directory"),
           key: Optional[Path] = typer.Option(None, envvar="PHIKIT_TRUSTED_KEY",
                                              help=KEY_HELP)) -> None:
    """Check every file of a bundle against its manifest (and, with --key, its signature)."""
    from .runner.core import check_bundle

    checked, signed = check_bundle(bundle, key)
    out.print(f"ok: {len(checked.files)} files match manifest.json, {signed} "
              f"(parity verdict: {checked.verdict})", markup=False, highlight=False)
    from .runner.core import describe_tuned

    tuned = describe_tuned(bundle)
    if tuned:
        out.print(tuned, highlight=False)


@app.command()
def sign(bundle: Path = typer.Argument(..., help="bundle directory"),
         key: Path = typer.Option(..., "--key", help="OpenSSH ed25519 private key")) -> None:
    """Sign a bundle's manifest with an OpenSSH ed25519 key (manifest.json.sig).

    OpenSSH's SSHSIG format: `verify --key`, `run.py verify --key`, `deploy --key` and
    `ssh-keygen -Y verify` check it."""
    from .package import sign_manifest
    from .runner.core import check_files

    check_files(bundle)  # sign only what verifies
    out.print(f"wrote {sign_manifest(bundle, key)}", highlight=False)


@app.command()
def demo(out_dir: Path = typer.Option(Path("dist"), "--out", help="where bundles go"),
         target: list[str] = typer.Option([], "--target", "-t", help="only this target "
                                          "(repeatable); default: every one whose backend is "
                                          "installed")) -> None:
    """The embedded tiny-phi3 through every target runnable here, with a summary table."""
    from .demo import run_demo

    raise typer.Exit(run_demo(out_dir, out, console, progress_bars, target or None))


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Which backends and targets are usable here, and why not."""
    from .doctor import doctor_table

    table, ok = doctor_table()
    if as_json:
        print(tables_json([table]))
    else:
        out.print(table)
    if not ok:
        raise typer.Exit(1)


@app.command("list")
def list_cmd(
    matrix: bool = typer.Option(False, "--matrix", help="the support matrix: family member x "
                                "backend x precision, from the same checks builds run"),
    markdown: bool = typer.Option(False, "--markdown", help="with --matrix: Markdown (docs/family.md)"),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Recipes and targets shipped with phikit (--matrix: what each backend supports)."""
    from .doctor import list_tables, matrix_table

    if matrix and markdown:
        from .family import matrix_markdown

        print(matrix_markdown(), end="")
        return
    tables = [matrix_table()] if matrix else list_tables()
    if as_json:
        print(tables_json(tables))
        return
    for table in tables:
        out.print(table)


@app.command("report")
def report_cmd(
    paths: list[Path] = typer.Argument(..., help="bundle directories (<name>.failed too) or "
                                       "JSON reports (validate --json, run.py validate); "
                                       "several: one combined table"),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="write the self-contained HTML report here "
                                          "(a name ending in .md gets the Markdown summary)"),
    markdown: bool = typer.Option(False, "--markdown",
                                  help="print a Markdown summary to stdout (CI job summaries, "
                                  "PR comments)"),
    junit: Optional[Path] = typer.Option(None, "--junit", help="write JUnit XML: a test case "
                                         "per check, prompt and text"),
) -> None:
    """Render parity reports as HTML, Markdown or JUnit.

    Exit 0 when every verdict is pass, 1 when one fails (CI can gate on it; files are still
    written). Exit 2 when a PATH is not a readable bundle or report.
    """
    from .report import (bundle_facts, junit_xml, load_report, render_html, render_markdown,
                         write_text_atomic)

    if len(paths) > 1:
        from .ci import combined_junit, exit_code, report_rows, summary_markdown

        if output is not None and output.suffix.lower() != ".md":
            raise PhikitError("several reports: -o takes a .md file (HTML is one report's page)",
                              field="--output")
        rows = report_rows(paths)
        text = summary_markdown(rows, "reports")
        if output is not None:
            write_text_atomic(output, text)
        if junit is not None:
            write_text_atomic(junit, combined_junit(rows))
        if markdown or (output is None and junit is None):
            sys.stdout.write(text)
        raise typer.Exit(exit_code(rows))
    loaded = load_report(paths[0])
    report, manifest, name = loaded.parity, loaded.manifest, loaded.name
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
    if not report.passed:
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


from .ci_cli import ci_app  # noqa: E402 - the `phikit ci` commands, a module of their own

app.add_typer(ci_app, name="ci")


def main() -> None:
    try:
        app()
    except (PhikitError, BundleError) as e:
        console.print(f"error: {e}", style="red", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
