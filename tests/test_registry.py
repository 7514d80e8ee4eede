"""Plugins: in-repo discovery, third-party discovery through the `tdbench.methods` entry-point
group, and "did you mean" errors."""
from __future__ import annotations

import sys

import pytest

from bench import registry
from bench.errors import UserError


def test_builtin_methods_are_discovered():
    names = registry.all_methods()
    assert {"ar", "mdlm"} <= set(names)


def test_did_you_mean():
    with pytest.raises(UserError, match="did you mean 'mdlm'"):
        registry.get_method("mdl")


def install_fake_plugin(tmp_path, monkeypatch, module: str, source: str) -> None:
    """A module plus a dist-info declaring it in the `tdbench.methods` entry-point group."""
    (tmp_path / f"{module}.py").write_text(source)
    dist = tmp_path / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[tdbench.methods]\n{module} = {module}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_discovered", False)


def test_entry_point_plugin(tmp_path, monkeypatch):
    install_fake_plugin(tmp_path, monkeypatch, "toy_plugin",
                        "from bench.method import Method\nfrom bench.registry import register\n"
                        "@register('toy_ep')\nclass Toy(Method):\n    likelihood = 'none'\n")
    try:
        cls = registry.get_method("toy_ep")
        assert cls.__name__ == "Toy" and cls.supports() == []
    finally:
        registry._METHODS.pop("toy_ep", None)
        sys.modules.pop("toy_plugin", None)


def test_a_broken_plugin_is_reported_not_fatal(tmp_path, monkeypatch):
    install_fake_plugin(tmp_path, monkeypatch, "broken_plugin", "raise RuntimeError('boom')\n")
    monkeypatch.setattr(registry, "BROKEN", {})
    assert "mdlm" in registry.all_methods()
    with pytest.raises(UserError, match="plugin broken_plugin failed to import .RuntimeError: boom"):
        registry.get_method("nope")


def test_tdbench_methods_names_a_broken_plugin(tmp_path, monkeypatch, capsys):
    """Discovery happens inside `tdbench methods`: the broken plugin is named on stderr (exit 2)."""
    from bench.cli import main

    install_fake_plugin(tmp_path, monkeypatch, "broken_cli_plugin", "raise RuntimeError('boom')\n")
    monkeypatch.setattr(registry, "BROKEN", {})
    assert main(["methods"]) == 2
    out, err = capsys.readouterr()
    assert err == "error: plugin broken_cli_plugin failed to import: RuntimeError: boom\n"
    assert "mdlm  (" in out
