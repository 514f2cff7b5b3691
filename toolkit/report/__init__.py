"""The parity report people read: one self-contained HTML page, a Markdown summary for CI job
pages, JUnit XML for CI test tabs, and a side-by-side comparison of two bundles of one model.

Input is a bundle directory (parity.json + manifest.json, `<name>.failed` included) or the JSON
`phikit validate --json` writes. Reports written before position bands, landmarks and per-prompt
`common_text` existed still render: every key newer than verdict/checks/metrics is optional.

load: reading reports, writing pages; readout: what every renderer reads out of a report;
svg: the charts; html (with templates/): the pages; markdown; junit; compare: two bundles.
"""

from __future__ import annotations

from .compare import compare_notes, compare_rows, compare_text
from .html import compare_html, render_html
from .junit import junit_xml
from .load import PARITY, LoadedReport, check_report, load_report, read_json, write_text_atomic
from .markdown import render_markdown
from .readout import bundle_facts, split_generation

__all__ = ["PARITY", "LoadedReport", "bundle_facts", "check_report", "compare_html",
           "compare_notes", "compare_rows", "compare_text", "junit_xml", "load_report",
           "read_json", "render_html", "render_markdown", "split_generation",
           "write_text_atomic"]
