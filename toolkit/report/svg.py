"""The report's charts as inline SVG, drawn here: the page may load nothing, so no chart library.
Every label from the report goes through esc."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

from .model import ParityReport
from .readout import (HISTOGRAM_EDGES, LANDMARK_LABELS, esc, fmt, moving_average,
                      top1_by_position)


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


def bound_of(report: ParityReport, metric: str) -> float | None:
    check = report.check(metric)
    return check.bound if check else None


def kld_histogram_svg(report: ParityReport) -> str:
    counts = report.metrics.kld_histogram
    if counts is None or len(counts) != len(HISTOGRAM_EDGES) - 1:
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
    lines = [(report.metrics.kld_mean, "mean", "#0550ae", False),
             (bound_of(report, "kld_mean"), "mean bound", "#cf222e", True),
             (bound_of(report, "kld_p99"), "p99 bound", "#bc4c00", True)]
    row = 0
    for value, label, color, dashed in lines:
        if value is not None and value > 0:
            exponent = math.log10(value)
            if HISTOGRAM_EDGES[0] <= exponent <= HISTOGRAM_EDGES[-1]:
                parts.append(plot.vline(exponent, f"{label} {fmt(value)}", color, row, dashed))
                row += 1
    return "".join(parts) + plot.close()


def top1_svg(report: ParityReport) -> tuple[str, str]:
    """(svg, caption): mean top-1 agreement at each position, smoothed, with the landmarks."""
    means = top1_by_position(report.texts)
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
    bound = bound_of(report, "top1")
    if bound is not None:
        parts.append(plot.hline(bound, f"bound {fmt(bound)}", "#cf222e"))
    outside = []
    for row, (key, position) in enumerate(sorted(report.landmarks.items())):
        label = LANDMARK_LABELS.get(key, key)
        if position <= last:
            parts.append(plot.vline(position, f"{label} {position}", "#8250df", row))
        else:
            outside.append(f"{label} at {position}")
    texts = len([t for t in report.texts if t.top1_by_position])
    caption = (f"Mean over {texts} texts of whether candidate and reference pick the same most "
               f"likely token (grey: per position; blue: moving average over {window} "
               "positions).")
    if outside:
        caption += (f" Beyond the {len(means)} positions the eval set reaches: "
                    + ", ".join(outside) + ".")
    return "".join(parts) + plot.close(), caption


def drift_svg(report: ParityReport) -> tuple[str, str]:
    """(svg, caption): mean KLD per position window, and where KLD rises most (the drift check's
    split). ('', '') for a report without drift windows."""
    drift = report.drift
    if drift is None or len(drift.windows) < 2:
        return "", ""
    windows = drift.windows
    mids = [(w.start + w.end - 1) / 2 for w in windows]
    values = [w.kld_mean for w in windows]
    top = nice_ticks(max(values) * 1.15 or 1e-9, 4)
    end = windows[-1].end
    plot = Plot(0, end, 0, top[-1])
    x_ticks = [v for v in nice_ticks(end, 8) if v <= end]
    parts = [plot.open("kld-drift", "KL divergence by position window"),
             plot.axes([(v, fmt(int(v))) for v in x_ticks], [(v, fmt(v)) for v in top],
                       "position", "mean KLD"),
             plot.polyline(mids, values, "#0969da", 2.5)]
    check = report.check("kld_drift")
    split, ratio = report.metrics.kld_drift_from, report.metrics.kld_drift
    if split is not None and ratio is not None:
        color = "#cf222e" if check and not check.passed else "#8250df"
        parts.append(plot.vline(split, f"after {split}: x{ratio:.2f} the KLD before", color))
    caption = (f"Mean KL(reference ‖ candidate) over windows of {drift.window} positions. "
               "Quantization error is flat in position; the drift check compares, at every "
               "window boundary, KLD after it with KLD before it over the same texts")
    if check:
        caption += f" (bound x{fmt(check.bound)})"
    return "".join(parts) + plot.close(), caption + "."
