"""Any x86-64 machine: a crashing runtime is an error (never phikit's death), CPU-specific
protections are chosen from the host's features, aarch64 emulation registers on a fresh machine,
and bundles validate as an AVX2-only CPU would run them."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, once, phikit, small_recipe
from toolkit.report.load import write_text_atomic
from toolkit.emulate import beyond
from toolkit.manifest import BundleManifest
from toolkit.runner.core import host_cpu

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse sse2 avx avx2 fma f16c avx512f avx512bw avx512_vnni avx512_bf16 avx_vnni amx_bf16 avx512_fp16 amx_tile amx_int8
"""
ZEN4 = """model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse avx avx2 fma f16c avx512f avx512bw avx512_vnni avx512_bf16
"""
RASPBERRY_PI_5 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
"""


def test_host_cpu_classes_and_features_of_note():
    spr = host_cpu(SAPPHIRE_RAPIDS)
    assert spr["class"] == "amx" and spr["model"] == "Intel(R) Xeon(R) Platinum 8488C"
    assert {"amx_int8", "avx512_fp16", "avx512_vnni", "avx_vnni"} <= set(spr["features"])
    zen4 = host_cpu(ZEN4)
    assert zen4["class"] == "avx512" and "avx512_fp16" not in zen4["features"]
    assert host_cpu("flags : sse avx avx2 fma\n")["class"] == "avx2"
    assert {"asimd", "asimdhp", "asimddp"} <= set(host_cpu(RASPBERRY_PI_5)["features"])
    here = host_cpu()
    assert here["model"] and here["class"] in ("amx", "avx512", "avx2", "x86_64", "arm64")


def test_llama_cpp_extra_buffer_types_off_only_where_amx_crashes():
    from toolkit.runner.llamacpp_rt import extra_buffer_types

    off, why = extra_buffer_types("auto", host_cpu(SAPPHIRE_RAPIDS))
    assert off is False and why["value"] is False and "llama.cpp#20824" in why["why"]
    assert extra_buffer_types("auto", host_cpu(ZEN4))[0] is True
    assert extra_buffer_types(None, host_cpu(ZEN4))[0] is True
    assert extra_buffer_types(False, host_cpu(ZEN4))[0] is False
    assert extra_buffer_types("true", host_cpu(SAPPHIRE_RAPIDS))[0] is True
    # a protection: `run.py tune` does not try turning them on where they crash
    from toolkit.runner.llamacpp_rt import HOST_TABLE

    assert "extra_buffer_types" not in HOST_TABLE.tunable(host_cpu(SAPPHIRE_RAPIDS))
    assert HOST_TABLE.tunable(host_cpu(ZEN4))["extra_buffer_types"] == (True, False)


ZEN1 = """model name\t: AMD EPYC 7571
flags\t\t: fpu sse avx avx2 fma f16c sha_ni
"""
HOST_TABLE_MODULES = ("openvino_rt", "ortgenai", "llamacpp_rt")


@pytest.mark.parametrize("module", HOST_TABLE_MODULES)
def test_host_tables_decide_auto_options_per_cpu_within_their_choices(module):
    """Every runtime's host table: rows only set options it declares, to values it allows; on
    each CPU class "auto" (or nothing) becomes a row's value or the runtime's default, with a
    reason; a set value wins over the table; a value outside the choices is refused."""
    import importlib

    from toolkit.runner.core import AUTO, one_of

    table = importlib.import_module(f"toolkit.runner.{module}").HOST_TABLE
    for row in table.rows:
        assert row.option in table.choices and one_of(row.value, table.choices[row.option]), row
    for cpuinfo in (SAPPHIRE_RAPIDS, ZEN4, ZEN1, RASPBERRY_PI_5):
        cpu = host_cpu(cpuinfo)
        chosen, in_force = table.choose({}, cpu)
        assert table.choose({name: AUTO for name in table.choices}, cpu) == (chosen, in_force)
        for name, allowed in table.choices.items():
            assert chosen[name] is None or one_of(chosen[name], allowed)
            assert cpu["class"] in in_force[name]["why"]
            other = allowed[-1]
            assert table.choose({name: other}, cpu)[0][name] == other
            with pytest.raises(ValueError, match=name):
                table.choose({name: "not-a-choice"}, cpu)


def test_a_validation_is_reused_only_for_the_same_content_bounds_runtime_and_cpu(
        tmp_path, monkeypatch):
    """The build's validation cache key (the e2e rebuild test shows a hit): it follows the
    model and runner files, the bounds and the host CPU, not the re-written reference file."""
    import toolkit.validate as validate
    from toolkit.schema import Thresholds

    stage = tmp_path / "stage"
    (stage / "model").mkdir(parents=True)
    (stage / "eval").mkdir()
    (stage / "model" / "weights.bin").write_bytes(b"w" * 64)
    (stage / "eval" / "reference.npz").write_bytes(b"r1")

    def key(bounds=Thresholds(kld_mean_max=0.02)):
        return validate.validation_key(stage, "ortgenai", {"threads": 2}, "refkey", bounds, 32,
                                       ["onnxruntime-genai"])

    first = key()
    (stage / "eval" / "reference.npz").write_bytes(b"r2")  # re-saved on every build
    assert key() == first
    assert key(Thresholds(kld_mean_max=0.01)) != first
    (stage / "model" / "weights.bin").write_bytes(b"v" * 64)
    changed = key()
    assert changed != first
    monkeypatch.setattr(validate, "host_summary", lambda all_flags=False: host_cpu(ZEN4))
    assert key() != changed
    monkeypatch.setenv("PHIKIT_CACHE", str(tmp_path / "cache"))
    assert validate.cached_validation(changed) is None


def test_doctor_names_the_cpu_and_what_it_changes():
    proc = phikit("doctor", check=0)
    text = " ".join(proc.stdout.split())
    assert host_cpu()["model"].split()[0] in text
    assert "extra_buffer_types = " in text and "f16 hints" in text
    # each runtime's host table: what "auto" decides on this CPU, and why
    # an option left to a runtime whose default is one value everywhere is named by its value
    assert "allow_spinning = True (auto:" in text and "dynamic_quantization_group_size" in text


@pytest.mark.skipif(os.geteuid() != 0, reason="binfmt_misc registration needs root")
@pytest.mark.xdist_group("aarch64-binfmt")  # it unregisters qemu-aarch64 for a moment
def test_binfmt_script_registers_aarch64_from_scratch():
    """What `make system-deps` runs: with the registration removed (a fresh machine without
    systemd), the script registers qemu-aarch64 again and proves an aarch64 binary runs."""
    if not Path("/usr/lib/binfmt.d/qemu-aarch64.conf").is_file():
        pytest.skip("qemu-user-static 10 is not installed (make system-deps)")
    entry = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    if entry.exists():
        entry.write_text("-1")  # unregister
    assert not entry.exists()
    proc = subprocess.run(["sh", str(REPO / "scripts" / "binfmt-aarch64")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert "aarch64 binaries run" in proc.stdout
    assert entry.read_text().startswith("enabled")


# --- a runtime that crashes ---------------------------------------------------------------------

CRASHING_TAIL = '''

# --- phikit test stand-in: the ONNX runtime above, except that logits() raises SIGSEGV ---------
class _Crashing:
    def __init__(self, inner):
        self.inner = inner
        self.eos_token_ids, self.context_length = inner.eos_token_ids, inner.context_length

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def CRASHING_METHOD(self, *args):
        import os
        import signal
        os.kill(os.getpid(), signal.SIGSEGV)


_real_open_session = open_session


def open_session(model_dir, options):
    return _Crashing(_real_open_session(model_dir, options))
'''


def segv_runtime(method: str = "logits") -> str:
    """A stand-in runtime module: ONNX's, except that `method` kills the process (SIGSEGV).
    Self-contained like every runtime module (a bundle ships core.py + one runtime module)."""
    return ((REPO / "toolkit" / "runner" / "ortgenai.py").read_text()
            + CRASHING_TAIL.replace("CRASHING_METHOD", method))


def segv_bundle(int4_bundle: Path, where: Path, method: str = "logits") -> Path:
    """The honest ONNX bundle with its runtime module replaced by segv_runtime(), rehashed."""
    from toolkit.package import finish_manifest

    bundle = where / "segv-bundle"
    shutil.copytree(int4_bundle, bundle)
    (bundle / "phikit_runner" / "segv_rt.py").write_text(segv_runtime(method))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["runtime"]["module"] = "segv_rt"
    (bundle / "manifest.json").unlink()
    for key in ("format", "phikit", "files"):
        manifest.pop(key)
    finish_manifest(bundle, manifest)
    return bundle


@pytest.mark.slow
def test_runtime_segfault_is_exit_2_with_one_line(int4_bundle, tmp_path):
    bundle = segv_bundle(int4_bundle, tmp_path)
    proc = phikit("validate", bundle, "--recipe", small_recipe(tmp_path, limit=2))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    error = " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1
    assert "segv_rt runtime crashed (SIGSEGV)" in error
    assert "during validation, while computing logits for" in error


@pytest.mark.slow
def test_demo_marks_a_crashed_row_and_goes_on(int4_bundle, tmp_path, monkeypatch):
    """A stand-in backend (the ONNX one under another name, with SEGV_RT as its runtime) among
    real demo rows: the demo finishes, its table shows the crashed row and every other row. The
    crash fails the demo where this machine is the target's device, and only then."""
    from rich.console import Console

    import toolkit.demo as demo
    import toolkit.package as package
    from toolkit.backends import BACKENDS
    from toolkit.backends.onnx import BACKEND as ONNX

    runner = tmp_path / "runner"
    shutil.copytree(REPO / "toolkit" / "runner", runner)
    (runner / "segv_rt.py").write_text(segv_runtime())
    monkeypatch.setattr(package, "RUNNER_DIR", runner)

    class Standin(type(ONNX)):
        name, runtime_module = "segv-standin", "segv_rt"

    monkeypatch.setitem(BACKENDS, "segv-standin", Standin())
    target = tmp_path / "segv-cpu.yaml"
    target.write_text((REPO / "targets" / "generic-cpu.yaml").read_text()
                      .replace("name: generic-cpu", "name: segv-cpu")
                      .replace("backend: onnx", "backend: segv-standin")
                      .replace("backends: [onnx, gguf]", "backends: [segv-standin]")
                      .replace("    onnx: [", "    segv-standin: ["))
    recipe = str(small_recipe(tmp_path, limit=6))
    monkeypatch.setattr(demo, "demo_builds", lambda only=None: [
        demo.DemoBuild(recipe, "generic-cpu", "this CPU", True),
        demo.DemoBuild(recipe, str(target), "this CPU", True),
        demo.DemoBuild(recipe, "intel-cpu", "this CPU", True)])
    text = io.StringIO()
    console = Console(file=text, width=250)
    from toolkit.cli import progress_bars

    code = demo.run_demo(tmp_path / "dist", console, console, progress_bars)
    shown = text.getvalue()
    assert code == 1, shown
    rows = [line for line in shown.splitlines() if line.startswith("│")]
    assert any("segv-cpu" in r and "CRASHED" in r for r in rows), shown
    assert sum("pass" in r for r in rows) == 2, shown
    assert "segv_rt runtime crashed (SIGSEGV)" in " ".join(shown.split())
    assert "this machine is a segv-cpu device, so the demo fails" in " ".join(shown.split())

    # the same crash on a row measured on a stand-in for its device: reported, not the demo's
    monkeypatch.setattr(demo, "demo_builds", lambda only=None: [
        demo.DemoBuild(recipe, str(target), "this CPU, not the target's device", False)])
    text.seek(0)
    text.truncate()
    assert demo.run_demo(tmp_path / "dist", console, console, progress_bars) == 0
    shown = " ".join(text.getvalue().split())
    assert "CRASHED" in shown and "does not fail the demo" in shown, shown
    assert not (tmp_path / "dist" / f"{Path(recipe).stem}-segv-cpu").exists()


