"""The method registry: methods register by name with ``@register``, and are discovered from
the in-repo ``methods`` package and from the entry-point group ``tdbench.methods`` (so a
third-party package can ship a plugin). The harness never imports ``methods`` directly; it
asks this registry.
"""
from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from bench.errors import UserError, did_you_mean

ENTRY_POINT_GROUP = "tdbench.methods"
BUILTIN_PACKAGE = "methods"

_METHODS: dict[str, type] = {}
BROKEN: dict[str, str] = {}  # plugin module -> one-line import error (reported, never fatal)
_discovered = False


def register(name: str):
    """Class decorator: ``@register("mdlm")`` on a :class:`bench.method.Method` subclass."""

    def deco(cls):
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method '{name}' registered twice ({_METHODS[name]} and {cls})")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def discover() -> None:
    """Import every module of the built-in ``methods`` package and every entry point."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    try:
        pkg = importlib.import_module(BUILTIN_PACKAGE)
    except ModuleNotFoundError:
        pkg = None
    if pkg is not None:
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                _load(f"{BUILTIN_PACKAGE}.{info.name}",
                      lambda n=info.name: importlib.import_module(f"{BUILTIN_PACKAGE}.{n}"))
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        _load(ep.value, ep.load)  # importing the module runs its @register decorators


def _load(what: str, load) -> None:
    """One broken plugin must not take the others down: its error is kept and reported."""
    try:
        load()
    except Exception as e:  # noqa: BLE001
        BROKEN[what] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def get_method(name: str) -> type:
    discover()
    if name not in _METHODS:
        broken = "".join(f"; plugin {k} failed to import ({v})" for k, v in BROKEN.items())
        raise UserError(did_you_mean(name, _METHODS) + broken)
    return _METHODS[name]


def all_methods() -> dict[str, type]:
    discover()
    return dict(sorted(_METHODS.items()))


def build_method(spec, vocab_size: int, tokenizer=None):
    """The method of run ``spec`` (a bench.config.RunSpec), built with its
    :class:`~bench.method.Context` (the suite's tokenizer): what a run trains and what its
    final weights are loaded into."""
    from bench.method import Context

    cls = get_method(spec.method)
    return cls(cls.Params(**spec.params), spec.backbone, vocab_size, spec.data.seq_len,
               context=Context(tokenizer=tokenizer))
