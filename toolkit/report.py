"""The parity report people read: one self-contained HTML page, a Markdown summary for CI job
pages, JUnit XML for CI test tabs, and a side-by-side comparison of two bundles of one model.

Input is a bundle directory (parity.json + manifest.json, `<name>.failed` included) or the JSON
`phikit validate --json` writes. Reports written before position bands, landmarks and per-prompt
`common_text` existed still render: every key newer than verdict/checks/metrics is optional.

The HTML has no scripts and no network references (a Content-Security-Policy forbids both), its
charts are inline SVG drawn here, and every text from the report is escaped: generated text and
eval-set ids are data, never markup.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .errors import PhikitError
from .runner.core import MANIFEST

PARITY = "parity.json"
# parity.evaluate histograms log10(max(KLD, 1e-8)) over np.arange(-8, 2.5, 0.5): 20 bins
HISTOGRAM_EDGES = [-8 + 0.5 * i for i in range(21)]
LANDMARK_LABELS = {"sliding_window": "sliding window", "original_length": "original length"}
COMPARE_METRICS = ("kld_mean", "kld_p99", "top1", "ppl_ratio", "greedy_match_mean",
                   "token_agreement")
BAND_METRICS = ("kld_mean", "kld_p99", "top1")


# ---------------------------------------------------------------------------------- loading

@dataclass
class LoadedReport:
    report: dict[str, Any]
    manifest: dict[str, Any] | None
    path: Path            # what the user named
    bundle: Path | None   # the bundle directory, when the report came from one

    @property
    def name(self) -> str:
        if self.manifest and self.manifest.get("name"):
            return str(self.manifest["name"])
        return (self.bundle or self.path).name


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PhikitError("no such file", file=path) from None
    except json.JSONDecodeError as e:
        raise PhikitError(f"invalid JSON: {e.msg} (column {e.colno})", file=path,
                          line=e.lineno) from None
    except UnicodeDecodeError:
        raise PhikitError("not a text file (invalid UTF-8)", file=path) from None
    except OSError as e:
        raise PhikitError(f"cannot read: {e.strerror}", file=path) from None


def check_report(report: Any, path: Path) -> dict[str, Any]:
    """Only the keys every report since the first one has; the rest is rendered if present."""
    why = ""
    if not isinstance(report, dict):
        why = f"a JSON {type(report).__name__}"
    elif report.get("verdict") not in ("pass", "fail"):
        why = "no verdict 'pass' or 'fail'"
    elif not isinstance(report.get("checks"), list) or not isinstance(report.get("metrics"),
                                                                       dict):
        why = "no checks list or metrics object"
    elif not all(isinstance(c, dict) and {"metric", "measured", "bound", "kind", "passed"}
                 <= set(c) for c in report["checks"]):
        why = "a check without metric/measured/bound/kind/passed"
    if why:
        raise PhikitError(f"not a parity report ({why}); expected a bundle directory or the "
                          "JSON `phikit validate --json` writes", file=path)
    return report


def load_report(path: str | Path) -> LoadedReport:
    """A bundle directory, its parity.json or manifest.json, or a `phikit validate --json` file."""
    path = Path(path)
    bundle = None
    if path.is_dir():
        bundle = path
    elif path.name == MANIFEST or (path.name == PARITY and (path.parent / MANIFEST).is_file()):
        bundle = path.parent
    elif not path.exists():
        raise PhikitError("no such file or directory", file=path)
    if bundle is None:
        return LoadedReport(check_report(read_json(path), path), None, path, None)
    report_file = bundle / PARITY
    if not report_file.is_file():
        raise PhikitError(f"not a phikit bundle: no {PARITY} in it", file=bundle)
    manifest = None
    if (bundle / MANIFEST).is_file():
        manifest = read_json(bundle / MANIFEST)
        if not isinstance(manifest, dict):
            raise PhikitError("not a bundle manifest (not a JSON object)", file=bundle / MANIFEST)
    return LoadedReport(check_report(read_json(report_file), report_file), manifest, path, bundle)


def write_text_atomic(path: Path, text: str) -> None:
    """Readers (a CI artifact upload, a browser reload) never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # same directory: replace is atomic
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise PhikitError(f"cannot write: {e.strerror}", file=path) from None


# ------------------------------------------------------------------------- shared read-outs

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
    return (f"{check['metric']} {fmt(check['measured'])} "
            f"(needs {relation(check['kind'])} {fmt(check['bound'])})")


def bundle_facts(report: dict[str, Any], manifest: dict[str, Any] | None,
                 name: str | None = None) -> dict[str, str]:
    """What the reader needs to know which artifact this is, from the manifest when there is
    one (bare artifacts validated with --json have none)."""
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