@pytest.mark.slow
def test_server_outlives_a_crashing_runtime(int4_bundle, tmp_path):
    """run.py serve runs the runtime in a worker process: a crash fails that request (HTTP 500
    naming the signal) and the next request gets a new worker; the server never goes down."""
    import http.client
    import sys

    from test_server import free_port, raw_post, server

    bundle = segv_bundle(int4_bundle, tmp_path, method="generate")
    port = free_port()
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    with server([sys.executable, str(bundle / "run.py"), "serve"], port) as proc:
        for _ in range(2):  # the second request is served by a restarted worker
            status, reply = raw_post(port, body.encode())
            assert status == 500, reply
            assert "segv_rt runtime crashed (SIGSEGV)" in reply["error"]["message"]
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/health")
            assert conn.getresponse().status == 200 and proc.poll() is None


@pytest.mark.slow
def test_a_restarted_worker_runs_only_verified_code(int4_bundle, tmp_path):
    """After a crash, the worker that would serve the next request imports the runtime's code
    from disk again: code planted there meanwhile (hashes left stale, or rehashed as an
    attacker of an unsigned bundle would) is refused with 503 and never runs."""
    import sys

    from security.conftest import payload, rehash
    from test_server import free_port, raw_post, server

    bundle = segv_bundle(int4_bundle, tmp_path, method="generate")
    canary = tmp_path / "canary"
    runtime = bundle / "phikit_runner" / "segv_rt.py"
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    port = free_port()
    with server([sys.executable, str(bundle / "run.py"), "serve"], port) as proc:
        status, reply = raw_post(port, body.encode())
        assert status == 500 and "crashed (SIGSEGV)" in reply["error"]["message"], reply
        runtime.write_text(payload(canary) + runtime.read_text())
        for plant in ("stale hashes", "rehashed"):
            if plant == "rehashed":
                rehash(bundle)
            status, reply = raw_post(port, body.encode())
            assert status == 503, (plant, reply)
            assert "no longer verifies" in reply["error"]["message"], reply
            assert not canary.exists(), f"planted code ran ({plant})"
        assert proc.poll() is None


