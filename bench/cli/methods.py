"""Methods: ``tdbench methods`` (the registered ones) and ``new-method`` (a plugin skeleton).

The skeletons are ``str.format`` templates in bench/cli/templates/ (literal braces doubled):
``method.py.tmpl`` (discrete: fill in nll and sample) and ``continuous.py.tmpl`` (a working
Gaussian-embedding method), each with a ``{stages}`` block that is ``one_stage.tmpl`` or, for
``--stages A,B``, ``stages.tmpl``.
"""
from __future__ import annotations

import re
import sys
from importlib.resources import files
from pathlib import Path
from typing import Literal, Union, get_args, get_origin

from bench import registry
from bench.errors import UserError
from bench.records import atomic_write_text

LOWER_NAME = r"[a-z][a-z0-9_]*"


def _annotation(a) -> str:
    """A parameter's type for humans: ``absorb|uniform``, ``float?`` (optional), ``int``."""
    if get_origin(a) is Literal:
        return "|".join(map(str, get_args(a)))
    if get_origin(a) is Union:
        return " or ".join(_annotation(x) for x in get_args(a) if x is not type(None)) + "?"
    return getattr(a, "__name__", str(a)).replace("typing.", "")


def cmd_methods(args) -> int:
    methods = registry.all_methods()  # imports the plugins: only then does BROKEN name those that failed
    for mod, err in registry.BROKEN.items():
        print(f"error: plugin {mod} failed to import: {err}", file=sys.stderr)
    for name, cls in methods.items():
        print(f"{name}  ({cls.default_label(cls.Params())}; {cls.likelihood} likelihood, "
              f"{cls.time} time; supports: {', '.join(cls.supports())})")
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        if doc:
            print(f"    {doc[0]}")
        if cls.variants:
            print("    variants: " + "; ".join(f"{k} = {v}" for k, v in cls.variants.items()))
        if len(cls.stages) > 1:
            print("    stages (trained in order; suite train.stages.<stage> sets steps, lr, ...): " + " → ".join(
                st + (" (" + ", ".join(f"{k}={v}" for k, v in cls.stage_defaults[st].items()) + ")"
                      if cls.stage_defaults.get(st) else "") for st in cls.stages))
        for fname, f in cls.Params.model_fields.items():
            ann = _annotation(f.annotation)
            desc = f"  # {f.description}" if f.description else ""
            print(f"    {fname}: {ann} = {f.default!r}{desc}")
    return 2 if registry.BROKEN else 0


def _template(name: str) -> str:
    return (files("bench.cli") / "templates" / name).read_text(encoding="utf-8")


def _stages(text: str | None) -> tuple[str, ...]:
    """``--stages A,B``: two or more distinct stage names, in training order (none: one stage)."""
    stages = tuple(x.strip() for x in (text or "").split(",") if x.strip())
    if text is not None and (len(stages) < 2 or len(set(stages)) < len(stages)
                             or not all(re.fullmatch(LOWER_NAME, x) for x in stages)):
        raise UserError(f"new-method --stages: '{text}' must name two or more distinct stages "
                        "(lowercase letters, digits, underscores), comma-separated")
    return stages


def cmd_new_method(args) -> int:
    name = args.name
    if not re.fullmatch(LOWER_NAME, name):
        raise UserError(f"new-method NAME: '{name}' must be lowercase letters, digits, underscores")
    if name in registry.all_methods():
        raise UserError(f"new-method NAME: '{name}' is already registered")
    path = Path(args.dir) / f"{name}.py"
    if path.exists():
        raise UserError(f"{path}: already exists")
    cls = "".join(p.capitalize() for p in name.split("_"))
    stages = _stages(args.stages)
    if stages and args.family == "continuous":
        raise UserError("new-method --stages: only with --family discrete (the continuous skeleton is one stage)")
    block = (_template("stages.tmpl").format(stages=stages, defaults={st: {} for st in stages}, name=name)
             if stages else _template("one_stage.tmpl"))
    template = _template("continuous.py.tmpl" if args.family == "continuous" else "method.py.tmpl")
    atomic_write_text(path, template.format(name=name, cls=cls, title=cls, stages=block))
    what = "a working Gaussian-embedding skeleton: change its math" if args.family == "continuous" else \
        "fill in nll() and sample()"
    print(f"wrote {path}: {what}; `tdbench methods` lists it once it imports")
    return 0


def register(sub) -> None:
    m = sub.add_parser("methods", help="list registered methods, parameters and metrics")
    m.set_defaults(fn=cmd_methods)
    n = sub.add_parser("new-method", help="write a method plugin skeleton")
    n.add_argument("name")
    n.add_argument("--dir", default="methods")
    n.add_argument("--family", choices=["discrete", "continuous"], default="discrete",
                   help="skeleton: discrete (fill in nll/sample) or continuous (a working Gaussian-embedding "
                        "method on methods/_gaussian.py)")
    n.add_argument("--stages", default=None, metavar="A,B",
                   help="a multi-stage skeleton: its training stages in order, e.g. autoencoder,diffusion")
    n.set_defaults(fn=cmd_new_method)