# ------------------------------------------------------------------------------ HTML pieces

def esc(value: Any) -> str:
    return html.escape(value if isinstance(value, str) else fmt(value), quote=True)


CSS = """
:root { --pass: #1a7f37; --fail: #cf222e; --muted: #57606a; --line: #d0d7de; --soft: #f6f8fa; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       margin: 0 auto; max-width: 1200px; padding: 24px; }
h1 { margin: 0; font-size: 44px; letter-spacing: 2px; }
h2 { margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.verdict { border-radius: 10px; padding: 18px 24px; color: #fff; }
.verdict.pass { background: var(--pass); } .verdict.fail { background: var(--fail); }
.verdict.compare { background: #24292f; }
.verdict .facts { font-size: 17px; margin-top: 4px; }
.verdict .summary { margin-top: 8px; }
.muted { color: var(--muted); }
table { border-collapse: collapse; width: 100%; margin: 8px 0; font-size: 14px; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: var(--soft); }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.kv { width: auto; min-width: 50%; } table.kv th { width: 16em; }
table.kv td.num { text-align: left; }
tr.failed td { background: #ffebe9; } tr.over td { background: #fff8c5; }
td.ok { color: var(--pass); font-weight: 600; } td.bad { color: var(--fail); font-weight: 700; }
.mono, td.hash { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
                 font-size: 12px; word-break: break-all; }
svg.chart { display: block; max-width: 100%; height: auto; background: #fff; }
svg.chart text { font: 11px system-ui, sans-serif; fill: #1f2328; }
svg.chart text.label { paint-order: stroke; stroke: #fff; stroke-width: 3px; }  /* over lines */
figure { margin: 8px 0; } figcaption { color: var(--muted); font-size: 13px; }
.gen { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; margin: 6px 0 18px;
       align-items: start; }
.gen.three { grid-template-columns: 1fr 1fr 1fr; }
.gen h4 { margin: 0 0 2px; font-size: 13px; color: var(--muted); }
.gen pre { margin: 0; padding: 8px; background: var(--soft); border: 1px solid var(--line);
           border-radius: 6px; white-space: pre-wrap; word-break: break-word; min-height: 2.5em;
           font: 13px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
mark { background: #ffd8b5; border-radius: 2px; } mark .ws { color: #bc4c00; }
.prompt-head { margin-top: 14px; font-weight: 600; }
details { margin: 8px 0; } summary { cursor: pointer; font-weight: 600; }
"""


def page(title: str, body: str) -> str:
    # default-src 'none': the page can fetch nothing and run nothing; only its own styles apply
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "style-src 'unsafe-inline'\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n"
            "</body>\n</html>\n")


def html_table(header: Iterable[str] | None, rows: Iterable[tuple[Iterable[str], str]],
               table_id: str = "", table_class: str = "") -> str:
    """rows: (cells as ready HTML, row class). Cells come escaped by the caller, which knows
    which hold numbers (class num) and which hold markup such as <mark>."""
    head = ("<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead>"
            if header else "")
    body = "".join(f'<tr class="{cls}">' + "".join(cells) + "</tr>\n" for cells, cls in rows)
    attrs = (f' id="{table_id}"' if table_id else "") + (
        f' class="{table_class}"' if table_class else "")
    return f"<table{attrs}>{head}<tbody>\n{body}</tbody></table>"


def td(value: Any, cls: str = "") -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    classes = " ".join(x for x in (cls, "num" if numeric else "") if x)
    return f'<td class="{classes}">{esc(value)}</td>' if classes else f"<td>{esc(value)}</td>"


def key_value_table(pairs: Iterable[tuple[str, Any]], hash_like: bool = False) -> str:
    """'' when there are no pairs, so callers can leave the section out."""
    cls = "hash" if hash_like else ""
    rows = [((f"<th>{esc(k)}</th>", td(v, cls)), "") for k, v in pairs]
    return html_table(None, rows, table_class="kv") if rows else ""


def generated_text(text: str, show_breaks: bool) -> str:
    """Escaped text with runs of blank lines folded to one '↵×N' line (small models emit
    dozens), and with show_breaks every line break drawn, since whitespace alone in a highlight
    is invisible."""
    out = []
    for i, piece in enumerate(re.split(r"(\n{3,})", text)):
        if i % 2:
            out.append(f'<span class="ws">↵×{len(piece)}</span>\n')
        elif show_breaks:
            out.append(esc(piece).replace("\n", '<span class="ws">↵</span>\n'))
        else:
            out.append(esc(piece))
    return "".join(out)


