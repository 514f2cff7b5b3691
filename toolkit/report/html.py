"""The parity report as one self-contained HTML page, and the page comparing two bundles.

The pages have no scripts and no network references (a Content-Security-Policy forbids both),
their charts are inline SVG drawn by .svg, and every text from the report is escaped: generated
text and eval-set ids are data, never markup. The markup and the stylesheet are templates in
templates/; this module works out what they show.
"""

from __future__ import annotations

import functools
import json
import re
from typing import TYPE_CHECKING, Any

from markupsafe import Markup

from .compare import compare_page
from .load import LoadedReport
from .model import ParityReport
from .readout import (report_data, band_failed, band_rows, bundle_facts, check_line, dig, esc, failed_checks,
                      fmt, plural, prompt_problem, relation, split_generation, text_problems)
from .svg import drift_svg, kld_histogram_svg, top1_svg

if TYPE_CHECKING:
    from jinja2 import Environment


def finalize(value: Any) -> Any:
    """Every value a template prints: formatted as fmt does (None as —, floats to 4 digits) and
    escaped as esc does (html.escape's spelling, ' as &#x27;), as the charts are. Markup (the
    SVG, a macro's output) passes unchanged; autoescape still escapes whatever skips this."""
    return value if hasattr(value, "__html__") else Markup(esc(value))


def blank_runs(text: str) -> list[tuple[str, int]]:
    """text cut at each run of three or more line breaks (small models emit dozens): (piece, 0)
    for the text between runs, ("", n) for a run of n breaks."""
    return [("", len(piece)) if i % 2 else (piece, 0)
            for i, piece in enumerate(re.split(r"(\n{3,})", text))]


