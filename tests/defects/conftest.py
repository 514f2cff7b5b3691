"""Honest bundles to plant defects into, and the detection table the suite prints at the end.

Bundles come from the session's `dist` (tests/conftest.py), built once with the real CLI: the
tiny-phi3 ones through tests/conftest.py's build_bundle (so other test files' fixtures share them),
the other fixture families (tiny-phi3-longrope) through build_family_bundle below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO, build_bundle, phikit
from toolkit.backends import BACKENDS
from toolkit.paths import TARGETS_DIR
from toolkit.schema import load_target



def home(backend: str) -> tuple[str, str | None]:
    """(target, --backend) of a backend's honest bundle: its home target, the backend named only
    where it is not that target's default, so the directories are the ones tests/conftest.py's
    own fixtures (int4_bundle, ov_int4_bundle, mlx_int4_bundle, ...) build."""
    target = BACKENDS[backend].home_target
    default = load_target(TARGETS_DIR / f"{target}.yaml", set(BACKENDS)).backend
    return target, (None if default == backend else backend)


class Unbuildable(Exception):
    """The honest bundle cannot be built here (phikit build exit 2): nothing to plant into."""


_UNBUILDABLE: dict[Path, str] = {}  # one failed build per session, not one per test


def build_family_bundle(dist: Path, family: str, precision: str, target: str,
                        backend: str | None) -> Path:
    """build_bundle for recipes/{family}-{precision}.yaml. A build whose validation fails is
    published as OUT.failed: that one is returned, so its honest row shows the false alarm."""
    out = dist / f"{family}-{precision}-{target}-{backend or 'default'}"
    failed = out.with_name(out.name + ".failed")
    if out in _UNBUILDABLE:
        raise Unbuildable(_UNBUILDABLE[out])
    if not (out / "manifest.json").exists() and not (failed / "manifest.json").exists():
        if not (REPO / "models" / family / "model.safetensors").is_file():
            pytest.skip(f"models/{family} is not there (fixtures/make_tiny_phi3.py --member "
                        f"{family})")
        extra = ("--backend", backend) if backend else ()
        proc = phikit("build", f"recipes/{family}-{precision}.yaml", "--target", target,
                      "--out", out, *extra, timeout=1800)
        if proc.returncode == 2:
            errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
            _UNBUILDABLE[out] = (f"phikit build {family}-{precision} --target {target}: exit 2, "
                                 + (errors[-1] if errors else proc.stderr.strip()[-300:]))
            raise Unbuildable(_UNBUILDABLE[out])
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


# --- the detection table ------------------------------------------------------------------------


@dataclass
class DetectionTable:
    """Cells recorded by the tests: rows (a defect, or an honest bundle) x backends."""

    columns: tuple[str, ...] = tuple(BACKENDS)  # every registered backend
    cells: dict[tuple[str, str], str] = field(default_factory=dict)
    rows: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    path: Path | None = None

    def record(self, row: str, column: str, cell: str, note: str | None = None) -> None:
        if row not in self.rows:
            self.rows.append(row)
        if note:
            self.notes.append(note)
            cell += f" [{len(self.notes)}]"
        self.cells[(row, column)] = cell

    def markdown(self) -> str:
        def cell(text: str) -> str:
            return text.replace("|", "\\|")  # <|end|> inside a table cell

        lines = ["| | " + " | ".join(self.columns) + " |",
                 "|---|" + "---|" * len(self.columns)]
        for row in sorted(self.rows, key=lambda r: r.startswith("honest")):  # defects first
            lines.append(f"| {cell(row)} | " + " | ".join(cell(self.cells.get((row, c), ""))
                                                        for c in self.columns) + " |")
        lines += [""] + [f"[{i}] {n}" for i, n in enumerate(self.notes, 1)]
        return "\n".join(lines) + "\n"

    @property
    def bad(self) -> list[str]:
        return [f"{r} / {c}: {v}" for (r, c), v in self.cells.items()
                if v.startswith(("MISSED", "FALSE ALARM", "ERROR"))]


TABLE = DetectionTable()


@pytest.fixture(scope="session")
def table(tmp_path_factory) -> DetectionTable:
    TABLE.path = tmp_path_factory.getbasetemp() / "defects.md"
    return TABLE


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not TABLE.cells:
        return
    text = TABLE.markdown()
    if TABLE.path is not None:
        TABLE.path.write_text(text, encoding="utf-8")
    tr = terminalreporter
    tr.section("validator defect detection (tests/defects)")
    tr.write(text)
    if TABLE.path is not None:
        tr.write_line(f"written to {TABLE.path}")
    for line in TABLE.bad:
        tr.write_line(f"NOT OK: {line}", red=True)
