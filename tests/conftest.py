"""Shared fixtures. Slow fixtures build real bundles once per session with the real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from filelock import FileLock

from toolkit.report.load import write_text_atomic
from toolkit.runner.host import available_cpus

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "models" / "tiny-phi3"


def phikit(*args: str, check: int | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess: exit codes and stderr are what users see."""
    proc = subprocess.run([sys.executable, "-m", "toolkit.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})
    if check is not None:
        assert proc.returncode == check, (
            f"phikit {' '.join(map(str, args))} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


# tests/defects' detection table: a plugin here, so that with pytest-xdist the process that
# prints the summary (which collects no test) has it too
pytest_plugins = ("defects.detection",)


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per core, at most 4 (each may hold a runtime and a reference
    model; the suite's memory was measured with 2)."""
    return max(1, min(available_cpus(), 4))


def pytest_configure(config):
    """A pytest-xdist worker runs on its own share of the CPUs (children inherit it, and the
    runners' `threads: auto` counts only those): two workers on two cores then never run four
    runtime threads that contend and spin."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    share = max(1, len(cpus) // int(count))
    start = (int(worker.removeprefix("gw")) * share) % len(cpus)
    os.sched_setaffinity(0, cpus[start:start + share])


def pytest_collection_modifyitems(config, items):
    """The `longest` tests first: a parallel run then does not end on one of them alone."""
    items.sort(key=lambda item: item.get_closest_marker("longest") is None)


@pytest.fixture(scope="session")
def dist(tmp_path_factory) -> Path:
    """Where bundles are built once per session. With pytest-xdist every worker gets the same
    directory (beside the workers' own base temp dirs); `once` serialises each bundle's build."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / "dist"
    path.mkdir(exist_ok=True)
    return path


@contextmanager
def once(out: Path) -> Iterator[None]:
    """Held while `out` is built: the workers of a run share `dist`, the first builds."""
    with FileLock(out.with_name(out.name + ".lock")):
        yield


def build_bundle(dist: Path, precision: str, target: str = "generic-cpu",
                 backend: str | None = None, limit: int | None = None) -> Path:
    """Build once per session with the real CLI; later fixtures reuse the directory. `limit`:
    validate on the first rows of the eval set only (runtimes too slow here for all of it)."""
    out = dist / (f"tiny-phi3-{precision}-{target}-{backend or 'default'}"
                  + (f"-limit{limit}" if limit else ""))
    with once(out):
        if not (out / "manifest.json").exists():
            extra = ("--backend", backend) if backend else ()
            recipe = (small_recipe(dist, precision, limit) if limit
                      else f"recipes/tiny-phi3-{precision}.yaml")
            phikit("build", recipe, "--target", target, "--out", out, *extra,
                   "--json", out.with_name(out.name + ".report.json"), check=0, timeout=1800)
    return out


def _build(dist: Path, precision: str) -> Path:
    return build_bundle(dist, precision)


@pytest.fixture(scope="session")
def int4_bundle(dist) -> Path:
    return _build(dist, "int4")


@pytest.fixture(scope="session")
def int8_bundle(dist) -> Path:
    return _build(dist, "int8")


@pytest.fixture(scope="session")
def fp32_bundle(dist) -> Path:
    return _build(dist, "fp32")


@pytest.fixture(scope="session")
def ov_int4_bundle(dist) -> Path:
    return build_bundle(dist, "int4", "intel-cpu", "openvino")


@pytest.fixture(scope="session")
def ov_int8_bundle(dist) -> Path:
    return build_bundle(dist, "int8", "intel-cpu", "openvino")


@pytest.fixture(scope="session")
def mlx_int4_bundle(dist) -> Path:
    return build_bundle(dist, "int4", "apple-metal")


@pytest.fixture(scope="session")
def gguf_int4_bundle(dist) -> Path:
    return build_bundle(dist, "int4", "ollama")


@pytest.fixture(scope="session")
def mlx_int8_bundle(dist) -> Path:
    return build_bundle(dist, "int8", "apple-metal")


SUBSET_BOUNDS = {
    "int4": {"kld_mean_max": 0.02, "kld_p99_max": 0.1, "top1_min": 0.85, "ppl_ratio_max": 1.03,
             "greedy_match_mean_min": 4},
    "int8": {"kld_mean_max": 0.001, "kld_p99_max": 0.005, "top1_min": 0.97,
             "ppl_ratio_max": 1.005, "greedy_match_mean_min": 12},
    "fp32": {"kld_mean_max": 1e-5, "kld_p99_max": 1e-4, "top1_min": 0.999,
             "ppl_ratio_max": 1.001, "greedy_match_mean_min": 20},
}


def small_recipe(tmp_path: Path, precision: str = "int4", limit: int = 6) -> Path:
    """The tiny recipe with `eval.limit` (the eval set interleaves texts, prompts and chats):
    for runtimes too slow here for the full set, such as any runtime under emulation."""
    text = (REPO / "recipes" / f"tiny-phi3-{precision}.yaml").read_text().replace("../", f"{REPO}/")
    text = text.replace("  max_new_tokens: 32\n", f"  max_new_tokens: 32\n  limit: {limit}\n")
    # The backends' default bounds come from the whole eval set; a few rows scatter more (one
    # text's perplexity, one prompt's greedy run): these tests check emulation, locks and
    # runtimes, not the bounds, so the subset gets the loose bounds all backends once shared
    text += "thresholds:\n" + "".join(f"  {k}: {v}\n" for k, v in SUBSET_BOUNDS[precision].items())
    path = tmp_path / f"small-{precision}-limit{limit}.yaml"
    write_text_atomic(path, text)  # the workers of a run share dist: never half a file
    return path


def build_wheel(into: Path, scratch: Path) -> Path:
    """phikit's wheel, built from a copy of the sources in `scratch`: setuptools keeps a build/
    directory in the source tree, and a stale one would put modules into the wheel that the
    source no longer has."""
    for part in ("toolkit", "recipes", "targets", "evalsets", "models/tiny-phi3"):
        shutil.copytree(REPO / part, scratch / part,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, scratch / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(into), str(scratch)], check=True,
                   timeout=600)
    (wheel,) = into.glob("phikit-*.whl")
    return wheel


def reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=15).close()
        return True
    except OSError:
        return False


def stand_in_runner(into: Path, module: str, source: str) -> Path:
    """A runner directory holding a `phikit_runner` package with the worker's own modules and a
    stand-in runtime module `module` (its source): what a worker process imports, without a
    model. Returns the directory to pass as rpc_command's runner."""
    package = into / "phikit_runner"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("core.py", "host.py", "trust.py", "rpc.py"):
        shutil.copy(REPO / "toolkit" / "runner" / name, package / name)
    (package / f"{module}.py").write_text(source)
    return into
