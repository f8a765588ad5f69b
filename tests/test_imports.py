"""The import graph: no module of the package root, ``common``, ``spec`` or ``train_heads`` is on a cycle of imports (every
import counted, those inside functions too), so the circle config -> tasks -> a task -> runfolder -> config cannot come
back; and the light modules that were on it import alone in a fresh interpreter without pulling in the others."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import fcache

SRC = Path(fcache.__file__).parent


def import_graph() -> dict[str, set[str]]:
    """Module -> the fcache modules it imports anywhere in its text (module level or inside a function)."""
    files = {}
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {}
    for name, p in files.items():
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("fcache"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else str(node.module) for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("fcache")}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = set()
                while True:
                    w = stack.pop()
                    component.add(w)
                    if w == v:
                        break
                if len(component) > 1:
                    out.append(component)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_of_the_root_common_spec_or_train_heads_is_on_an_import_cycle():
    graph = import_graph()
    assert {"fcache.train_heads.config", "fcache.train_heads.tasks", "fcache.train_heads.runfolder"} <= set(graph)
    guarded = [
        m for m in graph if m in ("fcache", "fcache._version", "fcache.spec") or m.startswith(("fcache.common", "fcache.train_heads"))
    ]
    bad = [sorted(c) for c in cycles(graph) if c & set(guarded)]
    assert not bad, f"import cycles: {bad}"


# light modules of the old circle, imported alone: what they must not pull in (the heavy ones: the graph above)
ALONE = {
    "fcache": ("fcache.apps", "fcache.spec", "fcache.train_heads"),
    "fcache.train_heads.config": ("fcache.train_heads.tasks", "fcache.train_heads.runfolder", "fcache.train_heads.defaults"),
    "fcache.common.files": ("fcache.train_heads", "fcache.spec"),
}


@pytest.mark.parametrize("module", sorted(ALONE))
def test_a_module_of_the_old_circle_imports_alone(module):
    code = f"import json, sys, {module}; print(json.dumps(sorted(m for m in sys.modules if m.startswith('fcache'))))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert module in loaded
    pulled = [m for m in loaded for avoid in ALONE[module] if m == avoid or m.startswith(avoid + ".")]
    assert not pulled, f"importing {module} imports {pulled}"
