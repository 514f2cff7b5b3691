"""Read-outs of a report shared by every renderer: formatting, the facts that name a bundle,
which checks, texts and prompts miss a bound, where generations diverge."""

from __future__ import annotations

import html
import math
import os
from typing import Any

from .model import KLD_HISTOGRAM_EDGES, Check, ParityReport

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


def relation(kind: str) -> str:
    return "≤" if kind == "max" else "≥"


def check_line(check: dict[str, Any]) -> str:
    """'kld_mean 0.031 (needs ≤ 0.02)': the JUnit message and the Markdown failure list."""
    return Check.model_validate(check).describe()


def report_data(report: ParityReport | dict[str, Any]) -> dict[str, Any]:
    """What the renderers read: the report as JSON data (a typed report is dumped once)."""
    return report.to_json() if isinstance(report, ParityReport) else report


def bundle_facts(report: ParityReport | dict[str, Any], manifest: dict[str, Any] | None,
                 name: str | None = None) -> dict[str, str]:
    """What the reader needs to know which artifact this is, from the manifest when there is
    one (bare artifacts validated with --json have none)."""
    report = report_data(report)
    if manifest is None and isinstance(report.get("bundle"), dict):
        manifest = report["bundle"]  # a device's report (run.py validate) names its bundle
    candidate = report.get("candidate") or {}
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
            "artifact": fmt(report.get("artifact")),
            "created": fmt(dig(manifest, "created"))}


def failed_checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in report["checks"] if not c["passed"]]


def find_check(report: dict[str, Any], metric: str) -> dict[str, Any] | None:
    return next((c for c in report["checks"] if c["metric"] == metric), None)


def beyond(value: Any, check: dict[str, Any] | None) -> bool:
    """Whether one text's or prompt's value is on the wrong side of an overall check's bound."""
    if check is None or not isinstance(value, (int, float)):
        return False
    return value > check["bound"] if check["kind"] == "max" else value < check["bound"]


def text_problems(text: dict[str, Any], report: dict[str, Any],
                  only_failed: bool = False) -> list[str]:
    """Which of this text's figures miss the bound of the overall check of the same metric (with
    only_failed: of a check that failed, so a passing report never blames a text)."""
    problems = []
    for metric in ("kld_mean", "top1"):
        check = find_check(report, metric)
        if check and (check["passed"] is False or not only_failed) and beyond(text.get(metric),
                                                                                 check):
            problems.append(f"{metric} {fmt(text.get(metric))} "
                            f"(overall bound {relation(check['kind'])} {fmt(check['bound'])})")
    return problems


def prompt_problem(prompt: dict[str, Any], report: dict[str, Any],
                   only_failed: bool = False) -> str:
    check = find_check(report, "greedy_match_mean")
    if check and (check["passed"] is False or not only_failed) and beyond(prompt.get("match"),
                                                                            check):
        return (f"{plural(prompt.get('match'), 'token')} before diverging: under the "
                f"greedy_match_mean bound {relation(check['kind'])} {fmt(check['bound'])}")
    return ""


def split_generation(prompt: dict[str, Any]) -> tuple[str, str, str]:
    """(common prefix, reference rest, candidate rest) at the first divergence.

    parity's common_text is the detokenized common token prefix, the honest divergence point.
    Detokenizing a prefix is not always a prefix of the whole detokenized text (a piece that
    completes a multi-byte character, SentencePiece's leading space), so it is used only when it
    starts both texts; otherwise, and in reports from before it, the character-level common
    prefix stands in."""
    reference = str(prompt.get("reference_text") or "")
    candidate = str(prompt.get("candidate_text") or "")
    common = prompt.get("common_text")
    if not (isinstance(common, str) and reference.startswith(common)
            and candidate.startswith(common)):
        common = os.path.commonprefix([reference, candidate])
    return common, reference[len(common):], candidate[len(common):]


def top1_by_position(texts: list[dict[str, Any]]) -> list[float]:
    """Mean over the texts long enough to have each position (texts differ in length)."""
    rows = [t["top1_by_position"] for t in texts if isinstance(t.get("top1_by_position"), list)]
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


def landmarks_of(report: dict[str, Any]) -> dict[str, int]:
    marks = report.get("landmarks")
    if isinstance(marks, dict):
        return {k: v for k, v in marks.items() if isinstance(v, int)}
    return {}


def band_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for b in report.get("bands") or [] if isinstance(b, dict) and b.get("name")]


def band_failed(report: dict[str, Any], band: dict[str, Any]) -> bool:
    return any(not c["passed"] for c in report["checks"]
               if c["metric"].endswith(f"[{band['name']}]"))


def esc(value: Any) -> str:
    """A value as HTML text, formatted as fmt does: the one escaping of report text in markup
    (the SVG charts call it, and the page templates apply it to every value they print)."""
    return html.escape(value if isinstance(value, str) else fmt(value), quote=True)
