"""`phikit ci run`: the quantization gate of a CI job in one command.

Every recipe is built for every target (the real build: convert, validate, package), and the
job gets one verdict: a combined table on the terminal, one Markdown summary (appended to
$GITHUB_STEP_SUMMARY when the job runs on GitHub Actions), one JUnit file holding each build's
test suite (GitLab's and most CI's test tabs read it). Exit 0 when every build passes its
thresholds, 1 when one does not, 2 when one could not be built (a refused combination, a bad
recipe: the error is in the summary too). examples/ci/ holds a GitHub Actions workflow and a
GitLab job that call it; `phikit ci init` (ci_init.py) writes the form spread over CI jobs.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .build import execute, make_plan
from .errors import PhikitError
from .report import junit_xml, render_markdown
from .report.markdown import md_cell
from .report.model import ParityReport


@dataclass
class GateRow:
    name: str  # "recipe → target", or a report's name
    backend: str = "—"
    bundle: Path | None = None
    report: ParityReport | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def status(self) -> str:
        return "ERROR" if self.error else "PASS" if self.report.passed else "FAIL"


def run_gate(recipes: list[str], targets: list[str], out_dir: Path,
             log: Callable[[str], None] = lambda s: None) -> list[GateRow]:
    rows = []
    for recipe in recipes:
        for target in targets:
            row = GateRow(f"{Path(recipe).stem} → {target}")
            try:
                plan = make_plan(recipe, target, out=out_dir / f"{Path(recipe).stem}-{target}")
                row.backend = plan.backend.name
                log(f"{row.name} ({row.backend}): building")
                result = execute(plan)
                row.bundle, row.report, row.manifest = result.bundle, result.report, \
                    result.manifest
            except PhikitError as e:
                row.error = str(e)
            log(f"{row.name}: {row.status}")
            rows.append(row)
    return rows


def report_rows(paths: list[Path]) -> list[GateRow]:
    """Rows from bundles or report files already there (`phikit report A B C`)."""
    from .report import load_report
    from .report.readout import bundle_facts

    rows = []
    for path in paths:
        loaded = load_report(path)
        facts = bundle_facts(loaded.parity, loaded.manifest, loaded.name)
        rows.append(GateRow(loaded.name, facts["backend"], loaded.bundle, loaded.parity,
                            loaded.manifest or {}))
    return rows


def exit_code(rows: list[GateRow]) -> int:
    if any(r.error for r in rows):
        return 2
    return 0 if all(r.report.passed for r in rows) else 1


def _failed(row: GateRow) -> str:
    if row.error:
        return row.error
    return ", ".join(c.metric for c in row.report.failed_checks())


COLUMNS = ("build", "backend", "precision", "target", "verdict", "KLD mean", "top-1",
           "failed checks / error")


def summary_rows(rows: list[GateRow]) -> list[tuple[str, ...]]:
    """COLUMNS per build (or report)."""
    from .report.readout import bundle_facts

    out = []
    for r in rows:
        m = r.report.metrics if r.report is not None else None
        facts = bundle_facts(r.report, r.manifest or None, r.name) if r.report is not None \
            else {"precision": "—", "target": "—"}
        out.append((r.name, r.backend, facts["precision"], facts["target"], r.status,
                    f"{m.kld_mean:.4g}" if m and m.kld_mean is not None else "—",
                    f"{m.top1:.4f}" if m and m.top1 is not None else "—", _failed(r)))
    return out


def summary_markdown(rows: list[GateRow], what: str = "builds") -> str:
    passed = sum(1 for r in rows if r.status == "PASS")
    mark = "✅" if passed == len(rows) else "❌"
    lines = [f"# {mark} phikit gate: {passed} of {len(rows)} {what} pass", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in summary_rows(rows)]
    for r in rows:
        if r.report is not None:
            lines += ["", f"<details><summary>{md_cell(r.name)}: {r.status}</summary>", "",
                      render_markdown(r.report, r.manifest, r.name), "</details>"]
    return "\n".join(lines) + "\n"


def combined_junit(rows: list[GateRow]) -> str:
    """<testsuites>: each build's suite (a case per check, prompt, text); a build that could not
    be built is a suite with one errored case."""
    suites = ET.Element("testsuites", name="phikit gate")
    for r in rows:
        if r.report is not None:
            suites.append(ET.fromstring(junit_xml(r.report, r.name).split("\n", 1)[1]))
            continue
        suite = ET.SubElement(suites, "testsuite", name=f"phikit parity: {r.name}", tests="1",
                              failures="0", errors="1", skipped="0")
        case = ET.SubElement(suite, "testcase", classname="parity.build", name="build", time="0")
        ET.SubElement(case, "error", message=r.error or "", type="build").text = r.error
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, "unicode") + "\n"


def step_summary_path(explicit: Path | None) -> Path | None:
    """--markdown, else GitHub Actions' job summary file when the job runs there."""
    if explicit is not None:
        return explicit
    env = os.environ.get("GITHUB_STEP_SUMMARY")
    return Path(env) if env else None
