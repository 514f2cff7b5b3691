"""JUnit XML for CI test tabs."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from .model import ParityReport
from .readout import fmt, prompt_problem, split_generation, text_problems


def junit_case(suite: ET.Element, classname: str, name: str, failure: str = "",
               detail: str = "", output: str = "") -> None:
    case = ET.SubElement(suite, "testcase", classname=classname, name=name, time="0")
    if failure:
        ET.SubElement(case, "failure", message=failure, type="parity").text = detail or failure
    if output:
        ET.SubElement(case, "system-out").text = output


def junit_xml(report: ParityReport, name: str = "parity") -> str:
    """One testsuite: a test case per check (the verdict), per prompt and per text. Prompts and
    texts fail only when the overall check of their metric failed and they miss its bound, so
    CI test tabs point at the rows to look at without inventing a stricter verdict."""
    suite = ET.Element("testsuite", name=f"phikit parity: {name}")
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="verdict", value=report.verdict)
    for c in report.checks:
        junit_case(suite, "parity.checks", c.metric, "" if c.passed else c.describe(),
                   c.detail, f"measured {c.measured!r}, bound {c.relation} {c.bound!r}")
    for p in report.prompts:
        _, ref_rest, cand_rest = split_generation(p)
        junit_case(suite, "parity.greedy", p.id, prompt_problem(p, report, True),
                   f"reference after divergence: {ref_rest[:80]!r}\n"
                   f"candidate after divergence: {cand_rest[:80]!r}",
                   f"matched {p.match} of {p.reference_tokens} tokens")
    for t in report.texts:
        problems = text_problems(t, report, only_failed=True)
        junit_case(suite, "parity.texts", t.id, "; ".join(problems),
                   f"KLD max {fmt(t.kld_max)} at position {t.kld_max_position}",
                   f"kld_mean {fmt(t.kld_mean)}, top1 {fmt(t.top1)}, {t.tokens} tokens")
    cases = suite.findall("testcase")
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(sum(1 for c in cases if c.find("failure") is not None)))
    suite.set("errors", "0")
    suite.set("skipped", "0")
    ET.indent(suite)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suite, "unicode") + "\n"
