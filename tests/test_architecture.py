"""The shape the code keeps (issue 16): a backend's facts live on its class, so no other module
names a backend; no import cycles; modules small enough to read in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

from toolkit.backends import BACKENDS

TOOLKIT = Path(__file__).resolve().parent.parent / "toolkit"
BACKEND_HOMES = (TOOLKIT / "backends", TOOLKIT / "runner")  # where backend names belong
MAX_LINES = 500


def modules() -> dict[str, Path]:
    out = {}
    for path in TOOLKIT.rglob("*.py"):
        name = ".".join(path.relative_to(TOOLKIT.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def test_no_backend_name_outside_the_backends():
    names = set(BACKENDS)
    leaks = []
    for path in modules().values():
        if any(home in path.parents for home in BACKEND_HOMES):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            # a backend compared, looked up or listed by name: `== "qnn"`, `{"mlx": ...}`
            if isinstance(node, ast.Constant) and node.value in names:
                leaks.append(f"{path.relative_to(TOOLKIT.parent)}:{node.lineno}: {node.value!r}")
    assert not leaks, "backend names outside toolkit/backends and toolkit/runner (make them " \
                      "hooks on the backend's class):\n" + "\n".join(leaks)


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                for alias in node.names:
                    target = next((c for c in (f"{base}.{alias.name}", base) if c in mods), None)
                    if target and target != mod:
                        edges[mod].add(target)
            elif isinstance(node, ast.Import):
                edges[mod] |= {a.name for a in node.names if a.name in mods and a.name != mod}
    return edges


def test_no_import_cycles():
    """Module- and function-level imports alike (a lazy import still couples two modules). A
    package importing its own sub-modules is not a cycle."""
    edges, state, cycles = import_graph(), {}, []

    def visit(mod: str, stack: list[str]) -> None:
        state[mod] = "open"
        stack.append(mod)
        for nxt in sorted(edges[mod]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                if not all(c == nxt or c.startswith(nxt + ".") for c in cycle):
                    cycles.append(" -> ".join(cycle))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[mod] = "done"

    for mod in sorted(edges):
        if mod not in state:
            visit(mod, [])
    assert not cycles, "\n".join(cycles)


def test_modules_stay_readable():
    long = {str(p.relative_to(TOOLKIT.parent)): n for p in modules().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
