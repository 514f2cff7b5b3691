"""The Markdown summary for CI job pages."""

from __future__ import annotations

import html
import re
from typing import Any, Iterable

from .model import ParityReport
from .readout import report_data, band_failed, band_rows, bundle_facts, fmt, relation, split_generation

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


def render_markdown(report: ParityReport | dict[str, Any], manifest: dict[str, Any] | None = None,
                    name: str | None = None) -> str:
    report = report_data(report)
    facts = bundle_facts(report, manifest, name)
    mark = "✅ PASS" if report["verdict"] == "pass" else "❌ FAIL"
    lines = [f"## {mark} — {md_cell(facts['name'])}", "",
             " · ".join(f"{k}: **{md_cell(facts[k])}**"
                        for k in ("backend", "precision", "target", "runtime")), ""]
    lines += md_table(("metric", "measured", "bound", "result", "detail"),
                      ((c["metric"], c["measured"], f"{relation(c['kind'])} {fmt(c['bound'])}",
                        "ok" if c["passed"] else "**FAIL**", c.get("detail") or "")
                       for c in report["checks"]))
    bands = band_rows(report)
    if bands:
        lines += ["", "**Position bands**", ""]
        lines += md_table(("band", "positions", "status", "KLD mean", "KLD p99", "top-1",
                           "greedy match"),
                          ((b["name"], b.get("positions"),
                            ("FAIL" if band_failed(report, b) else "checked")
                            if b.get("checked") else "reported only",
                            b.get("kld_mean"), b.get("kld_p99"), b.get("top1"),
                            b.get("greedy_match_mean")) for b in bands))
    prompts = report.get("prompts") or []
    if prompts:
        m = report["metrics"]
        exact = m.get("greedy_exact")
        lines += ["", f"**Greedy generations**: {len(prompts)} prompts, mean match "
                      f"{fmt(m.get('greedy_match_mean'))} tokens, min "
                      f"{fmt(m.get('greedy_match_min'))}, identical "
                      + (f"{100 * exact:.0f}%" if isinstance(exact, (int, float)) else "—"), ""]
        rows = []
        for p in prompts:
            _, ref_rest, cand_rest = split_generation(p)
            rows.append((p.get("id"), p.get("match"), "yes" if p.get("exact") else "no",
                         ref_rest[:40], cand_rest[:40]))
        lines += md_table(("prompt", "matched tokens", "identical",
                           "reference after divergence", "candidate after divergence"), rows)
    for note in report.get("notes") or []:
        lines += ["", f"> {md_cell(note)}"]
    return "\n".join(lines) + "\n"
