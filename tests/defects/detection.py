"""The defect x backend table the defect suite prints at the end of a session.

A test records its cell on its own report (`user_properties`), and this plugin (tests/conftest.py
loads it) collects the cells from the reports: with pytest-xdist the tests run in worker processes
and only the reports reach the process that prints the summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from toolkit.backends import BACKENDS

CELL = "defect-table-cell"


@dataclass
class DetectionTable:
    """Cells recorded by the tests: rows (a defect, or an honest bundle) x backends."""

    columns: tuple[str, ...] = tuple(BACKENDS)  # every registered backend
    cells: dict[tuple[str, str], str] = field(default_factory=dict)
    rows: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

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


class Recorder:
    """What a test is handed: its cell goes onto its own report."""

    def __init__(self, node):
        self.node = node

    def record(self, row: str, column: str, cell: str, note: str | None = None) -> None:
        self.node.user_properties.append((CELL, (row, column, cell, note)))


TABLE = DetectionTable()


def pytest_runtest_logreport(report):
    if report.when == "call":
        for name, value in report.user_properties:
            if name == CELL:
                TABLE.record(*value)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not TABLE.cells:
        return
    text = TABLE.markdown()
    tr = terminalreporter
    tr.section("validator defect detection (tests/defects)")
    tr.write(text)
    factory = getattr(config, "_tmp_path_factory", None)  # pytest's, for the base temp dir
    if factory is not None:
        path: Path = factory.getbasetemp() / "defects.md"
        path.write_text(text, encoding="utf-8")
        tr.write_line(f"written to {path}")
    for line in TABLE.bad:
        tr.write_line(f"NOT OK: {line}", red=True)
