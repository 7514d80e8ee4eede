"""Layering: bench/ has no import cycle. Every import counts, module-level or inside a
function (a function-level import hiding a cycle is still a cycle); the graph is built from
the source with ``ast``, so nothing is imported to check it."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph(package: str = "bench") -> dict[str, set[str]]:
    """{module: bench modules it imports}. ``from a.b import c`` names the module a.b.c when
    that is a module, else a.b. Importing a submodule also runs its parent packages'
    ``__init__``; those implicit edges are not counted (a package's ``__init__`` that imports its
    own submodules would otherwise always look cyclic) — only the modules named in the code."""
    files = {module_name(p): p for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            deps.update(n for n in names if n in files and n != mod)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                c = visit(d)
                if c:
                    return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            c = visit(m)
            if c:
                return c
    return None


def test_bench_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_function_level_imports(tmp_path):
    """The checker must be able to fail: a cycle through an import inside a function."""
    g = {"bench.a": {"bench.b"}, "bench.b": {"bench.c"}, "bench.c": {"bench.a"}}
    assert find_cycle(g) == ["bench.a", "bench.b", "bench.c", "bench.a"]
    graph = import_graph()
    # bench.runner imports bench.train only inside execute(): the edge must be in the graph
    assert "bench.train" in graph["bench.runner"]
    assert "bench.slurm.submit" in graph["bench.slurm"]  # `from bench.slurm.submit import …`