def generation_pre(common: str, rest: str, ended: bool) -> str:
    """One side of a generation: the common prefix plain, the rest in <mark>; a side that
    stopped at the divergence says so."""
    if rest:
        tail = f"<mark>{generated_text(rest, True)}</mark>"
    else:
        tail = '<mark class="stop">[stopped here]</mark>' if ended else ""
    return f"<pre>{generated_text(common, False)}{tail}</pre>"


# ------------------------------------------------------------------------------------- SVG

@dataclass
class Plot:
    """Maps data coordinates into an SVG box with room for axis labels."""
    x_min: float
    x_max: float
    y_min: float
    y_max: float
    width: int = 1000
    height: int = 280
    left: int = 56
    right: int = 16
    top: int = 28
    bottom: int = 46
    # marker labels, drawn last (by close) so that no later line crosses them
    labels: list[str] = field(default_factory=list)

    def x(self, v: float) -> float:
        span = (self.x_max - self.x_min) or 1.0
        return self.left + (v - self.x_min) / span * (self.width - self.left - self.right)

    def y(self, v: float) -> float:
        span = (self.y_max - self.y_min) or 1.0
        return self.height - self.bottom - (v - self.y_min) / span * (
            self.height - self.top - self.bottom)

    def open(self, svg_id: str, title: str) -> str:
        return (f'<svg id="{svg_id}" class="chart" viewBox="0 0 {self.width} {self.height}" '
                f'width="{self.width}" height="{self.height}" role="img" '
                f'aria-labelledby="{svg_id}-title"><title id="{svg_id}-title">{esc(title)}'
                "</title>")

    def axes(self, x_ticks: list[tuple[float, str]], y_ticks: list[tuple[float, str]],
             x_label: str, y_label: str) -> str:
        bottom, left = self.height - self.bottom, self.left
        parts = [f'<line x1="{left}" y1="{bottom}" x2="{self.width - self.right}" '
                 f'y2="{bottom}" stroke="#57606a"/>',
                 f'<line x1="{left}" y1="{self.top}" x2="{left}" y2="{bottom}" '
                 'stroke="#57606a"/>']
        for v, label in x_ticks:
            x = self.x(v)
            parts.append(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" '
                         f'stroke="#57606a"/><text x="{x:.1f}" y="{bottom + 16}" '
                         f'text-anchor="middle">{label}</text>')
        for v, label in y_ticks:
            y = self.y(v)
            parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{self.width - self.right}" '
                         f'y2="{y:.1f}" stroke="#eaeef2"/><text x="{left - 6}" y="{y + 4:.1f}" '
                         f'text-anchor="end">{label}</text>')
        parts.append(f'<text x="{(left + self.width - self.right) / 2:.0f}" '
                     f'y="{self.height - 8}" text-anchor="middle">{esc(x_label)}</text>')
        parts.append(f'<text transform="translate(14 {(self.top + bottom) / 2:.0f}) '
                     f'rotate(-90)" text-anchor="middle">{esc(y_label)}</text>')
        return "".join(parts)

    def vline(self, v: float, label: str, color: str, row: int = 0, dashed: bool = True) -> str:
        x = self.x(v)
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        anchor = "end" if x > self.width * 0.75 else "start"
        dx = -4 if anchor == "end" else 4
        self.labels.append(f'<text class="label" x="{x + dx:.1f}" '
                           f'y="{self.top + 10 + 12 * row}" text-anchor="{anchor}" '
                           f'style="fill:{color}">{esc(label)}</text>')
        return (f'<line x1="{x:.1f}" y1="{self.top}" x2="{x:.1f}" '
                f'y2="{self.height - self.bottom}" stroke="{color}" stroke-width="1.5"{dash}/>')

    def hline(self, v: float, label: str, color: str) -> str:
        y = self.y(v)
        self.labels.append(f'<text class="label" x="{self.width - self.right - 4}" '
                           f'y="{y + 13:.1f}" text-anchor="end" '
                           f'style="fill:{color}">{esc(label)}</text>')
        return (f'<line x1="{self.left}" y1="{y:.1f}" x2="{self.width - self.right}" '
                f'y2="{y:.1f}" stroke="{color}" stroke-width="1.5" stroke-dasharray="5 3"/>')

    def close(self) -> str:
        return "".join(self.labels) + "</svg>"

    def polyline(self, xs: Iterable[float], ys: Iterable[float], color: str,
                 width: float) -> str:
        points = " ".join(f"{self.x(x):.1f},{self.y(y):.1f}" for x, y in zip(xs, ys))
        return (f'<polyline points="{points}" fill="none" stroke="{color}" '
                f'stroke-width="{width}" stroke-linejoin="round"/>')


