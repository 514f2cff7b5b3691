"""Read-outs of a report shared by every renderer: formatting, the facts that name a bundle,
which texts and prompts miss an overall check's bound, where generations diverge. The checks
themselves (which failed, one by metric, their wording) are the model's."""

from __future__ import annotations

import html
import math
import os
from typing import Any

from .model import KLD_HISTOGRAM_EDGES, Band, ParityReport, PromptRow, TextRow

HISTOGRAM_EDGES = KLD_HISTOGRAM_EDGES  # the bins parity counts in
LANDMARK_LABELS = {"sliding_window": "sliding window", "original_length": "original length"}
COMPARE_METRICS = ("kld_mean", "kld_p99", "top1", "ppl_ratio", "greedy_match_mean",
                   "token_agreement")
BAND_METRICS = ("kld_mean", "kld_p99", "top1")


def dig(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def plural(n: Any, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def bundle_facts(report: ParityReport, manifest: dict[str, Any] | None,
                 name: str | None = None) -> dict[str, str]:
    """What the reader needs to know which artifact this is, from the manifest when there is
    one (bare artifacts validated with --json have none)."""
    if manifest is None and report.bundle is not None:
        manifest = report.bundle  # a device's report (run.py validate) names its bundle
    candidate = report.candidate
    runtime = " ".join(str(x) for x in (candidate.get("runtime"), candidate.get("version")) if x)
    if candidate.get("device") and candidate.get("cpu_fallback") is not None:
        # runtimes that place nodes on an accelerator say where they ran and whether any could
        # have fallen back to the CPU (the QNN runner)
        nodes = candidate.get("nodes_by_provider") or {}
        placed = ", ".join(f"{n} nodes on {ep}" for ep, n in nodes.items())
        runtime += (f" on {candidate['device']}, CPU fallback "
                    f"{'on' if candidate['cpu_fallback'] else 'off'}" + (f", {placed}" if placed else ""))
    return {"name": name or dig(manifest, "name") or "parity report",
            "backend": fmt(dig(manifest, "backend")),
            "precision": fmt(dig(manifest, "recipe", "quantization", "precision")),
            "target": fmt(dig(manifest, "target", "name")),
            "runtime": runtime or "—",
            "artifact": fmt(report.artifact),
            "created": fmt(dig(manifest, "created"))}


def text_problems(text: TextRow, report: ParityReport, only_failed: bool = False) -> list[str]:
    """Which of this text's figures miss the bound of the overall check of the same metric (with
    only_failed: of a check that failed, so a passing report never blames a text)."""
    problems = []
    for metric, value in (("kld_mean", text.kld_mean), ("top1", text.top1)):
        check = report.check(metric)
        if check and (not check.passed or not only_failed) and check.missed_by(value):
            problems.append(f"{metric} {fmt(value)} "
                            f"(overall bound {check.relation} {fmt(check.bound)})")
    return problems


def prompt_problem(prompt: PromptRow, report: ParityReport, only_failed: bool = False) -> str:
    check = report.check("greedy_match_mean")
    if check and (not check.passed or not only_failed) and check.missed_by(prompt.match):
        return (f"{plural(prompt.match, 'token')} before diverging: under the "
                f"greedy_match_mean bound {check.relation} {fmt(check.bound)}")
    return ""


def split_generation(prompt: PromptRow) -> tuple[str, str, str]:
    """(common prefix, reference rest, candidate rest) at the first divergence.

    parity's common_text is the detokenized common token prefix, the honest divergence point.
    Detokenizing a prefix is not always a prefix of the whole detokenized text (a piece that
    completes a multi-byte character, SentencePiece's leading space), so it is used only when it
    starts both texts; otherwise, and in reports from before it, the character-level common
    prefix stands in."""
    reference, candidate, common = (prompt.reference_text, prompt.candidate_text,
                                    prompt.common_text)
    if not (common is not None and reference.startswith(common)
            and candidate.startswith(common)):
        common = os.path.commonprefix([reference, candidate])
    return common, reference[len(common):], candidate[len(common):]


def top1_by_position(texts: list[TextRow]) -> list[float]:
    """Mean over the texts long enough to have each position (texts differ in length)."""
    rows = [t.top1_by_position for t in texts]
    length = max((len(r) for r in rows), default=0)
    means = []
    for pos in range(length):
        values = [r[pos] for r in rows if pos < len(r)]
        means.append(sum(values) / len(values))
    return means


def moving_average(values: list[float], window: int) -> list[float]:
    """Centred, shrinking at the ends: per-position top-1 over a dozen texts is 0/1 noise."""
    half = window // 2
    out = []
    for i in range(len(values)):
        part = values[max(0, i - half): i + half + 1]
        out.append(sum(part) / len(part))
    return out


def band_failed(report: ParityReport, band: Band) -> bool:
    return any(not c.passed for c in report.checks if c.metric.endswith(f"[{band.name}]"))


def esc(value: Any) -> str:
    """A value as HTML text, formatted as fmt does: the one escaping of report text in markup
    (the SVG charts call it, and the page templates apply it to every value they print)."""
    return html.escape(value if isinstance(value, str) else fmt(value), quote=True)
