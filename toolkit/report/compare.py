"""Two bundles of one model side by side: the rows and notes the terminal table, the text and
the HTML page share (the page itself is rendered by .html)."""

from __future__ import annotations

import os
from typing import Any

from ..errors import PhikitError
from ..runner.core import MANIFEST
from .load import LoadedReport
from .model import ParityReport, PromptRow
from .readout import (BAND_METRICS, COMPARE_METRICS, bundle_facts, dig, fmt, fmt_bytes,
                      split_generation)


def source_sha256(loaded: LoadedReport) -> str | None:
    return (dig(loaded.manifest, "source", "sha256")
            or loaded.parity.reference.get("checkpoint_sha256"))


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


def measured_on(report: ParityReport) -> str:
    """The machine a report's figures come from: the build host, or a device (run.py validate
    on it, `phikit deploy`), or an emulated CPU."""
    host = report.host
    where = ", ".join(str(x) for x in (host.get("cpu"), host.get("os")) if x) or "—"
    emulated = report.candidate.get("emulated_arch")
    return f"{where} (emulated {emulated})" if emulated else where


def ensure_same_model(a: LoadedReport, b: LoadedReport) -> None:
    sa, sb = source_sha256(a), source_sha256(b)
    if sa and sb and sa != sb:
        raise PhikitError(f"not the same model: {a.name} comes from checkpoint {sa[:12]}… and "
                          f"{b.name} from {sb[:12]}…; compare bundles of one source checkpoint",
                          file=b.path)


def compare_rows(a: LoadedReport, b: LoadedReport) -> list[tuple[str, str, str, str]]:
    """(what, A, B, B − A) rows shared by the text, rich and HTML comparisons."""
    ensure_same_model(a, b)
    ra, rb = a.parity, b.parity
    fa, fb = bundle_facts(ra, a.manifest, a.name), bundle_facts(rb, b.manifest, b.name)
    rows = [("verdict", ra.verdict.upper(), rb.verdict.upper(), "")]
    rows += [(k, fa[k], fb[k], "") for k in ("backend", "precision", "target", "runtime")]
    rows.append(("measured on", measured_on(ra), measured_on(rb), ""))
    size_a, size_b = bundle_bytes(a), bundle_bytes(b)
    rows.append(("bundle size", fmt_bytes(size_a), fmt_bytes(size_b),
                 f"{(size_b - size_a) / 2**20:+.1f} MB" if size_a and size_b else ""))

    def numeric(label: str, va: Any, vb: Any) -> tuple[str, str, str, str]:
        both = all(isinstance(v, (int, float)) for v in (va, vb))
        return label, fmt(va), fmt(vb), f"{vb - va:+.3g}" if both else ""

    rows += [numeric(k, getattr(ra.metrics, k), getattr(rb.metrics, k))
             for k in COMPARE_METRICS]
    bands_a, bands_b = {x.name: x for x in ra.bands}, {x.name: x for x in rb.bands}
    for band in [*bands_a, *(n for n in bands_b if n not in bands_a)]:
        for key in BAND_METRICS + ("greedy_match_mean",):
            # a band only one report has (None for the other) is still a row
            va, vb = (getattr(bands.get(band), key, None) for bands in (bands_a, bands_b))
            if va is not None or vb is not None:
                rows.append(numeric(f"{key}[{band}]", va, vb))
    return rows


def compare_notes(a: LoadedReport, b: LoadedReport) -> list[str]:
    notes = []
    ea, eb = (r.evalset.sha256 if r.evalset else None for r in (a.parity, b.parity))
    if ea and eb and ea != eb:
        notes.append("the two reports used different eval sets: their metrics are not measured "
                     "on the same tokens")
    if not (source_sha256(a) and source_sha256(b)):
        notes.append("a report has no source checkpoint hash: that both come from one model is "
                     "assumed, not checked")
    return notes


def prompt_pairs(a: LoadedReport, b: LoadedReport) -> list[tuple[PromptRow, PromptRow]]:
    by_id = {p.id: p for p in b.parity.prompts}
    return [(p, by_id[p.id]) for p in a.parity.prompts if p.id in by_id]


def compare_text(a: LoadedReport, b: LoadedReport) -> str:
    rows = [("", a.name, b.name, "B − A"), *compare_rows(a, b)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"note: {n}" for n in compare_notes(a, b)]
    pairs = prompt_pairs(a, b)
    if pairs:
        lines += ["", "greedy tokens matched before diverging from the reference (A / B):"]
        lines += [f"  {pa.id}: {pa.match} / {pb.match}" for pa, pb in pairs]
    return "\n".join(lines) + "\n"


def compare_page(a: LoadedReport, b: LoadedReport) -> dict[str, Any]:
    """What compare.html.j2 shows: the rows, the notes and each prompt both reports have, the
    reference's text next to each candidate's, highlighted where it diverges."""
    generations = []
    for pa, pb in prompt_pairs(a, b):
        common_a, _, rest_a = split_generation(pa)
        common_b, _, rest_b = split_generation(pb)
        generations.append({"id": pa.id, "match_a": pa.match, "match_b": pb.match,
                            "reference": pa.reference_text,
                            "a": (common_a, rest_a, not pa.exact),
                            "b": (common_b, rest_b, not pb.exact)})
    return {"title": f"phikit compare · {a.name} vs {b.name}",
            "a": {"name": a.name, "verdict": a.parity.verdict.upper()},
            "b": {"name": b.name, "verdict": b.parity.verdict.upper()},
            "header": ("", f"A: {a.name}", f"B: {b.name}", "B − A"),
            "rows": [(row, "") for row in compare_rows(a, b)],
            "notes": compare_notes(a, b), "generations": generations}