def nice_ticks(top: float, count: int = 4) -> list[float]:
    """0 and round steps (1, 2, 5 x 10^k) up to at least `top`."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(int(math.ceil(top / step)) + 1)]


def power_label(exponent: int) -> str:
    return f'10<tspan dy="-5" font-size="9">{exponent}</tspan>'


def kld_histogram_svg(report: dict[str, Any]) -> str:
    counts = dig(report, "metrics", "kld_histogram")
    if not isinstance(counts, list) or len(counts) != len(HISTOGRAM_EDGES) - 1:
        return ('<svg id="kld-histogram" class="chart" viewBox="0 0 1000 60" width="1000" '
                'height="60"><text x="10" y="30">no per-position KLD in this report</text></svg>')
    y_ticks = nice_ticks(max(counts))
    plot = Plot(HISTOGRAM_EDGES[0], HISTOGRAM_EDGES[-1], 0, y_ticks[-1])
    parts = [plot.open("kld-histogram", "KL divergence per position, log10 bins"),
             plot.axes([(e, power_label(int(e))) for e in HISTOGRAM_EDGES if e == int(e)],
                       [(v, fmt(int(v) if v == int(v) else v)) for v in y_ticks],
                       "KL(reference ‖ candidate) per position", "positions")]
    total = sum(counts) or 1
    for lo, count in zip(HISTOGRAM_EDGES, counts):
        x0, x1 = plot.x(lo) + 1, plot.x(lo + 0.5) - 1
        y = plot.y(count)
        parts.append(f'<rect class="bin" x="{x0:.1f}" y="{y:.1f}" width="{x1 - x0:.1f}" '
                     f'height="{plot.y(0) - y:.1f}" fill="#0969da"><title>KLD 1e{lo:g} to '
                     f'1e{lo + 0.5:g}: {count} positions ({100 * count / total:.1f}%)</title>'
                     "</rect>")
    lines = [(dig(report, "metrics", "kld_mean"), "mean", "#0550ae", False),
             (find_check(report, "kld_mean"), "mean bound", "#cf222e", True),
             (find_check(report, "kld_p99"), "p99 bound", "#bc4c00", True)]
    row = 0
    for value, label, color, dashed in lines:
        value = value["bound"] if isinstance(value, dict) else value
        if isinstance(value, (int, float)) and value > 0:
            exponent = math.log10(value)
            if HISTOGRAM_EDGES[0] <= exponent <= HISTOGRAM_EDGES[-1]:
                parts.append(plot.vline(exponent, f"{label} {fmt(value)}", color, row, dashed))
                row += 1
    return "".join(parts) + plot.close()


def top1_svg(report: dict[str, Any]) -> tuple[str, str]:
    """(svg, caption): mean top-1 agreement at each position, smoothed, with the landmarks."""
    means = top1_by_position(report.get("texts") or [])
    if not means:
        return ('<svg id="top1-by-position" class="chart" viewBox="0 0 1000 60" width="1000" '
                'height="60"><text x="10" y="30">no per-position top-1 in this report</text>'
                "</svg>", "")
    last = len(means) - 1
    window = max(1, len(means) // 32)
    x_ticks = [v for v in nice_ticks(max(last, 1), 8) if v <= last]
    plot = Plot(0, max(last, 1), 0, 1)
    parts = [plot.open("top1-by-position", "Top-1 agreement by position"),
             plot.axes([(v, fmt(int(v))) for v in x_ticks],
                       [(v / 4, f"{v / 4:g}") for v in range(5)], "position", "top-1 agreement"),
             plot.polyline(range(len(means)), means, "#afb8c1", 1),
             plot.polyline(range(len(means)), moving_average(means, window), "#0969da", 2.5)]
    check = find_check(report, "top1")
    if check:
        parts.append(plot.hline(check["bound"], f"bound {fmt(check['bound'])}", "#cf222e"))
    outside = []
    for row, (key, position) in enumerate(sorted(landmarks_of(report).items())):
        label = LANDMARK_LABELS.get(key, key)
        if position <= last:
            parts.append(plot.vline(position, f"{label} {position}", "#8250df", row))
        else:
            outside.append(f"{label} at {position}")
    texts = len([t for t in report.get("texts") or [] if t.get("top1_by_position")])
    caption = (f"Mean over {texts} texts of whether candidate and reference pick the same most "
               f"likely token (grey: per position; blue: moving average over {window} "
               "positions).")
    if outside:
        caption += (f" Beyond the {len(means)} positions the eval set reaches: "
                    + ", ".join(outside) + ".")
    return "".join(parts) + plot.close(), caption


# --------------------------------------------------------------------------- HTML sections

def verdict_section(report: dict[str, Any], facts: dict[str, str]) -> str:
    verdict = report["verdict"]
    failed = failed_checks(report)
    if failed:
        summary = (f"{len(failed)} of {len(report['checks'])} checks failed: "
                   + "; ".join(check_line(c) for c in failed))
    else:
        summary = f"all {len(report['checks'])} checks passed"
    keys = ("backend", "precision", "target", "runtime")
    detail = " · ".join(f"{k} <b>{esc(facts[k])}</b>" for k in keys)
    return (f'<header id="verdict" class="verdict {esc(verdict)}" data-verdict="{esc(verdict)}">'
            f"<h1>{esc(verdict.upper())}</h1>"
            f'<div class="facts"><b>{esc(facts["name"])}</b> · {detail}</div>'
            f'<div class="summary">{esc(summary)}</div>'
            f'<div class="summary">created {esc(facts["created"])} · artifact '
            f"{esc(facts['artifact'])}</div></header>")


def checks_section(report: dict[str, Any]) -> str:
    rows = []
    for c in report["checks"]:
        cells = (td(c["metric"]), td(c["measured"]),
                 f'<td class="num">{esc(relation(c["kind"]))} {esc(c["bound"])}</td>',
                 td("ok" if c["passed"] else "FAIL", "ok" if c["passed"] else "bad"),
                 td(c.get("detail") or ""))
        rows.append((cells, "" if c["passed"] else "failed"))
    m = report["metrics"]
    extra = [("positions", m.get("positions")), ("texts", m.get("texts")),
             ("prompts", m.get("prompts")), ("KLD median", m.get("kld_median")),
             ("KLD max", m.get("kld_max")), ("perplexity reference", m.get("ppl_reference")),
             ("perplexity candidate", m.get("ppl_candidate")),
             ("greedy match min", m.get("greedy_match_min")),
             ("greedy exact share", m.get("greedy_exact"))]
    return ('<section id="checks"><h2>Thresholds vs measured</h2>'
            + html_table(("metric", "measured", "bound", "result", "detail"), rows,
                         "checks-table")
            + "<details><summary>other metrics</summary>" + key_value_table(extra)
            + "</details></section>")


def band_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for b in report.get("bands") or [] if isinstance(b, dict) and b.get("name")]


def band_failed(report: dict[str, Any], band: dict[str, Any]) -> bool:
    return any(not c["passed"] for c in report["checks"]
               if c["metric"].endswith(f"[{band['name']}]"))


def bands_table(report: dict[str, Any]) -> str:
    bands = band_rows(report)
    if not bands:
        return ""
    rows = []
    for b in bands:
        end = b.get("end")
        span = f"{b.get('start', 0)}–{end - 1}" if isinstance(end, int) else f"{b.get('start')}–"
        worst = b.get("worst") or {}
        worst_text = (f"{worst.get('id')} (KLD {fmt(worst.get('kld_mean'))}, max at "
                      f"{worst.get('position')})" if worst else "—")
        greedy = (f"{fmt(b.get('greedy_match_mean'))} ({b.get('prompts')} prompts)"
                  if "greedy_match_mean" in b else "—")
        cells = (td(b["name"]), td(b.get("description") or ""), td(span), td(b.get("positions")),
                 td("checked" if b.get("checked") else "reported only"), td(b.get("kld_mean")),
                 td(b.get("kld_p99")), td(b.get("top1")), td(greedy), td(worst_text))
        rows.append((cells, "failed" if band_failed(report, b) else ""))
    return ("<h3>Position bands</h3>"
            + html_table(("band", "description", "positions", "count", "status", "KLD mean",
                          "KLD p99", "top-1", "greedy match", "worst text"), rows, "bands-table"))


def texts_section(report: dict[str, Any]) -> str:
    texts = report.get("texts") or []
    rows = []
    for t in texts:
        problems = text_problems(t, report)
        cells = (td(t.get("id")), td(t.get("tokens")), td(t.get("kld_mean")), td(t.get("kld_max")),
                 td(t.get("kld_max_position")), td(t.get("top1")), td("; ".join(problems)))
        rows.append((cells, "over" if problems else ""))
    return ('<section id="texts"><h2>Per text</h2>'
            '<p class="muted">Teacher-forced on the reference\'s tokens; yellow rows miss an '
            "overall bound on their own.</p>"
            + html_table(("text", "tokens", "KLD mean", "KLD max", "max at", "top-1", "note"),
                         rows, "texts-table") + "</section>")


def generations_section(report: dict[str, Any]) -> str:
    prompts = report.get("prompts") or []
    parts = ['<section id="generations"><h2>Greedy generations</h2>'
             '<p class="muted">Reference (transformers) and candidate continue each prompt '
             "greedily; the text after their first divergence is highlighted.</p>"]
    for p in prompts:
        common, ref_rest, cand_rest = split_generation(p)
        exact = bool(p.get("exact"))
        status = "identical" if exact else f"diverged after {plural(p.get('match'), 'token')}"
        problem = prompt_problem(p, report)
        parts.append(f'<div class="prompt-head">{esc(p.get("id"))} <span class="muted">— '
                     f"{esc(status)} (reference {esc(plural(p.get('reference_tokens'), 'token'))}, "
                     f"candidate {esc(p.get('candidate_tokens'))})"
                     + (f" · {esc(problem)}" if problem else "") + "</span></div>"
                     '<div class="gen"><div><h4>reference</h4>'
                     + generation_pre(common, ref_rest, not exact) + "</div><div><h4>candidate</h4>"
                     + generation_pre(common, cand_rest, not exact) + "</div></div>")
    if not prompts:
        parts.append("<p>No prompts in this eval set.</p>")
    return "".join(parts) + "</section>"


def tokenizer_section(report: dict[str, Any]) -> str:
    mismatches = report.get("tokenizer_mismatches") or []
    info = report.get("tokenizer") or {}
    m = report["metrics"]
    rows_total = info.get("rows", (m.get("texts") or 0) + (m.get("prompts") or 0))
    identical = info.get("identical", rows_total - len(mismatches))
    summary = key_value_table([("eval rows", rows_total), ("tokenized identically", identical),
                               ("chat-formatted rows", info.get("chat_rows")),
                               ("token agreement", m.get("token_agreement"))])
    rows = [((td(x.get("id")), td(x.get("first_difference")), td(repr(x.get("context", ""))),
              td(str(x.get("reference_tokens"))), td(str(x.get("candidate_tokens")))), "")
            for x in mismatches]
    table = (html_table(("row", "first differing token", "context", "reference ids",
                         "candidate ids"), rows, "tokenizer-mismatches")
             if rows else "<p>Every row tokenized exactly like the reference.</p>")
    return ('<section id="tokenizer"><h2>Tokenizer round trip</h2>' + summary + table
            + "</section>")


def notes_section(report: dict[str, Any]) -> str:
    notes = report.get("notes") or []
    if not notes:
        return ""
    return ('<section id="notes"><h2>Notes</h2><ul>'
            + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul></section>")


def scalars(data: Any) -> list[tuple[str, Any]]:
    """A dict's plain values (lists such as eos ids and nested dicts shown as JSON)."""
    if not isinstance(data, dict):
        return []
    return [(k, v if isinstance(v, (str, int, float, bool)) or v is None
             else json.dumps(v, default=str)) for k, v in data.items()]


