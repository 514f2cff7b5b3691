"""Inputs at their edges: a build's --out that holds someone's files, names and addresses with a
final newline (a regex's `$` matches before one), an integer too long for Python to read in a
recipe, eval sets that are FIFOs, huge or not text, a pickle-only checkpoint at --dry-run, report strings that would render as remote images or links in Markdown."""

from __future__ import annotations

import json
import re

import pytest
from conftest import REPO, phikit
from markdown_it import MarkdownIt

from toolkit.deploy import deploy, parse_destination
from toolkit.errors import PhikitError
from toolkit.package import publish, staging_dir
from toolkit.report import load_report, render_markdown

from .conftest import rehash, run_py, synthetic_bundle

RECIPE = "recipes/tiny-phi3-int4.yaml"


@pytest.mark.parametrize("where", ["out", "out.failed"])
def test_build_never_deletes_a_directory_that_is_not_a_bundle(where, tmp_path):
    out = tmp_path / "out"
    mine = tmp_path / where
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    proc = phikit("build", RECIPE, "--target", "generic-cpu", "--out", out, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    error = proc.stderr.strip()
    assert "\n" not in error and "Traceback" not in error
    assert f"{mine}: field '--out': exists and is not a phikit bundle" in error
    assert "--force" in error
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_build_replaces_bundles_and_empty_dirs_and_anything_with_force(tmp_path):
    def dry_run(out, *extra):
        return phikit("build", RECIPE, "--target", "generic-cpu", "--out", out, "--dry-run",
                      *extra, timeout=120)

    assert dry_run(synthetic_bundle(tmp_path / "bundle")).returncode == 0
    (tmp_path / "empty").mkdir()
    assert dry_run(tmp_path / "empty").returncode == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    assert dry_run(tmp_path / "mine").returncode == 2
    assert dry_run(tmp_path / "mine", "--force").returncode == 0


def test_publishing_checks_again_what_it_replaces(tmp_path):
    """A build takes minutes: what appeared at --out meanwhile is not deleted either."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    stage = staging_dir(out)
    with pytest.raises(PhikitError, match="is not a phikit bundle"):
        publish(stage, out, passed=True)
    assert (out / "notes.txt").read_text() == "mine"
    publish(stage, out, passed=True, force=True)
    assert not (out / "notes.txt").exists()


@pytest.mark.parametrize("field, value, message", [
    ("name", "tiny\n", "field 'name'"),
    ("model_dir", "model\n", "field 'model_dir'"),
])
def test_manifest_values_with_a_final_newline_are_refused(field, value, message, tmp_path):
    bundle = synthetic_bundle(tmp_path / "b")
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest[field] = value
    path.write_text(json.dumps(manifest))
    for proc in (run_py(bundle, "verify"), phikit("verify", bundle)):
        assert proc.returncode == 2 and message in proc.stderr, proc.stdout + proc.stderr


def test_a_sha256_with_a_final_newline_is_not_a_sha256(tmp_path):
    bundle = synthetic_bundle(tmp_path / "b")
    rehash(bundle)
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"]["model/config.json"] += "\n"
    path.write_text(json.dumps(manifest))
    for proc in (run_py(bundle, "verify"), phikit("verify", bundle)):
        assert proc.returncode == 2 and "is not a sha256" in proc.stderr, proc.stderr


def test_destinations_and_addresses_with_a_final_newline_are_refused(tmp_path):
    for bad in ("pi@raspberrypi\n", "raspberrypi\n:dir"):
        with pytest.raises(PhikitError, match="destination must be"):
            parse_destination(bad, "b")
    with pytest.raises(PhikitError, match="--host must be"):
        deploy(synthetic_bundle(tmp_path / "b"), "u@127.0.0.1", host_bind="127.0.0.1\n",
               log=lambda s: None)


@pytest.mark.parametrize("kind", ["recipe", "target"])
def test_an_integer_too_long_to_read_is_one_error_line(kind, tmp_path):
    digits = "9" * 5000
    if kind == "recipe":
        text = (REPO / RECIPE).read_text().replace("../", f"{REPO}/")
        path, field = tmp_path / "r.yaml", "eval.max_tokens"
        path.write_text(text.replace("  max_tokens: 128", f"  max_tokens: {digits}"))
        args = (path, "--target", "generic-cpu")
    else:
        text = (REPO / "targets" / "generic-cpu.yaml").read_text()
        path, field = tmp_path / "t.yaml", "memory_budget_mb"
        path.write_text(text + f"memory_budget_mb: {digits}\n")
        args = (RECIPE, "--target", path)
    proc = phikit("build", *args, "--dry-run", timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    error = proc.stderr.strip()
    assert "Traceback" not in error and "\n" not in error
    assert str(path) in error and f"field '{field}'" in error and "5000 digits" in error



def eval_set_at(tmp_path, make) -> tuple:
    """A copy of the tiny recipe whose eval set is the file `make(path)` leaves at `path`."""
    evals = tmp_path / "evals.jsonl"
    make(evals)
    recipe = tmp_path / "r.yaml"
    recipe.write_text((REPO / RECIPE).read_text().replace("../", f"{REPO}/").replace(
        f"{REPO}/evalsets/tiny-phi3.jsonl", str(evals)))
    return recipe, evals


@pytest.mark.parametrize("case, message", [
    ("fifo", "not a regular file"),
    ("long-row", "row longer than 8 MiB"),
    ("not-utf8", "not UTF-8 text"),
])
def test_eval_sets_are_read_within_bounds(case, message, tmp_path):
    """`--dry-run` read any eval set whole: a 1 GB line passed (3.2 GB of memory), a FIFO was
    "file not found", bytes that are not UTF-8 were a traceback."""
    import os

    make = {"fifo": os.mkfifo,
            "long-row": lambda p: p.write_text('{"id": "a", "text": "' + "x" * (9 << 20) + '"}\n'),
            "not-utf8": lambda p: p.write_bytes(b'{"id": "a", "text": "ok"}\n\xff\xfe\n')}[case]
    recipe, evals = eval_set_at(tmp_path, make)
    proc = phikit("build", recipe, "--target", "generic-cpu", "--dry-run", timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    error = proc.stderr.strip()
    assert "Traceback" not in error and "\n" not in error, error
    assert str(evals) in error and message in error, error


def test_dry_run_refuses_a_pickle_only_checkpoint(tmp_path):
    """The plan said yes to a checkpoint phikit would refuse to read (only pytorch_model.bin)."""
    import shutil

    from conftest import TINY

    ckpt = tmp_path / "ckpt"
    shutil.copytree(TINY, ckpt, ignore=shutil.ignore_patterns("*.safetensors"))
    (ckpt / "pytorch_model.bin").write_bytes(b"planted pickle")
    proc = phikit("build", RECIPE, "--target", "generic-cpu", "--source", ckpt, "--dry-run",
                  timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "pytorch_model.bin" in proc.stderr and "Traceback" not in proc.stderr


REMOTE = ["![x](http://evil.example/x.png)", "[click](https://evil.example/a)",
          "<img src=http://evil.example/y.png>", "[ref]: http://evil.example/z",
          "see www.evil.example", "mail a@evil.example", "\\![y](http://evil.example/w.png)"]


def test_markdown_report_renders_no_remote_image_or_link(tmp_path):
    from test_report import make_report, write_bundle

    report = make_report(passing=False)
    report["notes"] = list(REMOTE)
    report["checks"][0]["detail"] = " ".join(REMOTE)
    report["prompts"][1]["reference_text"] = "def join(" + REMOTE[0]
    report["prompts"][1]["candidate_text"] = "def join(" + REMOTE[1]
    bundle = write_bundle(tmp_path, "tiny-int4", report)
    loaded = load_report(bundle)
    text = render_markdown(loaded.parity, loaded.manifest, loaded.name)
    assert phikit("report", bundle, "--markdown", check=1).stdout == text
    html = MarkdownIt("commonmark").enable("table").render(text)
    assert "<img" not in html and "<a " not in html and "evil.example" in html
    # GitHub also links bare URLs, www. names and e-mail addresses: none is left unescaped
    assert not re.search(r"(?<!\\)(://|@)|www(?!\\\.)", text)
    assert "| kld_mean | 0.031 | ≤ 0.02 | **FAIL** |" in text  # the table itself still renders
