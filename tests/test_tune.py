"""`python run.py tune`: the fastest runtime options on this machine that still validate here,
kept in tuned.json beside the manifest (issue 18). No timed assertion: the test checks that the
choice is the measured fastest of the sets that validated, and prints the figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from defects.formats import copy_bundle

# one worker runs the module: its fixture tunes once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_tune")]


def run(bundle, *args, cwd):
    return subprocess.run([sys.executable, str(bundle / "run.py"), *args], capture_output=True,
                          text=True, timeout=900, cwd=cwd)


@pytest.fixture(scope="module")
def tuned(int4_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    bundle = copy_bundle(int4_bundle, tmp / "b")
    proc = run(bundle, "tune", "--candidates", "1,2", cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return bundle, json.loads((bundle / "tuned.json").read_text()), proc.stderr


def test_tune_keeps_the_fastest_set_that_validates(tuned):
    """Thread counts first, then each value of the runtime's host-table options (ORT GenAI:
    allow_spinning) at the fastest thread count; the kept set is the fastest that validated."""
    bundle, data, log = tuned
    sets = [m for m in data["measured"]]
    by_threads = {m["options"]["threads"]: m for m in sets if set(m["options"]) == {"threads"}}
    assert set(by_threads) == {1, 2}
    fastest_threads = min(by_threads, key=lambda n: by_threads[n]["request_seconds"])
    spinning = [m for m in sets if "allow_spinning" in m["options"]]
    assert {m["options"]["allow_spinning"] for m in spinning} == {True, False}
    assert all(m["options"]["threads"] == fastest_threads for m in spinning)
    kept = min((m for m in sets if m.get("validated")), key=lambda m: m["request_seconds"])
    assert data["options"] == kept["options"] and kept["validated"] is True
    assert kept["request_seconds"] == min(m["request_seconds"] for m in sets)
    print("\ntune: " + "; ".join(f"{m['options']} {m['request_seconds'] * 1e3:.0f} ms"
                                  for m in sets) + f"; kept {data['options']} "
          f"({data['speedup_vs_slowest']}x the slowest)")
    assert "validated on this machine" in log


def test_a_tuned_bundle_verifies_and_validates_with_its_options(tuned, tmp_path):
    bundle, data, _ = tuned
    verify = run(bundle, "verify", cwd=tmp_path)
    assert verify.returncode == 0 and "tuned options in force" in verify.stdout, verify.stderr
    proc = run(bundle, "validate", "--json", str(tmp_path / "r.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["runtime_options"]["threads"] == data["options"]["threads"]
    for name, value in data["options"].items():  # what the runner had in force, in the report
        if name != "threads":
            assert report["candidate"]["options_in_force"][name]["value"] == value
    assert any("tuned options in force" in n for n in report["notes"])


@pytest.mark.parametrize("options, why", [({"threads": 0}, "threads must be"),
                                          ({"threads": "2; rm -rf /"}, "threads must be"),
                                          ({"provider_options": {"x": 1}}, "may be tuned"),
                                          ({"allow_spinning": "yes"}, "allow_spinning must be")])
def test_tuned_json_is_not_trusted(tuned, options, why, tmp_path):
    bundle = copy_bundle(tuned[0], tmp_path / "b")
    (bundle / "tuned.json").write_text(json.dumps({"options": options, "cpu": tuned[1]["cpu"]}))
    for args in (["verify"], ["--prompt", "hi", "--max-tokens", "2"]):
        proc = run(bundle, *args, cwd=tmp_path)
        assert proc.returncode == 2 and "tuned.json" in proc.stderr and why in proc.stderr
        assert "Traceback" not in proc.stderr


def test_options_tuned_on_another_cpu_are_not_used(tuned, tmp_path):
    bundle = copy_bundle(tuned[0], tmp_path / "b")
    (bundle / "tuned.json").write_text(json.dumps({"options": {"threads": 1},
                                                   "cpu": "some other CPU"}))
    verify = run(bundle, "verify", cwd=tmp_path)
    assert verify.returncode == 0 and "not this CPU: not used" in verify.stdout