@pytest.mark.slow
def test_gguf_validates_with_the_amx_protection_forced(gguf_int4_bundle, tmp_path):
    """The protection's path (llama.cpp loaded with use_extra_bufts off, what `auto` picks on
    AMX) forced on any CPU: the bundle still passes, and its report says where the weights
    were, from llama.cpp's load log."""
    report_path = tmp_path / "r.json"
    proc = phikit("validate", gguf_int4_bundle, "--option", "extra_buffer_types=false",
                  "--recipe", small_recipe(tmp_path, limit=6), "--json", report_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    candidate = json.loads(report_path.read_text())["candidate"]
    assert candidate["options_in_force"]["extra_buffer_types"]["value"] is False
    assert set(candidate["weight_buffers"]) <= {"CPU", "CPU_Mapped"}, candidate["weight_buffers"]


# What llama.cpp actually did with the weights, from the bundle's own runner: the Llama object's
# model parameters (what llama.cpp received) and llama.cpp's load log (where it put them). Only
# the model is loaded: nothing is decoded, so the AMX buffer type's crash cannot happen here.
LOAD_PROBE = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import llama_cpp
from phikit_runner import llamacpp_rt
session = llamacpp_rt.open_session(Path(sys.argv[1]) / "model",
                                   {"extra_buffer_types": sys.argv[2], "context_length": 256})
print(json.dumps({"use_extra_bufts": bool(session.llm.model_params.use_extra_bufts),
                  "weight_buffers": session.info().get("weight_buffers"),
                  "system": llama_cpp.llama_print_system_info().decode()}))
"""


def load_probe(bundle: Path, extra_buffer_types: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(bundle), extra_buffer_types],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_extra_buffer_types_option_reaches_llama_cpp(gguf_int4_bundle):
    """Off: llama.cpp received use_extra_bufts false and its log names no extra buffer type
    (AMX, CPU_REPACK) holding weights. On: it received true, and where this llama.cpp has an
    extra buffer type for Q4_0 weights on this CPU (AMX, else the AVX2 repack), that type holds
    some. Runs on any x86 CPU: no AMX needed to see that the option reached llama.cpp."""
    off = load_probe(gguf_int4_bundle, "false")
    assert off["use_extra_bufts"] is False
    assert off["weight_buffers"] and set(off["weight_buffers"]) <= {"CPU", "CPU_Mapped"}, off

    on = load_probe(gguf_int4_bundle, "true")
    assert on["use_extra_bufts"] is True
    compiled = on["system"].partition("CPU :")[2]
    expected = ("AMX" if "AMX_INT8 = 1" in compiled
                else "CPU_REPACK" if "REPACK = 1" in compiled and "AVX2 = 1" in compiled
                else None)
    if expected is None:
        pytest.skip(f"this llama.cpp has no extra buffer type for Q4_0 here: {compiled.strip()}")
    assert expected in on["weight_buffers"], on


# --- an AVX2-only CPU ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_default_block_bundle(dist) -> Path:
    """tiny-phi3 int4 with block_size left to the backend, as the Phi-3 recipes leave it: ONNX
    on an x86 CPU target picks 128, which ONNX Runtime runs through another kernel than block
    32's."""
    out = dist / "tiny-phi3-int4-generic-cpu-default-block"
    with once(out):
        if not (out / "manifest.json").exists():
            text = (REPO / "recipes" / "tiny-phi3-int4.yaml").read_text()
            recipe = dist / "tiny-phi3-int4-default-block.yaml"
            write_text_atomic(recipe, text.replace("../", f"{REPO}/").replace(
                "  block_size: 32\n", ""))
            phikit("build", recipe, "--target", "generic-cpu", "--out", out, check=0,
                   timeout=1800)
    return out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-x86_64") is None,
                    reason="needs qemu-user (make system-deps installs it)")
