"""`phikit demo` (what `make demo` runs) and the doctor / list commands."""

from __future__ import annotations

import json

import pytest

from conftest import phikit


def test_doctor_and_list():
    proc = phikit("doctor", check=0)
    assert "onnx" in proc.stdout and "generic-cpu" in proc.stdout and "runs here" in proc.stdout
    proc = phikit("list", check=0)
    for name in ("tiny-phi3-int4", "phi-3.5-mini-instruct-int4", "generic-cpu", "intel-cpu",
                 "ollama"):
        assert name in proc.stdout
    # the same tables as data, for scripts
    listed = json.loads(phikit("list", "--json", check=0).stdout)
    assert {t["title"] for t in listed} >= {"recipes", "targets"}
    recipes = next(t for t in listed if t["title"] == "recipes")["rows"]
    assert {"name": "tiny-phi3-int4"}.items() <= next(
        r for r in recipes if r["name"] == "tiny-phi3-int4").items()
    doctor = json.loads(phikit("doctor", "--json", check=0).stdout)
    assert any(r.get("name") == "generic-cpu" for r in doctor[0]["rows"])



def test_doctor_hints_paste_as_printed_and_json_has_no_markup(monkeypatch):
    """An unusable backend's install hint keeps its brackets on the terminal (Rich read
    `"phikit[gguf]"` as markup and printed `"phikit"`), and --json cells are plain text."""
    import io

    from rich.console import Console

    from toolkit.backends import BACKENDS
    from toolkit.doctor import doctor_table
    from toolkit.terminal import tables_json

    gguf = BACKENDS["gguf"]
    monkeypatch.setattr(type(gguf), "unavailable", lambda self: "llama_cpp is not installed")
    table, ok = doctor_table()
    screen = io.StringIO()
    Console(file=screen, width=400).print(table)
    assert not ok and '"phikit[gguf]"' in screen.getvalue()
    rows = json.loads(tables_json([table]))[0]["rows"]
    assert next(r for r in rows if r["name"] == "gguf")["status"] == "no"
    assert not [cell for r in rows for cell in r.values() if "[/" in cell or "[red]" in cell]

@pytest.mark.slow
@pytest.mark.longest
def test_demo_builds_validates_and_answers(dist):
    out = dist / "demo"  # in the session's dist: tests/test_qnn.py reuses its NPU bundle
    proc = phikit("demo", "--out", out, check=0, timeout=1800)
    assert "phikit demo: tiny-phi3" in proc.stdout
    assert "FAIL" not in proc.stdout
    built = sorted(p.name for p in out.iterdir() if p.is_dir())
    native = [f"tiny-phi3-{p}-{t}" for p in ("int4", "int8", "fp32")
              for t in ("generic-cpu", "intel-cpu", "ollama")]
    off_device = ["tiny-phi3-int4-intel-gpu", "tiny-phi3-fp32-apple-metal",
                  "tiny-phi3-int4-raspberry-pi", "tiny-phi3-int4-nvidia-cuda",
                  "tiny-phi3-w8a16-qualcomm-npu"]
    assert built == sorted(native + off_device)
    for line in proc.stdout.splitlines():
        if "apple-metal" in line and "pass" in line:
            assert "mlx" in line
        if "qualcomm-npu" in line and "pass" in line:
            assert "qnn" in line and "HTP" in line


def test_version_short_help_and_completion():
    from toolkit import __version__

    assert phikit("--version", check=0).stdout.strip() == f"phikit {__version__}"
    top = phikit("-h", check=0).stdout
    assert "--install-completion" in top and "validate" in top
    assert "--emulate" in phikit("validate", "-h", check=0).stdout


def test_run_and_serve_help_show_the_runner_options():
    assert "--chat" in phikit("run", "-h", check=0).stdout
    assert "--api-key" in phikit("serve", "--help", check=0).stdout
