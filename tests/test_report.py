"""The parity report people read (HTML, Markdown, JUnit), `phikit report` and `phikit compare`,
on synthetic bundles written here (a clean clone has no dist/); one slow test on a real build."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import phikit
from toolkit.errors import PhikitError
from toolkit.package import write_report_html
from toolkit.report import (compare_html, compare_text, junit_xml, load_report, render_html,
                            render_markdown, split_generation)
from toolkit.report.model import ParityReport

SOURCE_SHA = "ab" * 32
SCRIPT = "<script>alert('x')</script>"
EXTERNAL_URL = re.compile(r"https?://", re.I)

# Texts: the second and third miss kld_mean's bound 0.02 on their own; the third also misses
# top1's 0.85, whose overall check passes (so JUnit must not fail it).
TEXTS = [("text:os.path.join", 0.005, 0.95), (f"text:{SCRIPT}", 0.05, 0.9),
         ("text:shutil.move", 0.038, 0.8)]
# Prompts: identical; diverged after 2 tokens with common_text; diverged after 1 token from a
# report that predates common_text (the HTML falls back to the character-level prefix).
PROMPTS = [
    {"id": "prompt:exact", "match": 8, "exact": True, "reference_text": "same words here",
     "candidate_text": "same words here", "common_text": "same words here"},
    {"id": "prompt:diverged", "match": 2, "exact": False,
     "reference_text": f"def join(a, b):\n    return {SCRIPT}",
     "candidate_text": "def join(x):\n    pass", "common_text": "def join("},
    {"id": "chat:old-format", "match": 1, "exact": False,
     "reference_text": "Return the path.", "candidate_text": "Return a list."},
]


def check(metric: str, measured: float, bound: float, kind: str, detail: str = "") -> dict:
    passed = measured <= bound if kind == "max" else measured >= bound
    return {"metric": metric, "measured": measured, "bound": bound, "kind": kind,
            "passed": passed, "detail": "" if passed else detail}


def make_report(passing: bool) -> dict:
    """A report shaped like parity.evaluate + validate.run_parity write it, bands included; the
    failing one misses kld_mean, greedy_match_mean and kld_mean[past_window]."""
    kld_bound, greedy_bound = (0.1, 1.0) if passing else (0.02, 4.0)
    positions = 80  # landmarks at 48 and 64 fall inside; past_window has 3 x 32 = 96 positions
    texts = [{"id": tid, "tokens": positions, "kld_mean": kld, "kld_max": kld * 9,
              "kld_max_position": 50 + i, "top1": top1,
              "top1_by_position": [int((p * 7 + i) % 10 < top1 * 10) for p in range(positions)]}
             for i, (tid, kld, top1) in enumerate(TEXTS)]
    prompts = [{**p, "prompt_tokens": 20, "candidate_ids": [1, 2, 3], "reference_ids": [1, 2, 4],
                "reference_tokens": 32, "candidate_tokens": 32 if p["exact"] else 20}
               for p in PROMPTS]
    bands = [
        {"name": "before_window", "description": "positions < 48: inside the sliding window",
         "start": 0, "end": 48, "positions": 144, "checked": True, "kld_mean": 0.01,
         "kld_p99": 0.05, "top1": 0.9,
         "worst": {"id": "text:shutil.move", "kld_mean": 0.02, "position": 40}},
        {"name": "past_window", "description": "positions >= 48: the window slides",
         "start": 48, "end": None, "positions": 96, "checked": True, "kld_mean": 0.06,
         "kld_p99": 0.3, "top1": 0.86, "prompts": 0,
         "worst": {"id": f"text:{SCRIPT}", "kld_mean": 0.09, "position": 77}},
        {"name": "before_original", "description": "positions < 64: inside LongRoPE's original "
         "length", "start": 0, "end": 64, "positions": 192, "checked": True,
         "kld_mean": 0.02, "kld_p99": 0.1, "top1": 0.9,
         "worst": {"id": "text:shutil.move", "kld_mean": 0.03, "position": 60}},
        {"name": "past_original", "description": "positions >= 64: past the original length",
         "start": 64, "end": None, "positions": 16, "checked": False},  # too few: no figures
    ]
    checks = [check("kld_mean", 0.031, kld_bound, "max",
                    f"worst text 'text:{SCRIPT}': mean KLD 0.0500"),
              check("kld_p99", 0.2, 0.5, "max"),
              check("top1", 0.883, 0.85, "min"),
              check("ppl_ratio", 1.01, 1.03, "max"),
              check("greedy_match_mean", 3.667, greedy_bound, "min",
                    "prompt 'chat:old-format' diverged after 1 tokens"),
              check("token_agreement", 0.9, 0.5, "min"),
              check("kld_mean[past_window]", 0.06, kld_bound, "max",
                    "positions >= 48: the window slides (96 positions): worst text ..."),
              check("top1[past_window]", 0.86, 0.85, "min")]
    histogram = [0] * 20
    histogram[9:14] = [5, 40, 120, 60, 15]
    return {
        "verdict": "pass" if all(c["passed"] for c in checks) else "fail",
        "checks": checks,
        "metrics": {"positions": 240, "texts": 3, "prompts": 3, "kld_mean": 0.031,
                    "kld_median": 0.01, "kld_p99": 0.2, "kld_max": 0.45, "top1": 0.883,
                    "ppl_reference": 10.0, "ppl_candidate": 10.1, "ppl_ratio": 1.01,
                    "ppl_delta": 0.1, "kld_histogram": histogram, "greedy_match_mean": 3.667,
                    "greedy_match_min": 1, "greedy_exact": 1 / 3, "token_agreement": 0.9},
        "bands": bands,
        "landmarks": {"sliding_window": 48, "original_length": 64},
        "thresholds": {"kld_mean_max": kld_bound, "top1_min": 0.85},
        "texts": texts,
        "prompts": prompts,
        "tokenizer_mismatches": [{"id": "text:shutil.move", "first_difference": 3,
                                  "reference_tokens": [5, 6], "candidate_tokens": [7],
                                  "context": " a | b"}],
        "tokenizer": {"rows": 6, "identical": 5, "chat_rows": 1},
        "candidate": {"runtime": "onnxruntime-genai", "version": "0.18.0", "threads": 2},
        "reference": {"engine": "transformers", "checkpoint_sha256": SOURCE_SHA},
        "evalset": {"file": "tiny.jsonl", "sha256": "cd" * 32},
        "timing": {"reference_seconds": 1.0, "candidate_seconds": 2.0},
        "artifact": "bundle",
        "notes": [f"a note with {SCRIPT}"],
    }


def write_bundle(root: Path, name: str, report: dict, source_sha: str = SOURCE_SHA) -> Path:
    """A bundle directory as build.publish leaves it (`.failed` when the verdict is fail)."""
    bundle = root / (name if report["verdict"] == "pass" else f"{name}.failed")
    (bundle / "model").mkdir(parents=True)
    (bundle / "model" / "model.onnx").write_bytes(b"\0" * 4096)
    (bundle / "parity.json").write_text(json.dumps(report, indent=2))
    manifest = {"format": "phikit-bundle/1", "name": name, "created": "2026-01-01T00:00:00Z",
                "recipe": {"quantization": {"precision": "int4"}},
                "target": {"name": "generic-cpu"}, "backend": "onnx",
                "runtime": {"module": "ortgenai"},
                "source": {"id": "models/tiny", "sha256": source_sha,
                           "architecture": "Phi3ForCausalLM"},
                "toolchain": {"onnxruntime-genai": "0.18.0"},
                "parity": {"verdict": report["verdict"]},
                "files": {"model/model.onnx": "ef" * 32, "parity.json": "01" * 32}}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return bundle


@pytest.fixture
def failing(tmp_path) -> Path:
    return write_bundle(tmp_path, "tiny-int4", make_report(passing=False))


@pytest.fixture
def passing(tmp_path) -> Path:
    return write_bundle(tmp_path, "tiny-int8", make_report(passing=True))


def html_of(bundle: Path) -> str:
    loaded = load_report(bundle)
    return render_html(loaded.parity, loaded.manifest, loaded.name)


# ------------------------------------------------------------------------------- loading

def test_load_bundle_failed_bundle_json_and_manifest_path(failing, passing, tmp_path):
    assert failing.name == "tiny-int4.failed"
    loaded = load_report(failing)
    assert loaded.parity.verdict == "fail" and loaded.name == "tiny-int4"
    assert loaded.bundle == failing and loaded.manifest["backend"] == "onnx"
    assert load_report(passing / "manifest.json").bundle == passing
    report_json = tmp_path / "r.json"
    shutil.copy(passing / "parity.json", report_json)
    loaded = load_report(report_json)
    assert loaded.manifest is None and loaded.bundle is None and loaded.name == "r.json"


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{\n  'verdict': 1", "invalid JSON"),
    ("[1, 2]", "not a parity report"),
    ('{"format": "phikit-bundle/1", "files": {}}', "not a parity report"),
    ('{"verdict": "pass", "checks": [{"metric": "x"}], "metrics": {}}', "not a parity report"),
])
def test_bad_input_is_a_phikit_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PhikitError, match=message) as info:
        load_report(path)
    assert str(path) in str(info.value)


def test_a_key_the_report_format_does_not_have_is_refused(passing, tmp_path):
    """An unknown key was kept and never shown: a misspelt metric or check field read as a
    report that had not measured it. Now the key is named, at any depth."""
    report = json.loads((passing / "parity.json").read_text())
    for where, changed in (("kld_maen", {**report, "metrics": {**report["metrics"],
                                                               "kld_maen": 0.1}}),
                           ("checks.0.bund", {**report, "checks": [
                               {**report["checks"][0], "bund": 1}, *report["checks"][1:]]}),
                           ("extra_section", {**report, "extra_section": {}})):
        path = tmp_path / "r.json"
        path.write_text(json.dumps(changed))
        with pytest.raises(PhikitError, match="Extra inputs are not permitted") as info:
            load_report(path)
        assert where in str(info.value) and str(path) in str(info.value)


def test_directory_without_parity_json_is_refused(tmp_path):
    with pytest.raises(PhikitError, match="no parity.json"):
        load_report(tmp_path)


# ---------------------------------------------------------------------------------- HTML

def test_failing_html_verdict_checks_charts_and_divergence(failing):
    page = html_of(failing)
    verdict = re.search(r'<header id="verdict" class="verdict (\w+)"', page)
    assert verdict and verdict.group(1) == "fail"
    assert "<h1>FAIL</h1>" in page and "tiny-int4" in page and "int4" in page
    assert page.index('id="verdict"') < page.index('id="checks-table"') \
        < page.index('id="kld-histogram"') < page.index('id="top1-by-position"') \
        < page.index('id="texts-table"') < page.index('id="generations"') \
        < page.index('id="tokenizer"') < page.index('id="provenance"')
    for c in make_report(passing=False)["checks"]:
        assert f"<td>{c['metric']}</td>" in page
    failed_rows = re.findall(r'<tr class="failed">', page.split('id="checks-table"')[1]
                             .split("</table>")[0])
    assert len(failed_rows) == 3
    assert page.count('<rect class="bin"') == 20
    assert "sliding window 48" in page and "original length 64" in page
    assert 'id="bands-table"' in page and "past_window" in page and "reported only" in page
    # token-level divergence from common_text, character-level for the old-format prompt
    assert "<pre>def join(<mark>a, b)" in page and "<pre>def join(<mark>x)" in page
    assert "<pre>Return <mark>the path.</mark></pre>" in page
    assert "<pre>Return <mark>a list.</mark></pre>" in page
    assert "<details" in page and "ef" * 32 in page and SOURCE_SHA in page


def test_html_is_self_contained_and_escapes_report_text(failing):
    page = html_of(failing)
    assert not EXTERNAL_URL.search(page)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "default-src 'none'" in page  # the browser itself refuses anything external


def test_passing_html(passing):
    page = html_of(passing)
    assert '<header id="verdict" class="verdict pass"' in page and "<h1>PASS</h1>" in page
    assert '<tr class="failed">' not in page
    assert 'id="kld-histogram"' in page and 'id="top1-by-position"' in page


def test_report_from_before_bands_still_renders():
    report = make_report(passing=True)
    for key in ("bands", "landmarks", "tokenizer", "notes", "timing"):
        del report[key]
    for p in report["prompts"]:
        p.pop("common_text", None)
    del report["metrics"]["kld_histogram"]
    page = render_html(ParityReport.read(report), None)
    assert "<h1>PASS</h1>" in page and 'id="bands-table"' not in page
    assert 'id="kld-histogram"' in page and 'id="top1-by-position"' in page
    assert "<pre>def join(<mark>" in page


def test_common_text_not_a_prefix_falls_back_to_characters():
    prompt = ParityReport.read(make_report(passing=True)).prompts[0].model_copy(update={
        "reference_text": "ab cd", "candidate_text": "ab ce", "common_text": "ab\ufffd"})
    assert split_generation(prompt) == ("ab c", "d", "e")


def test_write_report_html_into_bundle(failing):
    loaded = load_report(failing)
    path = write_report_html(failing, loaded.parity, loaded.manifest)
    assert path == failing / "report.html" and "<h1>FAIL</h1>" in path.read_text()
    assert not list(failing.glob(".report.html.tmp*"))


# ------------------------------------------------------------------------ Markdown, JUnit

def test_markdown_summary(failing):
    loaded = load_report(failing)
    text = render_markdown(loaded.parity, loaded.manifest, loaded.name)
    assert text.startswith("## ❌ FAIL — tiny-int4")
    assert "| metric | measured | bound | result | detail |" in text
    assert "| kld_mean | 0.031 | ≤ 0.02 | **FAIL** |" in text
    assert "| band | positions | status |" in text and "| past_window | 96 | FAIL |" in text
    assert "**Greedy generations**: 3 prompts" in text
    assert "<script>" not in text and "&lt;script&gt;" in text


def test_junit_one_case_per_check_prompt_and_text(failing, passing):
    report = load_report(failing).parity
    suite = ET.fromstring(junit_xml(report, "tiny-int4"))
    cases = suite.findall("testcase")
    assert suite.tag == "testsuite" and len(cases) == 8 + 3 + 3
    failed = {(c.get("classname"), c.get("name")) for c in cases if c.find("failure") is not None}
    assert failed == {("parity.checks", "kld_mean"), ("parity.checks", "greedy_match_mean"),
                      ("parity.checks", "kld_mean[past_window]"),
                      ("parity.greedy", "prompt:diverged"), ("parity.greedy", "chat:old-format"),
                      ("parity.texts", f"text:{SCRIPT}"), ("parity.texts", "text:shutil.move")}
    assert suite.get("tests") == "14" and suite.get("failures") == "7"
    kld = next(c for c in cases if c.get("name") == "kld_mean").find("failure")
    assert kld.get("message") == "kld_mean 0.031 (needs ≤ 0.02)" and "worst text" in kld.text
    suite = ET.fromstring(junit_xml(load_report(passing).parity))
    assert suite.get("failures") == "0" and len(suite.findall("testcase")) == 14


# ------------------------------------------------------------------------------------ CLI

def test_phikit_report_exit_codes_and_outputs(failing, passing, tmp_path):
    proc = phikit("report", passing, check=0)
    assert "PASS" in proc.stdout and not list(tmp_path.glob("*.html"))
    html_path, junit_path = tmp_path / "out" / "r.html", tmp_path / "j.xml"
    phikit("report", failing, "-o", html_path, "--junit", junit_path, check=1)
    assert "<h1>FAIL</h1>" in html_path.read_text()
    assert ET.parse(junit_path).getroot().get("failures") == "7"
    proc = phikit("report", failing, "--markdown", check=1)
    assert proc.stdout.startswith("## ❌ FAIL")
    phikit("report", passing, "-o", tmp_path / "summary.md", check=0)
    assert (tmp_path / "summary.md").read_text().startswith("## ✅ PASS")


def test_phikit_report_bad_input_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for path, message in ((tmp_path / "missing", "no such file"), (bad, "invalid JSON")):
        proc = phikit("report", path, check=2)
        assert message in proc.stderr and str(path) in proc.stderr
        assert "Traceback" not in proc.stderr


def test_compare_same_model(failing, passing, tmp_path):
    a, b = load_report(failing), load_report(passing)
    text = compare_text(a, b)
    assert "tiny-int4" in text and "tiny-int8" in text
    assert re.search(r"kld_mean\[past_window\]\s+0\.06\s+0\.06", text)
    assert re.search(r"bundle size\s+\d", text)
    page = compare_html(a, b)
    assert not EXTERNAL_URL.search(page) and "<script" not in page.lower()
    assert 'id="compare-table"' in page and page.count('class="gen three"') == 3
    proc = phikit("compare", failing, passing, "-o", tmp_path / "c.html", check=0)
    assert "kld_mean[past_window]" in proc.stdout and (tmp_path / "c.html").is_file()


def test_compare_refuses_different_models(failing, tmp_path):
    other = write_bundle(tmp_path / "other", "phi-other", make_report(passing=True),
                         source_sha="99" * 32)
    with pytest.raises(PhikitError, match="not the same model"):
        compare_text(load_report(failing), load_report(other))
    proc = phikit("compare", failing, other, check=2)
    assert "not the same model" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------ headless browser

def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("chromium not installed: make system-deps")
    return subprocess.run([binary, "--headless=new", "--no-sandbox", "--disable-gpu",
                           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                           *args], capture_output=True, text=True, timeout=120)


def page_console_lines(stderr: str, url: str) -> list[str]:
    """The page's own console output: it has no scripts, so any (an error, a blocked load
    the Content-Security-Policy refused) is a defect."""
    return [line for line in stderr.splitlines()
            if url in line and ("CONSOLE" in line or "Uncaught" in line)]


def test_headless_chromium_renders_the_page(failing, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(html_of(failing))
    url = page.as_uri()
    proc = chromium("--dump-dom", url, profile=tmp_path / "profile")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'id="verdict"' in proc.stdout
    assert '<svg id="kld-histogram"' in proc.stdout and '<svg id="top1-by-position"' in proc.stdout
    assert page_console_lines(proc.stderr, url) == []
    shot = tmp_path / "report.png"
    proc = chromium(f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars", url,
                    profile=tmp_path / "profile")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert page_console_lines(proc.stderr, url) == []
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 2400)
    assert len(data) > 50_000  # a blank page compresses to a few KB


# ----------------------------------------------------------------------------------- slow

@pytest.mark.slow
def test_phikit_report_on_a_real_build(int4_bundle, tmp_path):
    html_path, junit_path = tmp_path / "r.html", tmp_path / "j.xml"
    proc = phikit("report", int4_bundle, "-o", html_path, "--junit", junit_path, check=0)
    page = html_path.read_text()
    assert '<header id="verdict" class="verdict pass"' in page and not EXTERNAL_URL.search(page)
    assert 'id="kld-histogram"' in page and 'id="top1-by-position"' in page
    report = json.loads((int4_bundle / "parity.json").read_text())
    suite = ET.parse(junit_path).getroot()
    assert len(suite.findall("testcase")) == (len(report["checks"]) + len(report["prompts"])
                                              + len(report["texts"]))
    assert "wrote" in proc.stderr