@pytest.mark.parametrize("fixture", ["int4_bundle", "onnx_default_block_bundle", "ov_int4_bundle",
                                     "gguf_int4_bundle"],
                         ids=["onnx", "onnx-default-block", "openvino", "gguf"])
def test_validates_as_an_avx2_only_cpu_runs_it(fixture, request, tmp_path):
    bundle = request.getfixturevalue(fixture)
    report_path = tmp_path / "r.json"
    manifest = json.loads((bundle / "manifest.json").read_text())
    if fixture == "onnx_default_block_bundle":  # the block the plan resolved, as converted
        assert manifest["recipe"]["quantization"]["block_size"] == 128
    features, _ = beyond(BundleManifest.parse(manifest, bundle / "manifest.json"), "x86-64-v3")
    if features:  # llama.cpp compiled here with -march=native on a CPU beyond AVX2
        proc = phikit("validate", bundle, "--emulate", "x86-64-v3", "--recipe",
                      small_recipe(tmp_path, limit=3), timeout=300)
        assert proc.returncode == 2 and "compiled for this CPU" in proc.stderr \
            and "GGML_NATIVE=OFF" in proc.stderr, proc.stdout + proc.stderr
        pytest.skip(f"this machine's {manifest['runtime']['module']} was compiled for its own "
                    f"CPU ({', '.join(features)}): refused up front, as it should be; the emulated "
                    "run needs a portable build (the error names the command)")
    # 3 rows (a text, a prompt, a chat): qemu's TCG runs the AVX2 kernels ~40x slower than native
    proc = phikit("validate", bundle, "--emulate", "x86-64-v3", "--recipe",
                  small_recipe(tmp_path, limit=3), "--json", report_path, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(report_path.read_text())
    assert report["candidate"]["emulated_arch"] == "x86-64-v3"
    assert "Haswell" in report["candidate"]["emulated_cpu"]
    assert report["emulation"]["prompts"] and report["host"]["cpu"] == host_cpu()["model"]
    print(f"\n{fixture} as x86-64-v3: KLD {report['metrics']['kld_mean']:.5f}, greedy match "
          f"vs this CPU {report['emulation']['greedy_match_vs_native_mean']:.1f}, "
          f"{report['timing']}")


def test_a_disk_too_small_is_refused_before_converting(tmp_path, monkeypatch):
    """A machine with less free disk than the conversion needs (the converter's float copy of
    the checkpoint, the model, the bundle's copy) is told so before the converter starts, not
    after its longest step with the tool's own error."""
    from toolkit import build
    from toolkit.errors import PhikitError

    monkeypatch.setenv("PHIKIT_CACHE", str(tmp_path / "cache"))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(build.shutil, "disk_usage",
                        lambda path: usage._replace(free=1_000_000))
    plan = build.make_plan("recipes/tiny-phi3-int4.yaml", "ollama", out=tmp_path / "b")
    with pytest.raises(PhikitError) as err:
        build.execute(plan)
    text = str(err.value)
    assert "not enough free disk for gguf int4" in text and "the converter's float copy" in text
    assert "which has 1.0 MB free" in text and "PHIKIT_CACHE" in text and str(tmp_path) in text
    assert not list((tmp_path / "cache" / "artifacts").iterdir()) and not (tmp_path / "b").exists()
    needed = float(text.split("about ")[1].split(" MB")[0]) * 1e6
    assert needed > sum(p.stat().st_size for p in (REPO / "models/tiny-phi3").glob("*.safet*"))
    monkeypatch.setattr(build.shutil, "disk_usage",
                        lambda path: usage._replace(free=int(needed * 1.1)))
    build.check_disk(plan, REPO / "models" / "tiny-phi3", plan.info, None)  # enough: no error
    onnx = build.make_plan("recipes/tiny-phi3-int4.yaml", "generic-cpu", out=tmp_path / "o")
    monkeypatch.setattr(build.shutil, "disk_usage", lambda path: usage._replace(free=1_000_000))
    with pytest.raises(PhikitError, match="about .* MB \\(the converted model") as err:
        build.check_disk(onnx, REPO / "models" / "tiny-phi3", onnx.info, None)
    assert "float copy" not in str(err.value)  # its builder quantizes as it writes
