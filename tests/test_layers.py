"""The package's import graph: no circle between modules, and no import up the floors.

Every ``import`` of every module under ``softmask/`` is read with :mod:`ast`, at module level and inside
functions alike (a lazy import is still a dependency). Floors, lowest first (a module may import its own
floor and those below it): the reference; the kernels; the ops; the modules over the ops and the top-level API
(``softmask``, which re-exports the ops and those modules); the data; the model; a run on
disk (``softmask.runs``); evaluation; training. ``python -m tests.test_layers`` prints the graph's floors.
"""

from __future__ import annotations

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "softmask")

FLOORS = [  # (floor, module prefixes), lowest first
    (0, ("softmask.reference",)),
    (1, ("softmask.kernels",)),
    (2, ("softmask.ops",)),
    # the modules over the ops, and "softmask": the package's own __init__, the public API that re-exports them
    (3, ("softmask", "softmask.distributed", "softmask.clip", "softmask.open_clip_train", "softmask.losses")),
    (3, ("softmask.data",)),
    (4, ("softmask.model", "softmask.weights")),
    (5, ("softmask.runs",)),
    (6, ("softmask.eval",)),
    (7, ("softmask.train",)),
]


def floor_of(module: str) -> int:
    best, floor = -1, None
    for f, prefixes in FLOORS:
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, floor = len(p), f
    if floor is None:
        raise AssertionError(f"{module}: on no floor (add it to tests/test_layers.py FLOORS)")
    return floor


def modules() -> dict:
    """``{module name: file path}`` of every module of the package."""
    out = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(d, f)
    return out


def imports(path: str, name: str, known: dict) -> set:
    """The package's modules that ``path`` (module ``name``) imports, anywhere in the file."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    got = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # "from a.b import c": c is a module of its own when a.b.c is one, else a name of a.b
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        got.update(n for n in names if n == "softmask" or n.startswith("softmask."))
    got.discard(name)
    return {n for n in got if n in known}


def graph() -> dict:
    known = modules()
    return {name: imports(path, name, known) for name, path in known.items()}


def test_no_import_up_the_floors():
    bad = [f"{a} (floor {floor_of(a)}) imports {b} (floor {floor_of(b)})"
           for a, deps in graph().items() for b in deps if floor_of(b) > floor_of(a)]
    assert not bad, "\n".join(bad)


def test_no_circle():
    g = graph()
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)
    # a package's __init__ that re-exports its own submodules is not a circle unless a submodule imports it back
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


if __name__ == "__main__":
    g = graph()
    for name in sorted(g, key=lambda n: (floor_of(n), n)):
        print(f"{floor_of(name)} {name}: {', '.join(sorted(g[name])) or '-'}")
    sys.exit(0)
