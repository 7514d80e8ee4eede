"""Layering rules that code review would otherwise have to catch: methods/ modules never import
a private name from another plugin (shared math lives in methods/_*.py), and bench/ never
imports methods/ (plugins are found through the registry)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path):
    """(module, names, line) for every import in the file, functions' bodies included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative: from .x import y inside methods/
                mod = "methods." + mod if mod else "methods"
            yield mod, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno


def _private_attribute_uses(path: Path, plugin_aliases: dict[str, str]):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in plugin_aliases and node.attr.startswith("_"):
            yield plugin_aliases[node.value.id], node.attr, node.lineno


def violations(root: Path) -> list[str]:
    out = []
    plugins = {p.stem for p in (root / "methods").glob("*.py") if not p.stem.startswith("_")}
    for f in sorted((root / "methods").glob("*.py")):
        aliases = {}
        for mod, names, line in _imports(f):
            parts = mod.split(".")
            if parts[0] != "methods":
                continue
            if len(parts) == 1:  # from methods import d3pm [as x]
                for n in names:
                    if n in plugins and n != f.stem:
                        aliases[n] = n
                continue
            target = parts[1]
            if target in plugins and target != f.stem:
                bad = [n for n in names if n.startswith("_")]
                if bad:
                    out.append(f"{f.name}:{line}: imports private {bad} from plugin methods/{target}.py")
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "methods":
                for a in node.names:
                    if a.name in plugins and a.name != f.stem:
                        aliases[a.asname or a.name] = a.name
        for target, attr, line in _private_attribute_uses(f, aliases):
            out.append(f"{f.name}:{line}: uses private {target}.{attr}")
    return out


def test_no_plugin_imports_a_private_name_from_another_plugin():
    assert violations(REPO) == []


def test_the_check_catches_a_private_import(tmp_path):
    """The checker itself can fail: a copy of methods/ with the old d3pm → sedd._rows import."""
    (tmp_path / "methods").mkdir()
    for p in (REPO / "methods").glob("*.py"):
        (tmp_path / "methods" / p.name).write_text(p.read_text())
    d3 = tmp_path / "methods" / "d3pm.py"
    d3.write_text(d3.read_text() + "\nfrom methods.sedd import _rows  # noqa\n")
    ar = tmp_path / "methods" / "ar.py"
    ar.write_text(ar.read_text() + "\nfrom methods import mdlm as m  # noqa\nX = m._mask_m_subset  # noqa\n")
    v = violations(tmp_path)
    assert any("d3pm.py" in x and "_rows" in x for x in v), v
    assert any("ar.py" in x and "mdlm._mask_m_subset" in x for x in v), v


def test_shared_discrete_math_lives_in_one_module():
    from methods import _discrete, d3pm, sedd

    for name in ("softmax_stats", "logit_stats", "safe_log", "GRAPHS"):
        assert hasattr(_discrete, name)
    for mod in (d3pm, sedd):
        assert not hasattr(mod, "_rows") and not hasattr(mod, "_log") and not hasattr(mod, "prior_kl")


def test_bench_never_imports_methods():
    for f in sorted((REPO / "bench").rglob("*.py")):
        for mod, _, line in _imports(f):
            assert not mod.split(".")[0] == "methods", f"{f.relative_to(REPO)}:{line} imports {mod}"