def provenance_section(report: dict[str, Any], manifest: dict[str, Any] | None) -> str:
    source = dig(manifest, "source") or {}
    reference = report.get("reference") or {}
    source_pairs = [("id", source.get("id") or reference.get("source")),
                    ("sha256", source.get("sha256") or reference.get("checkpoint_sha256")),
                    ("architecture", source.get("architecture"))]
    evalset = report.get("evalset") or {}
    blocks = [("Source checkpoint", key_value_table(source_pairs, hash_like=True), True),
              ("Eval set", key_value_table([("file", evalset.get("file")),
                                            ("sha256", evalset.get("sha256"))], True), True),
              ("Toolchain", key_value_table(scalars(dig(manifest, "toolchain"))), True),
              ("Host (the CPU behind these figures)",
               key_value_table(scalars(report.get("host"))), True),
              ("Reference", key_value_table(scalars(reference)), False),
              ("Candidate", key_value_table(scalars(report.get("candidate"))), False),
              ("Timing", key_value_table(scalars(report.get("timing"))), False)]
    files = dig(manifest, "files")
    if isinstance(files, dict):
        blocks.append((f"Bundle files ({len(files)}, sha256)",
                       key_value_table(sorted(files.items()), hash_like=True), False))
    elif manifest is not None:
        blocks.append(("Bundle files", "<p>Hashed after this report was written: see the "
                       "bundle's manifest.json.</p>", False))
    body = "".join(f"<details{' open' if opened else ''}><summary>{esc(title)}</summary>"
                   f"{content}</details>" for title, content, opened in blocks if content)
    return f'<section id="provenance"><h2>Provenance</h2>{body}</section>'


