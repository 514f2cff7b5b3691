"""The one error type the CLI turns into a clear message and exit code 2 (never a traceback)."""

from __future__ import annotations

from pathlib import Path


class PhikitError(Exception):
    """A problem with the user's input: a file, a field, a flag. Exit code 2."""

    def __init__(self, message: str, *, file: str | Path | None = None,
                 line: int | None = None, field: str | None = None):
        self.message, self.file, self.line, self.field = message, file, line, field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        field = f"field '{self.field}': " if self.field else ""
        return f"{where}{field}{self.message}"