@functools.cache
def environment() -> Environment:
    import jinja2  # here, not at import: `from toolkit.report import ...` stays light

    env = jinja2.Environment(loader=jinja2.PackageLoader(__package__, "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, finalize=finalize,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(blank_runs=blank_runs, relation=relation)
    return env


def verdict_summary(report: dict[str, Any]) -> str:
    failed = failed_checks(report)
    if failed:
        return (f"{len(failed)} of {len(report['checks'])} checks failed: "
                + "; ".join(check_line(c) for c in failed))
    return f"all {len(report['checks'])} checks passed"


def other_metrics(report: dict[str, Any]) -> list[tuple[str, Any]]:
    m = report["metrics"]
    return [("positions", m.get("positions")), ("texts", m.get("texts")),
            ("prompts", m.get("prompts")), ("KLD median", m.get("kld_median")),
            ("KLD p99.9", m.get("kld_p999")),
            ("KLD max", m.get("kld_max")), ("perplexity reference", m.get("ppl_reference")),
            ("perplexity candidate", m.get("ppl_candidate")),
            ("greedy match min", m.get("greedy_match_min")),
            ("greedy exact share", m.get("greedy_exact"))]


def bands_rows(report: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """(cells, row class) per position band; [] for reports from before bands."""
    rows = []
    for b in band_rows(report):
        end = b.get("end")
        span = f"{b.get('start', 0)}–{end - 1}" if isinstance(end, int) else f"{b.get('start')}–"
        worst = b.get("worst") or {}
        worst_text = (f"{worst.get('id')} (KLD {fmt(worst.get('kld_mean'))}, max at "
                      f"{worst.get('position')})" if worst else "—")
        greedy = (f"{fmt(b.get('greedy_match_mean'))} ({b.get('prompts')} prompts)"
                  if "greedy_match_mean" in b else "—")
        cells = (b["name"], b.get("description") or "", span, b.get("positions"),
                 "checked" if b.get("checked") else "reported only", b.get("kld_mean"),
                 b.get("kld_p99"), b.get("top1"), greedy, worst_text)
        rows.append((cells, "failed" if band_failed(report, b) else ""))
    return rows


def texts_rows(report: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """Texts that miss an overall bound on their own are marked (class over), not failed."""
    rows = []
    for t in report.get("texts") or []:
        problems = text_problems(t, report)
        cells = (t.get("id"), t.get("tokens"), t.get("kld_mean"), t.get("kld_max"),
                 t.get("kld_max_position"), t.get("top1"), "; ".join(problems))
        rows.append((cells, "over" if problems else ""))
    return rows


def generations(report: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in report.get("prompts") or []:
        common, reference_rest, candidate_rest = split_generation(p)
        exact = bool(p.get("exact"))
        out.append({"id": p.get("id"), "exact": exact, "common": common,
                    "reference_rest": reference_rest, "candidate_rest": candidate_rest,
                    "status": ("identical" if exact
                               else f"diverged after {plural(p.get('match'), 'token')}"),
                    "reference_tokens": plural(p.get("reference_tokens"), "token"),
                    "candidate_tokens": p.get("candidate_tokens"),
                    "problem": prompt_problem(p, report)})
    return out


def tokenizer(report: dict[str, Any]) -> dict[str, Any]:
    mismatches = report.get("tokenizer_mismatches") or []
    info = report.get("tokenizer") or {}
    m = report["metrics"]
    rows_total = info.get("rows", (m.get("texts") or 0) + (m.get("prompts") or 0))
    identical = info.get("identical", rows_total - len(mismatches))
    summary = [("eval rows", rows_total), ("tokenized identically", identical),
               ("chat-formatted rows", info.get("chat_rows")),
               ("token agreement", m.get("token_agreement"))]
    rows = [((x.get("id"), x.get("first_difference"), repr(x.get("context", "")),
              str(x.get("reference_tokens")), str(x.get("candidate_tokens"))), "")
            for x in mismatches]
    return {"summary": summary, "mismatches": rows}


def scalars(data: Any) -> list[tuple[str, Any]]:
    """A dict's plain values (lists such as eos ids and nested dicts shown as JSON)."""
    if not isinstance(data, dict):
        return []
    return [(k, v if isinstance(v, (str, int, float, bool)) or v is None
             else json.dumps(v, default=str)) for k, v in data.items()]


def provenance(report: dict[str, Any], manifest: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The collapsible blocks: title, (key, value) pairs, whether the values are hashes,
    whether the block starts open. The template leaves out a block without pairs."""
    source = dig(manifest, "source") or {}
    reference = report.get("reference") or {}
    evalset = report.get("evalset") or {}

    def block(title: str, pairs: list[tuple[str, Any]], hash_like: bool = False,
              opened: bool = True) -> dict[str, Any]:
        return {"title": title, "pairs": pairs, "hash_like": hash_like, "opened": opened,
                "hashed_later": False}

    blocks = [
        block("Source checkpoint",
              [("id", source.get("id") or reference.get("source")),
               ("sha256", source.get("sha256") or reference.get("checkpoint_sha256")),
               ("architecture", source.get("architecture"))], hash_like=True),
        block("Eval set", [("file", evalset.get("file")), ("sha256", evalset.get("sha256"))],
              hash_like=True),
        block("Toolchain", scalars(dig(manifest, "toolchain"))),
        block("Host (the CPU behind these figures)", scalars(report.get("host"))),
        block("Reference", scalars(reference), opened=False),
        block("Candidate", scalars(report.get("candidate")), opened=False),
        block("Timing", scalars(report.get("timing")), opened=False)]
    files = dig(manifest, "files")
    if isinstance(files, dict):
        blocks.append(block(f"Bundle files ({len(files)}, sha256)", sorted(files.items()),
                            hash_like=True, opened=False))
    elif manifest is not None:
        # a manifest without files: the template says they were hashed after this report
        blocks.append({**block("Bundle files", [], opened=False), "hashed_later": True})
    return blocks


def render_html(report: ParityReport | dict[str, Any], manifest: dict[str, Any] | None = None,
                name: str | None = None) -> str:
    report = report_data(report)
    facts = bundle_facts(report, manifest, name)
    top1_chart, top1_caption = top1_svg(report)
    drift_chart, drift_caption = drift_svg(report)
    return environment().get_template("report.html.j2").render(
        title=f"{report['verdict'].upper()} · {facts['name']} · phikit parity",
        verdict=report["verdict"], facts=facts, summary=verdict_summary(report),
        checks=report["checks"], other_metrics=other_metrics(report),
        kld_chart=Markup(kld_histogram_svg(report)),
        top1_chart=Markup(top1_chart), top1_caption=top1_caption,
        drift_chart=Markup(drift_chart), drift_caption=drift_caption,
        bands=bands_rows(report), texts=texts_rows(report), generations=generations(report),
        tokenizer=tokenizer(report), notes=report.get("notes") or [],
        provenance=provenance(report, manifest))


def compare_html(a: LoadedReport, b: LoadedReport) -> str:
    return environment().get_template("compare.html.j2").render(compare_page(a, b))