def render_html(report: dict[str, Any], manifest: dict[str, Any] | None = None,
                name: str | None = None) -> str:
    facts = bundle_facts(report, manifest, name)
    chart, caption = top1_svg(report)
    body = "\n".join([
        verdict_section(report, facts),
        checks_section(report),
        '<section id="kld"><h2>KL divergence per position</h2><figure>'
        + kld_histogram_svg(report)
        + "<figcaption>Positions per log10 bin of KL(reference ‖ candidate); KLD below 1e-8 "
          "counts in the first bin.</figcaption></figure></section>",
        '<section id="top1"><h2>Top-1 agreement by position</h2><figure>' + chart
        + f"<figcaption>{esc(caption)}</figcaption></figure>" + bands_table(report)
        + "</section>",
        texts_section(report),
        generations_section(report),
        tokenizer_section(report),
        notes_section(report),
        provenance_section(report, manifest),
    ])
    return page(f"{report['verdict'].upper()} · {facts['name']} · phikit parity", body)


# -------------------------------------------------------------------------------- Markdown

def md_cell(value: Any) -> str:
    """One table cell: pipes and line breaks would end the cell, markup would render."""
    text = value if isinstance(value, str) else fmt(value)
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", "↵")


def md_table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    header = list(header)
    lines = ["| " + " | ".join(md_cell(h) for h in header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(report: dict[str, Any], manifest: dict[str, Any] | None = None,
                    name: str | None = None) -> str:
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


# ----------------------------------------------------------------------------------- JUnit

def junit_case(suite: ET.Element, classname: str, name: str, failure: str = "",
               detail: str = "", output: str = "") -> None:
    case = ET.SubElement(suite, "testcase", classname=classname, name=name, time="0")
    if failure:
        ET.SubElement(case, "failure", message=failure, type="parity").text = detail or failure
    if output:
        ET.SubElement(case, "system-out").text = output


def junit_xml(report: dict[str, Any], name: str = "parity") -> str:
    """One testsuite: a test case per check (the verdict), per prompt and per text. Prompts and
    texts fail only when the overall check of their metric failed and they miss its bound, so
    CI test tabs point at the rows to look at without inventing a stricter verdict."""
    suite = ET.Element("testsuite", name=f"phikit parity: {name}")
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="verdict", value=report["verdict"])
    for c in report["checks"]:
        junit_case(suite, "parity.checks", c["metric"],
                   "" if c["passed"] else check_line(c), c.get("detail") or "",
                   f"measured {c['measured']!r}, bound {relation(c['kind'])} {c['bound']!r}")
    for p in report.get("prompts") or []:
        _, ref_rest, cand_rest = split_generation(p)
        junit_case(suite, "parity.greedy", str(p.get("id")), prompt_problem(p, report, True),
                   f"reference after divergence: {ref_rest[:80]!r}\n"
                   f"candidate after divergence: {cand_rest[:80]!r}",
                   f"matched {p.get('match')} of {p.get('reference_tokens')} tokens")
    for t in report.get("texts") or []:
        problems = text_problems(t, report, only_failed=True)
        junit_case(suite, "parity.texts", str(t.get("id")), "; ".join(problems),
                   f"KLD max {fmt(t.get('kld_max'))} at position {t.get('kld_max_position')}",
                   f"kld_mean {fmt(t.get('kld_mean'))}, top1 {fmt(t.get('top1'))}, "
                   f"{t.get('tokens')} tokens")
    cases = suite.findall("testcase")
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(sum(1 for c in cases if c.find("failure") is not None)))
    suite.set("errors", "0")
    suite.set("skipped", "0")
    ET.indent(suite)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suite, "unicode") + "\n"


