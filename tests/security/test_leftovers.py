"""Crash leftovers and races (issue 17, item 8): a build killed mid-way leaves directories that
look complete; the next build removes those of dead processes. Two builds of one artifact at
once: the second waits for the first one's result instead of converting again."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from toolkit.build import convert_cached
from toolkit.package import publish, staging_dir

from .conftest import synthetic_bundle


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def standin_plan(convert):
    """What convert_cached reads of a plan, with a stand-in backend converting by `convert`."""
    backend = SimpleNamespace(name="standin", convert=convert, describe=lambda *a: "stand-in",
                              toolchain=lambda: {}, revision=1, float_intermediate=False)
    return SimpleNamespace(
        backend=backend, recipe=SimpleNamespace(quantization=SimpleNamespace(
            precision="int4", model_dump=lambda mode: {}), context_length=None),
        out=Path("bundle"),
        target=SimpleNamespace(execution_provider="cpu", runtime=SimpleNamespace(threads=None)))


def test_a_killed_builds_staging_copy_is_swept(tmp_path):
    out = tmp_path / "b"
    pid = dead_pid()
    leftover = synthetic_bundle(tmp_path / f".b.partial-{pid}")  # complete-looking, verifies
    live = tmp_path / f".b.partial-{os.getppid()}"  # a build still running: left alone
    live.mkdir()
    stage = staging_dir(out)
    assert not leftover.exists() and live.is_dir() and stage.is_dir()


def test_publish_replaces_the_old_bundle_and_leaves_nothing_aside(tmp_path):
    out = tmp_path / "b"
    synthetic_bundle(out)
    (out / "old-marker").write_text("old")
    stage = staging_dir(out)
    (stage / "new-marker").write_text("new")
    final = publish(stage, out, passed=True)
    assert final == out and (out / "new-marker").exists() and not (out / "old-marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_concurrent_conversion_of_one_artifact(tmp_path, monkeypatch):
    """Two builds of one artifact at once (a CI matrix on one runner, test workers): the tool
    runs once, the second build waits for it and takes its result."""
    monkeypatch.setenv("PHIKIT_CACHE", str(tmp_path / "cache"))
    calls, started = [], threading.Event()

    def convert(source, out, recipe, target, log):
        calls.append(out)
        started.set()
        time.sleep(0.5)  # the other build asks for the artifact meanwhile
        out.mkdir()
        (out / "weights").write_text("w")

    plan = standin_plan(convert)
    results = {}

    def build(name):
        results[name] = convert_cached(plan, tmp_path, "digest", None, lambda s: None)

    first = threading.Thread(target=build, args=("first",))
    first.start()
    assert started.wait(30)
    build("second")
    first.join(30)
    assert len(calls) == 1
    assert results["first"] == (results["second"][0], False) and results["second"][1] is True
    artifact = results["first"][0]
    assert (artifact / "model" / "weights").read_text() == "w"
    # no *.tmp-PID left beside it
    assert [p.name for p in artifact.parent.iterdir()] == [artifact.name]


def test_a_converters_temporary_files_stay_in_the_conversions_work_dir(tmp_path, monkeypatch):
    """optimum-intel writes a float IR the checkpoint's size to its temp dir: a conversion
    killed there would leave it in /tmp for good. The tools' TMPDIR is the conversion's work
    dir (swept with it by the next build), and it is gone from the finished artifact."""
    from toolkit.backends.common import run_tool

    monkeypatch.setenv("PHIKIT_CACHE", str(tmp_path / "cache"))
    seen = []

    def convert(source, out, recipe, target, log):
        out.mkdir()
        run_tool([sys.executable, "-c", "import tempfile, pathlib, sys; "
                  "d = pathlib.Path(tempfile.mkdtemp()); (d / 'float-ir').write_text('x'); "
                  "print(d); pathlib.Path(sys.argv[1]).write_text('w')", str(out / "weights")],
                 seen.append, "a stand-in converter", out / "weights")

    plan = standin_plan(convert)
    artifact, _ = convert_cached(plan, tmp_path, "digest", None, lambda s: None)
    scratch = Path(seen[-1])
    assert scratch.parent.parent.name.startswith(artifact.name + ".tmp-")  # <key>.tmp-PID/scratch
    assert not scratch.exists() and sorted(p.name for p in artifact.iterdir()) == [
        "conversion.json", "model"]
