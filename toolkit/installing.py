"""What a pip-only install needs to know, printable without phikit's dependencies (stdlib only):

    python -m toolkit.installing constraints   # the path of the constraints phikit ships
    python -m toolkit.installing report        # the requirements of the `report` extra

so that a CI job can `pip install --no-deps phikit` and then exactly what one command needs, with
the versions phikit verified (toolkit/data/constraints.txt; pyproject.toml's extras, read from the
installed package's own metadata)."""

from __future__ import annotations

import re
import shlex
import sys
from importlib import metadata

from .paths import CONSTRAINTS


def pip_install_hint(spec: str) -> str:
    """A pip command that pastes into a shell and works here: the constraints by absolute path."""
    # double quotes keep a shell from globbing the extra's brackets, as the README writes it
    return f'pip install -c {shlex.quote(str(CONSTRAINTS))} "{spec}"'


def pip_error(output: str, fallback: str) -> str:
    """The first ERROR line of pip's output (what a one-line message quotes), else `fallback`."""
    return next((line.strip() for line in output.splitlines()
                 if line.strip().startswith("ERROR")), fallback)


def extra_requirements(extra: str, dist: str = "phikit") -> list[str]:
    """The requirements the installed `dist` declares for `extra`, without the marker."""
    out = []
    for req in metadata.requires(dist) or []:
        spec, _, marker = req.partition(";")
        if re.search(rf"""extra\s*==\s*["']{re.escape(extra)}["']""", marker):
            rest = re.sub(rf"""(and\s+)?extra\s*==\s*["']{re.escape(extra)}["'](\s+and)?""", "",
                          marker).strip()
            out.append(f"{spec.strip()}; {rest}" if rest else spec.strip())
    return out


def main(argv: list[str]) -> int:
    if argv == ["constraints"]:
        print(CONSTRAINTS)
        return 0
    if len(argv) == 1 and argv[0] not in ("-h", "--help"):
        reqs = extra_requirements(argv[0])
        if not reqs:
            print(f"phikit has no extra {argv[0]!r} (or declares nothing for it)", file=sys.stderr)
            return 2
        print("\n".join(reqs))
        return 0
    print("usage: python -m toolkit.installing constraints | EXTRA", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
