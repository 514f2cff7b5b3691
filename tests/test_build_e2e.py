"""End to end on the embedded tiny-phi3 with the real builder and runtime (slow)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, TINY, phikit

pytestmark = pytest.mark.slow

METRICS = ("kld_mean", "kld_median", "kld_p99", "kld_max", "top1", "ppl_reference",
           "ppl_candidate", "ppl_ratio", "ppl_delta", "greedy_match_mean", "greedy_match_min",
           "token_agreement")


def manifest(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def test_int4_build_then_validate_json(int4_bundle, tmp_path):
    report_path = tmp_path / "r.json"
    proc = phikit("validate", int4_bundle, "--json", report_path, check=0)
    assert "PASS" in proc.stdout
    report = json.loads(report_path.read_text())
    assert report["verdict"] == "pass"
    for key in METRICS:
        assert isinstance(report["metrics"][key], (int, float)), key
    assert report["reference"]["cached"] is True  # the build computed it; validation reused it
    assert report["candidate"]["runtime"] == "onnxruntime-genai"
    assert {c["metric"] for c in report["checks"]} >= {"kld_mean", "top1", "greedy_match_mean"}


def test_sanity_ordering_fp32_int8_int4(int4_bundle, int8_bundle, fp32_bundle):
    kld = {name: manifest(b)["parity"]["metrics"]["kld_mean"]
           for name, b in [("int4", int4_bundle), ("int8", int8_bundle), ("fp32", fp32_bundle)]}
    assert kld["fp32"] < 1e-4, kld  # same math, different kernels: numerically zero
    assert kld["fp32"] < kld["int8"] < kld["int4"], kld
    assert manifest(fp32_bundle)["parity"]["metrics"]["top1"] > 0.999


def test_manifest_contents(int4_bundle):
    m = manifest(int4_bundle)
    assert m["format"] == "phikit-bundle/1" and m["backend"] == "onnx"
    assert m["recipe"]["quantization"]["precision"] == "int4"
    assert m["target"]["name"] == "generic-cpu"
    assert len(m["source"]["sha256"]) == 64
    assert {"onnxruntime-genai", "transformers"} <= set(m["toolchain"])
    assert {"model/model.onnx", "model/genai_config.json", "run.py", "parity.json", "report.html",
            "requirements.lock", "phikit_runner/core.py"} <= set(m["files"])
    lock = (int4_bundle / "requirements.lock").read_text()
    assert "onnxruntime-genai==0.18.0" in lock and "--hash=sha256:" in lock
    assert "torch" not in lock and "transformers" not in lock
    # the typed writer's document, exactly: nothing more, nothing less, each section typed
    from pydantic import ValidationError

    from toolkit.manifest import BundleManifest

    written = {k: v for k, v in m.items() if k not in ("format", "phikit", "files")}
    assert BundleManifest.model_validate(written).fields() == written
    with pytest.raises(ValidationError, match="runtme"):
        BundleManifest.model_validate({**written, "runtme": {}})
    with pytest.raises(ValidationError, match="verdict"):
        BundleManifest.model_validate({**written, "parity": {**written["parity"],
                                                             "verdict": "ok"}})


def test_teacher_forced_logits_come_from_one_prefill_of_the_all_logits_graph(int4_bundle):
    """generic-cpu's graph computes the lm_head for the last position only; the bundle carries
    the same graph over every position, and validation's logits come from it in one prefill.
    They must be what the pruned graph gives one token at a time (its decode path)."""
    import numpy as np

    from toolkit.runner.ortgenai import OrtGenaiSession

    assert "model/model.all-logits.onnx" in manifest(int4_bundle)["files"]
    session = OrtGenaiSession(int4_bundle / "model", {"threads": 2})
    assert session.all_logits_graph == "model.all-logits.onnx"
    text = json.loads((REPO / "evalsets" / "tiny-phi3.jsonl").read_text().splitlines()[0])
    ids = session.tokenize(text["text"])[:200]
    prefill = session.logits(ids)
    session.all_logits_graph = None  # the pruned graph alone
    decode = session.logits(ids)
    assert session.pruned_lm_head  # its prefill gave one row, not len(ids)
    assert prefill.shape == decode.shape == (len(ids), session.vocab_size)
    assert (prefill.argmax(-1) == decode.argmax(-1)).mean() >= 0.98
    assert np.abs(prefill - decode).max() < 0.25


def test_phikit_run_streams_and_reports_speed(int4_bundle):
    proc = phikit("run", int4_bundle, "--prompt", "What does os.path.join do?",
                  "--max-tokens", "16", check=0)
    assert proc.stdout.strip()
    assert "tok/s" in proc.stderr


def test_bundle_runner_imports_only_stdlib_and_runtime(int4_bundle, tmp_path):
    proc = subprocess.run([sys.executable, "-X", "importtime", str(int4_bundle / "run.py"),
                           "--prompt", "Hello", "--max-tokens", "4", "--raw"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "onnxruntime_genai" in imported and "phikit_runner" in imported
    assert not imported & {"toolkit", "torch", "transformers", "typer", "rich", "pydantic",
                           "yaml"}, imported


def test_flipped_byte_refused_naming_file(int4_bundle, tmp_path):
    bundle = tmp_path / "tampered"
    shutil.copytree(int4_bundle, bundle)
    data_file = bundle / "model" / "model.onnx.data"
    data = bytearray(data_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    data_file.write_bytes(bytes(data))
    for args in (("verify", bundle), ("run", bundle, "--prompt", "hi")):
        proc = phikit(*args)
        assert proc.returncode == 2, proc.stdout
        assert "model/model.onnx.data: sha256 does not match" in proc.stderr
        assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, str(bundle / "run.py"), "verify"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "model.onnx.data" in proc.stderr


def test_bare_builder_dir_validates(tmp_path):
    """CI users bring an artifact made by hand with the builder; validate takes it as is."""
    out = tmp_path / "by-hand"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(TINY),
                    "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(tmp_path / "c")],
                   check=True, capture_output=True)
    proc = phikit("validate", out)
    assert proc.returncode == 2 and "--reference" in proc.stderr
    report_path = tmp_path / "r.json"
    phikit("validate", out, "--reference", TINY, "--json", report_path, check=0)
    report = json.loads(report_path.read_text())
    assert report["artifact"] == "bare onnx" and report["verdict"] == "pass"


def strict_recipe(tmp_path):
    text = (REPO / "recipes" / "tiny-phi3-int4.yaml").read_text()
    text = text.replace("../", f"{REPO}/") + "thresholds:\n  kld_mean_max: 0.0\n"
    path = tmp_path / "strict.yaml"
    path.write_text(text)
    return path


def test_missed_threshold_exits_1_with_symptom(int4_bundle, tmp_path):
    proc = phikit("validate", int4_bundle, "--recipe", strict_recipe(tmp_path))
    assert proc.returncode == 1
    assert "kld_mean" in proc.stdout + proc.stderr and "worst text" in proc.stdout + proc.stderr


def test_failed_build_leaves_no_valid_looking_bundle(tmp_path):
    out = tmp_path / "strict"
    proc = phikit("build", strict_recipe(tmp_path), "--target", "generic-cpu", "--out", out)
    assert proc.returncode == 1
    assert not out.exists()
    failed = tmp_path / "strict.failed"
    assert manifest(failed)["parity"]["verdict"] == "fail"
    proc = phikit("run", failed, "--prompt", "hi")
    assert proc.returncode == 2 and "parity verdict is 'fail'" in proc.stderr
    assert not list(tmp_path.glob(".strict.partial-*"))


def test_archive_is_reproducible_and_a_rebuild_reuses_its_validation(tmp_path):
    outs = []
    for name, extra in (("a", ()), ("b", ()), ("c", ("--revalidate",))):
        out = tmp_path / name / "bundle"
        phikit("build", "recipes/tiny-phi3-int8.yaml", "--target", "generic-cpu", "--out", out,
               "--archive", *extra, check=0)
        outs.append(out.with_name("bundle.tar.gz"))
    a, b, c = (json.loads((tmp_path / n / "bundle" / "parity.json").read_text()) for n in "abc")
    # b is a's bundle, byte for byte where it counts: its figures are a's, and it says so
    assert b["reused"]["measured_at"] and b["metrics"] == a["metrics"]
    assert any("validation reused" in n for n in b["notes"])
    # --revalidate measures again: the same figures (the runtime is deterministic here)
    assert c.get("reused") is None and not any("validation reused" in n for n in c["notes"])
    assert c["verdict"] == a["verdict"]
    assert abs(c["metrics"]["kld_mean"] - a["metrics"]["kld_mean"]) < 1e-6
    outs.pop()
    # Manifests carry a creation time, so compare everything else: the model and runner files.
    import tarfile

    def members(path):
        with tarfile.open(path) as tar:
            return {m.name: tar.extractfile(m).read() for m in tar.getmembers()
                    if not m.name.endswith(("manifest.json", "parity.json", "report.html"))}

    assert members(outs[0]) == members(outs[1])


def test_build_json_is_the_bundles_report(int4_bundle):
    written = json.loads(int4_bundle.with_name(int4_bundle.name + ".report.json").read_text())
    assert written == json.loads((int4_bundle / "parity.json").read_text())


def test_chat_takes_the_prompt_as_its_first_turn(int4_bundle):
    proc = subprocess.run([sys.executable, str(int4_bundle / "run.py"), "--chat", "--prompt",
                           "What does json.dumps do?", "--max-tokens", "4"], input="\n",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "> What does json.dumps do?" in proc.stdout and "tok/s" in proc.stderr