# --------------------------------------------------------------------------------- compare

def source_sha256(loaded: LoadedReport) -> str | None:
    return (dig(loaded.manifest, "source", "sha256")
            or dig(loaded.report, "reference", "checkpoint_sha256"))


def bundle_bytes(loaded: LoadedReport) -> int | None:
    """What ships: the files the manifest lists, plus the manifest itself."""
    files = dig(loaded.manifest, "files")
    if loaded.bundle is None or not isinstance(files, dict):
        return None
    total = 0
    for rel in [*files, MANIFEST]:
        try:
            total += os.stat(loaded.bundle / rel).st_size
        except OSError:
            pass  # a missing file is `phikit verify`'s news; the size is of what is there
    return total


def ensure_same_model(a: LoadedReport, b: LoadedReport) -> None:
    sa, sb = source_sha256(a), source_sha256(b)
    if sa and sb and sa != sb:
        raise PhikitError(f"not the same model: {a.name} comes from checkpoint {sa[:12]}… and "
                          f"{b.name} from {sb[:12]}…; compare bundles of one source checkpoint",
                          file=b.path)


def compare_rows(a: LoadedReport, b: LoadedReport) -> list[tuple[str, str, str, str]]:
    """(what, A, B, B − A) rows shared by the text, rich and HTML comparisons."""
    ensure_same_model(a, b)
    fa, fb = bundle_facts(a.report, a.manifest, a.name), bundle_facts(b.report, b.manifest,
                                                                      b.name)
    rows = [("verdict", a.report["verdict"].upper(), b.report["verdict"].upper(), "")]
    rows += [(k, fa[k], fb[k], "") for k in ("backend", "precision", "target", "runtime")]
    size_a, size_b = bundle_bytes(a), bundle_bytes(b)
    rows.append(("bundle size", fmt_bytes(size_a), fmt_bytes(size_b),
                 f"{(size_b - size_a) / 2**20:+.1f} MB" if size_a and size_b else ""))

    def numeric(label: str, va: Any, vb: Any) -> tuple[str, str, str, str]:
        both = all(isinstance(v, (int, float)) for v in (va, vb))
        return label, fmt(va), fmt(vb), f"{vb - va:+.3g}" if both else ""

    rows += [numeric(k, a.report["metrics"].get(k), b.report["metrics"].get(k))
             for k in COMPARE_METRICS]
    bands_a = {x["name"]: x for x in band_rows(a.report)}
    bands_b = {x["name"]: x for x in band_rows(b.report)}
    for band in [*bands_a, *(n for n in bands_b if n not in bands_a)]:
        for key in BAND_METRICS + ("greedy_match_mean",):
            va, vb = dig(bands_a, band, key), dig(bands_b, band, key)
            if va is not None or vb is not None:
                rows.append(numeric(f"{key}[{band}]", va, vb))
    return rows


