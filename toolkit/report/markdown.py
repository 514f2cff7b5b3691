"""The Markdown summary for CI job pages."""

from __future__ import annotations

import html
import re
from typing import Any, Iterable

from .model import ParityReport
from .readout import band_failed, bundle_facts, fmt, split_generation

# Report strings come from the bundle reported on (eval rows, generations, names): in a CI job
# summary or a PR comment none of them may render as a link or an image a reader's browser
# fetches. Brackets open every link and image ([x](url), ![x](url), [x][ref], [x]: url); a
# backslash could undo an escape; ':' and '@' are where GitHub's bare autolinks start
# (http://, mailto:, a@b.c), '.' after www the third kind. Raw HTML (<img>, <http://...>) is
# escaped as entities first. Emphasis is left alone: it fetches nothing.
_MD_ESCAPED = re.compile(r"[\\\[\]|:@]|(?<=www)\.", re.IGNORECASE)


def md_text(text: str) -> str:
    """`text` as literal Markdown text, on one line: no link, image, autolink or HTML."""
    text = _MD_ESCAPED.sub(lambda m: "\\" + m.group(0), html.escape(text, quote=False))
    return text.replace("\r", "").replace("\n", "↵")


def md_cell(value: Any) -> str:
    """One table cell: a report's string as literal text (md_text; a pipe would end the cell,
    a line break the row), a number formatted."""
    return md_text(value if isinstance(value, str) else fmt(value))


def md_table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    header = list(header)
    lines = ["| " + " | ".join(md_cell(h) for h in header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(report: ParityReport, manifest: dict[str, Any] | None = None,
                    name: str | None = None) -> str:
    facts = bundle_facts(report, manifest, name)
    mark = "✅ PASS" if report.passed else "❌ FAIL"
    lines = [f"## {mark} — {md_cell(facts['name'])}", "",
             " · ".join(f"{k}: **{md_cell(facts[k])}**"
                        for k in ("backend", "precision", "target", "runtime")), ""]
    lines += md_table(("metric", "measured", "bound", "result", "detail"),
                      ((c.metric, c.measured, f"{c.relation} {fmt(c.bound)}",
                        "ok" if c.passed else "**FAIL**", c.detail)
                       for c in report.checks))
    if report.bands:
        lines += ["", "**Position bands**", ""]
        lines += md_table(("band", "positions", "status", "KLD mean", "KLD p99", "top-1",
                           "greedy match"),
                          ((b.name, b.positions,
                            ("FAIL" if band_failed(report, b) else "checked")
                            if b.checked else "reported only",
                            b.kld_mean, b.kld_p99, b.top1, b.greedy_match_mean)
                           for b in report.bands))
    prompts = report.prompts
    if prompts:
        m = report.metrics
        exact = m.greedy_exact
        lines += ["", f"**Greedy generations**: {len(prompts)} prompts, mean match "
                      f"{fmt(m.greedy_match_mean)} tokens, min {fmt(m.greedy_match_min)}, "
                      "identical " + (f"{100 * exact:.0f}%" if exact is not None else "—"), ""]
        rows = []
        for p in prompts:
            _, ref_rest, cand_rest = split_generation(p)
            rows.append((p.id, p.match, "yes" if p.exact else "no", ref_rest[:40],
                         cand_rest[:40]))
        lines += md_table(("prompt", "matched tokens", "identical",
                           "reference after divergence", "candidate after divergence"), rows)
    for note in report.notes:
        lines += ["", f"> {md_cell(note)}"]
    return "\n".join(lines) + "\n"
