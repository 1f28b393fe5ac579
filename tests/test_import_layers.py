"""fastmq's Python modules import each other without cycles.

Every ``import`` and ``from ... import`` in src/fastmq -- at the top of a
module or deferred inside a function, which is how cycles usually hide -- is
an edge from the importing module to the fastmq module it names. The graph
must be acyclic, so the layers stay layers: neutral constants
(``_contract``) at the bottom, the backends above them, the policy
(``acks``) above the backends, the API (``queue``) on top. Imports of the
package root ``fastmq`` itself (its ``__init__`` re-exports the API) are not
edges: every submodule runs it first whatever it imports.

A module found by name at run time is not an edge either, so those lookups
are confined to the two registries that pick a backend
(``_backend._MODULES``: the rings) and a location (``_location._LOCATIONS``:
Redis), which name modules that sit above them.
"""
from __future__ import annotations

import ast
import os

import pytest

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
ROOT = "fastmq"


def _modules():
    """{dotted name: path} of every .py module and package under src/fastmq."""
    out = {}
    base = os.path.join(SRC, ROOT)
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
        rel = os.path.relpath(dirpath, SRC).replace(os.sep, ".")
        for f in filenames:
            if not f.endswith(".py"):
                continue
            name = rel if f == "__init__.py" else f"{rel}.{f[:-3]}"
            out[name] = os.path.join(dirpath, f)
    return out


def _imports(name, path, known):
    """The fastmq modules that module ``name`` imports (anywhere in it)."""
    is_package = path.endswith("__init__.py")
    package = name if is_package else name.rpartition(".")[0]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = set()

    def add(target):
        # The deepest known module that the dotted name starts with.
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != ROOT and target != name:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == ROOT or alias.name.startswith(ROOT + "."):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - (node.level - 1)])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
                if not (module == ROOT or module.startswith(ROOT + ".")):
                    continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                add(sub if sub in known else module)
    return found


def _graph():
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walker_sees_top_level_and_deferred_imports():
    graph = _graph()
    assert "fastmq.acks" in graph["fastmq.queue"]                 # top level
    assert "fastmq._contract" in graph["fastmq._pure.ring"]       # from .. import x
    assert "fastmq._pure.leases" in graph["fastmq._pure.ring"]    # from . import x
    assert "fastmq._core" not in graph                            # compiled: not a .py
    # deferred (inside a function) imports count: cli.cmd_bench imports bench.
    assert "fastmq.bench" in graph["fastmq.cli"]


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_fastmq():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (each list imports itself round): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_modules_are_looked_up_by_name_only_in_the_two_registries():
    users = set()
    for name, path in _modules().items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "import_module" or \
                    isinstance(node, ast.Name) and node.id == "__import__":
                users.add(name)
    assert users <= {"fastmq._backend", "fastmq._location"}, users


@pytest.mark.parametrize("low, high", [
    ("fastmq._contract", "fastmq"),            # the neutral module imports nothing of ours
    ("fastmq._pure.leases", "fastmq._pure.ring"),
    ("fastmq._pure.consumer", "fastmq._pure.ring"),
    ("fastmq.acks", "fastmq.queue"),
    ("fastmq._pure.ring", "fastmq.acks"),
])
def test_a_lower_layer_does_not_import_a_higher_one(low, high):
    graph = _graph()
    seen, todo = set(), [low]
    while todo:                                 # everything low reaches
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    if high == "fastmq":
        assert not seen, f"{low} imports {sorted(seen)}"
    else:
        assert high not in seen, f"{low} reaches {high}"