def compare_notes(a: LoadedReport, b: LoadedReport) -> list[str]:
    notes = []
    ea, eb = dig(a.report, "evalset", "sha256"), dig(b.report, "evalset", "sha256")
    if ea and eb and ea != eb:
        notes.append("the two reports used different eval sets: their metrics are not measured "
                     "on the same tokens")
    if not (source_sha256(a) and source_sha256(b)):
        notes.append("a report has no source checkpoint hash: that both come from one model is "
                     "assumed, not checked")
    return notes


def prompt_pairs(a: LoadedReport, b: LoadedReport) -> list[tuple[dict, dict]]:
    by_id = {p.get("id"): p for p in b.report.get("prompts") or []}
    return [(p, by_id[p.get("id")]) for p in a.report.get("prompts") or []
            if p.get("id") in by_id]


def compare_text(a: LoadedReport, b: LoadedReport) -> str:
    rows = [("", a.name, b.name, "B − A"), *compare_rows(a, b)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"note: {n}" for n in compare_notes(a, b)]
    pairs = prompt_pairs(a, b)
    if pairs:
        lines += ["", "greedy tokens matched before diverging from the reference (A / B):"]
        lines += [f"  {pa.get('id')}: {pa.get('match')} / {pb.get('match')}" for pa, pb in pairs]
    return "\n".join(lines) + "\n"


def compare_html(a: LoadedReport, b: LoadedReport) -> str:
    rows = compare_rows(a, b)
    table = html_table(("", f"A: {a.name}", f"B: {b.name}", "B − A"),
                       ((tuple(td(c) for c in r), "") for r in rows), "compare-table")
    notes = "".join(f"<li>{esc(n)}</li>" for n in compare_notes(a, b))
    gens = []
    for pa, pb in prompt_pairs(a, b):
        common_a, _, cand_a = split_generation(pa)
        common_b, _, cand_b = split_generation(pb)
        gens.append(f'<div class="prompt-head">{esc(pa.get("id"))} <span class="muted">— A '
                    f"matched {esc(pa.get('match'))} tokens, B {esc(pb.get('match'))}</span>"
                    '</div><div class="gen three">'
                    "<div><h4>reference</h4>"
                    + generation_pre(str(pa.get("reference_text") or ""), "", False)
                    + f"</div><div><h4>A: {esc(a.name)}</h4>"
                    + generation_pre(common_a, cand_a, not pa.get("exact"))
                    + f"</div><div><h4>B: {esc(b.name)}</h4>"
                    + generation_pre(common_b, cand_b, not pb.get("exact")) + "</div></div>")
    body = ('<header id="verdict" class="verdict compare"><h1>COMPARE</h1>'
            f'<div class="facts"><b>A</b> {esc(a.name)} ({esc(a.report["verdict"].upper())}) · '
            f'<b>B</b> {esc(b.name)} ({esc(b.report["verdict"].upper())})</div></header>'
            f'<section id="metrics"><h2>Metrics</h2>{table}'
            + (f"<ul>{notes}</ul>" if notes else "") + "</section>"
            '<section id="generations"><h2>Greedy generations</h2><p class="muted">Highlighted: '
            "each candidate's text after it diverges from the reference.</p>"
            + ("".join(gens) or "<p>No prompts in common.</p>") + "</section>")
    return page(f"phikit compare · {a.name} vs {b.name}", body)
