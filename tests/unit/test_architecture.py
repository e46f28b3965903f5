"""The import rule of docs/architecture.md, read from the code's own imports (an AST walk).

Every import counts: module level, function-local and `TYPE_CHECKING` ones alike, so a cycle cannot hide
behind a late import. Stage bodies named as strings in the registry ("jobs.extract:run") are not imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("toolkit", "jobs", "analysis", "benchmarks")
# The layer order, top to bottom: a package may import only those below it (and itself). `analysis` and
# the library share a floor: analysis reads files through torch-free toolkit modules, and the library uses
# the gap arithmetic; no module cycle may cross them (checked below).
MAY_IMPORT = {
    "benchmarks": {"jobs", "toolkit", "analysis"},
    "jobs": {"toolkit", "analysis"},
    "toolkit": {"analysis"},
    "analysis": {"toolkit"},
}
SHARED_JOB_HELPERS = {"jobs.progress"}  # presentation shared by the job bodies, not a job


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import submodule` imports the submodule; `from pkg import name` the package
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
            names = subs + ([node.module] if len(subs) < len(node.names) else [])
        else:
            continue
        out |= {m for m in map(_resolve, names) if m and m != module}
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(root: str) -> None:
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles (each a set of modules importing each other): " + "; ".join(map(str, cycles))


def test_packages_import_downward_only():
    wrong = [f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps
             if d.split(".")[0] != m.split(".")[0] and d.split(".")[0] not in MAY_IMPORT[m.split(".")[0]]]
    assert not wrong, "imports against the layer order: " + ", ".join(sorted(wrong))


def test_no_job_imports_another_job():
    jobs = {m for m in MODULES if m.startswith("jobs.") and m not in SHARED_JOB_HELPERS}
    wrong = [f"{m} -> {d}" for m in jobs for d in GRAPH[m] if d in jobs]
    assert not wrong, ", ".join(sorted(wrong))
