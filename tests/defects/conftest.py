"""Honest bundles to plant defects into, and the detection table the suite prints at the end.

Bundles come from the session's `dist` (tests/conftest.py), built once with the real CLI: the
tiny-phi3 ones through tests/conftest.py's build_bundle (so other test files' fixtures share them),
the other fixture families (tiny-phi3-longrope) through build_family_bundle below.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, build_bundle, phikit, once
from toolkit.backends import BACKENDS
from toolkit.paths import TARGETS_DIR
from toolkit.schema import load_target

from .detection import Recorder



def home(backend: str) -> tuple[str, str | None]:
    """(target, --backend) of a backend's honest bundle: its home target, the backend named only
    where it is not that target's default, so the directories are the ones tests/conftest.py's
    own fixtures (int4_bundle, ov_int4_bundle, mlx_int4_bundle, ...) build."""
    target = BACKENDS[backend].home_target
    default = load_target(TARGETS_DIR / f"{target}.yaml", set(BACKENDS)).backend
    return target, (None if default == backend else backend)


class Unbuildable(Exception):
    """The honest bundle cannot be built here (phikit build exit 2): nothing to plant into."""


def build_family_bundle(dist: Path, family: str, precision: str, target: str,
                        backend: str | None) -> Path:
    """build_bundle for recipes/{family}-{precision}.yaml. A build whose validation fails is
    published as OUT.failed: that one is returned, so its honest row shows the false alarm."""
    out = dist / f"{family}-{precision}-{target}-{backend or 'default'}"
    failed = out.with_name(out.name + ".failed")
    unbuildable = out.with_name(out.name + ".unbuildable")  # one failed build per session
    with once(out):
        if unbuildable.is_file():
            raise Unbuildable(unbuildable.read_text())
        if not (out / "manifest.json").exists() and not (failed / "manifest.json").exists():
            if not (REPO / "models" / family / "model.safetensors").is_file():
                pytest.skip(f"models/{family} is not there (fixtures/make_tiny_phi3.py "
                            f"--member {family})")
            extra = ("--backend", backend) if backend else ()
            proc = phikit("build", f"recipes/{family}-{precision}.yaml", "--target", target,
                          "--out", out, *extra, timeout=1800)
            if proc.returncode == 2:
                errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
                unbuildable.write_text(f"phikit build {family}-{precision} --target {target}: "
                                       "exit 2, " + (errors[-1] if errors
                                                     else proc.stderr.strip()[-300:]))
                raise Unbuildable(unbuildable.read_text())
            assert proc.returncode in (0, 1), f"{proc.stdout}\n{proc.stderr}"
    return out if (out / "manifest.json").exists() else failed


@pytest.fixture(scope="session")
def honest(dist):
    """honest(family, precision, backend) -> the session's bundle (built on first use)."""
    def get(family: str, precision: str, backend: str) -> Path:
        target, name = home(backend)
        if family != "tiny-phi3":
            return build_family_bundle(dist, family, precision, target, name)
        try:
            return build_bundle(dist, precision, target, name)
        except AssertionError:  # the build failed validation: its honest row says so
            failed = dist / f"tiny-phi3-{precision}-{target}-{name or 'default'}.failed"
            if (failed / "manifest.json").exists():
                return failed
            raise

    return get


@pytest.fixture
def table(request) -> Recorder:
    """Where a test records its cell of the defect x backend table (detection.py)."""
    return Recorder(request.node)
