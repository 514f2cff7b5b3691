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
from .readout import (band_failed, bundle_facts, dig, esc, fmt, plural, prompt_problem,
                      split_generation, text_problems)
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
    env.filters.update(blank_runs=blank_runs)
    return env


def verdict_summary(report: ParityReport) -> str:
    failed = report.failed_checks()
    if failed:
        return (f"{len(failed)} of {len(report.checks)} checks failed: "
                + "; ".join(c.describe() for c in failed))
    return f"all {len(report.checks)} checks passed"


def other_metrics(report: ParityReport) -> list[tuple[str, Any]]:
    m = report.metrics
    return [("positions", m.positions), ("texts", m.texts), ("prompts", m.prompts),
            ("KLD median", m.kld_median), ("KLD p99.9", m.kld_p999), ("KLD max", m.kld_max),
            ("perplexity reference", m.ppl_reference),
            ("perplexity candidate", m.ppl_candidate),
            ("greedy match min", m.greedy_match_min), ("greedy exact share", m.greedy_exact)]


def bands_rows(report: ParityReport) -> list[tuple[tuple[Any, ...], str]]:
    """(cells, row class) per position band; [] for reports from before bands."""
    rows = []
    for b in report.bands:
        span = f"{b.start}–{b.end - 1}" if b.end is not None else f"{b.start}–"
        w = b.worst
        worst_text = (f"{w.id} (KLD {fmt(w.kld_mean)}, max at {w.position})" if w is not None
                      else "—")
        greedy = (f"{fmt(b.greedy_match_mean)} ({b.prompts} prompts)"
                  if b.greedy_match_mean is not None else "—")
        cells = (b.name, b.description, span, b.positions,
                 "checked" if b.checked else "reported only", b.kld_mean, b.kld_p99, b.top1,
                 greedy, worst_text)
        rows.append((cells, "failed" if band_failed(report, b) else ""))
    return rows


def texts_rows(report: ParityReport) -> list[tuple[tuple[Any, ...], str]]:
    """Texts that miss an overall bound on their own are marked (class over), not failed."""
    rows = []
    for t in report.texts:
        problems = text_problems(t, report)
        cells = (t.id, t.tokens, t.kld_mean, t.kld_max, t.kld_max_position, t.top1,
                 "; ".join(problems))
        rows.append((cells, "over" if problems else ""))
    return rows


def generations(report: ParityReport) -> list[dict[str, Any]]:
    out = []
    for p in report.prompts:
        common, reference_rest, candidate_rest = split_generation(p)
        out.append({"id": p.id, "exact": p.exact, "common": common,
                    "reference_rest": reference_rest, "candidate_rest": candidate_rest,
                    "status": ("identical" if p.exact
                               else f"diverged after {plural(p.match, 'token')}"),
                    "reference_tokens": plural(p.reference_tokens, "token"),
                    "candidate_tokens": p.candidate_tokens,
                    "problem": prompt_problem(p, report)})
    return out


def tokenizer(report: ParityReport) -> dict[str, Any]:
    mismatches = report.tokenizer_mismatches
    info, m = report.tokenizer, report.metrics
    # reports from before the tokenizer summary: every eval row, less those that mismatched
    rows_total = info.rows if info else m.texts + m.prompts
    identical = info.identical if info else rows_total - len(mismatches)
    summary = [("eval rows", rows_total), ("tokenized identically", identical),
               ("chat-formatted rows", info.chat_rows if info else None),
               ("token agreement", m.token_agreement)]
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


def provenance(report: ParityReport, manifest: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The collapsible blocks: title, (key, value) pairs, whether the values are hashes,
    whether the block starts open. The template leaves out a block without pairs."""
    source = dig(manifest, "source") or {}
    reference, evalset = report.reference, report.evalset

    def block(title: str, pairs: list[tuple[str, Any]], hash_like: bool = False,
              opened: bool = True) -> dict[str, Any]:
        return {"title": title, "pairs": pairs, "hash_like": hash_like, "opened": opened,
                "hashed_later": False}

    blocks = [
        block("Source checkpoint",
              [("id", source.get("id") or reference.get("source")),
               ("sha256", source.get("sha256") or reference.get("checkpoint_sha256")),
               ("architecture", source.get("architecture"))], hash_like=True),
        block("Eval set", [("file", evalset and evalset.file),
                           ("sha256", evalset and evalset.sha256)], hash_like=True),
        block("Toolchain", scalars(dig(manifest, "toolchain"))),
        block("Host (the CPU behind these figures)", scalars(report.host)),
        block("Reference", scalars(reference), opened=False),
        block("Candidate", scalars(report.candidate), opened=False),
        block("Timing", scalars(report.timing), opened=False)]
    files = dig(manifest, "files")
    if isinstance(files, dict):
        blocks.append(block(f"Bundle files ({len(files)}, sha256)", sorted(files.items()),
                            hash_like=True, opened=False))
    elif manifest is not None:
        # a manifest without files: the template says they were hashed after this report
        blocks.append({**block("Bundle files", [], opened=False), "hashed_later": True})
    return blocks


def render_html(report: ParityReport, manifest: dict[str, Any] | None = None,
                name: str | None = None) -> str:
    facts = bundle_facts(report, manifest, name)
    top1_chart, top1_caption = top1_svg(report)
    drift_chart, drift_caption = drift_svg(report)
    return environment().get_template("report.html.j2").render(
        title=f"{report.verdict.upper()} · {facts['name']} · phikit parity",
        verdict=report.verdict, facts=facts, summary=verdict_summary(report),
        checks=report.checks, other_metrics=other_metrics(report),
        kld_chart=Markup(kld_histogram_svg(report)),
        top1_chart=Markup(top1_chart), top1_caption=top1_caption,
        drift_chart=Markup(drift_chart), drift_caption=drift_caption,
        bands=bands_rows(report), texts=texts_rows(report), generations=generations(report),
        tokenizer=tokenizer(report), notes=report.notes,
        provenance=provenance(report, manifest))


def compare_html(a: LoadedReport, b: LoadedReport) -> str:
    return environment().get_template("compare.html.j2").render(compare_page(a, b))
