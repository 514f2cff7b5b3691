"""What phikit prints: the two consoles, progress lines per build stage, the checks table and
tables as JSON. Shared by the command modules (cli, ci_cli)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from .report.model import ParityReport

console = Console(stderr=True)  # progress, notes, errors
out = Console()  # results: tables, reports, the plan


class Bars:
    """Progress lines: `bars(description, total)` gives the parity engine an advance callback;
    `bars.stage(name)` starts a build stage's line, whose bar pulses and whose clock runs until
    the next stage starts (a conversion is silent for minutes without --verbose)."""

    def __init__(self, progress: Progress, indent: str = "") -> None:
        self.progress, self.indent, self.current = progress, indent, None

    def __call__(self, description: str, total: int) -> Callable[[], None]:
        task = self.progress.add_task(f"{self.indent}  {description}", total=total)
        return lambda: self.progress.advance(task)

    def stage(self, name: str) -> None:
        self.finish()
        self.current = self.progress.add_task(f"{self.indent}> {name}", total=None)

    def finish(self) -> None:
        if self.current is not None:
            self.progress.update(self.current, total=1, completed=1)
            self.current = None


@contextmanager
def progress_bars(indent: str = ""):
    with Progress(TextColumn("[cyan]{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        bars = Bars(progress, indent)
        try:
            yield bars
        finally:
            bars.finish()


def print_checks(report: ParityReport) -> None:
    table = Table(title=f"parity: {report.verdict.upper()}", title_justify="left")
    for col in ("metric", "measured", "bound", "result", "where"):
        table.add_column(col)
    for c in report.checks:
        table.add_row(escape(c.metric), f"{c.measured:.4g}", f"{c.relation} {c.bound:.4g}",
                      "[green]ok[/]" if c.passed else "[red]FAIL[/]", escape(c.detail))
    m = report.metrics
    out.print(table)
    out.print(f"KLD mean {m.kld_mean or 0:.4g} median {m.kld_median or 0:.4g} "
              f"p99 {m.kld_p99 or 0:.4g} max {m.kld_max or 0:.4g} | top-1 "
              f"{m.top1 or 0:.4f} | ppl {m.ppl_reference or 0:.2f} -> "
              f"{m.ppl_candidate or 0:.2f} | greedy match {m.greedy_match_mean or 0:.1f}"
              f" tokens | token agreement {m.token_agreement or 0:.3f}")
    for note in report.notes:
        out.print(f"[yellow]note:[/] {note}", highlight=False)


JSON_HELP = "print the tables as JSON (a list of {title, rows: [{column: cell}]}) on stdout"


def tables_json(tables: list[Table]) -> str:
    """Rich tables as data: the cells as shown, keyed by column header."""
    def text(cell) -> str:
        return cell.plain if hasattr(cell, "plain") else str(cell)

    out_tables = []
    for table in tables:
        headers = [text(c.header) for c in table.columns]
        cells = [[text(x) for x in c._cells] for c in table.columns]
        out_tables.append({"title": text(table.title or ""),
                           "rows": [dict(zip(headers, row)) for row in zip(*cells)]})
    return json.dumps(out_tables, indent=2)
