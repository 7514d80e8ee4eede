"""The ``tdbench`` command line. Bad input: one line on stderr, exit code 2, nothing written."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench.errors import UserError


def _out_dir(args, suite) -> Path:
    return Path(args.out) if args.out else Path("runs") / suite.name


def cmd_run(args) -> int:
    from bench import leaderboard
    from bench.config import load_suite
    from bench.launch import run_suite

    suite, specs = load_suite(args.suite)  # validates everything before anything is written
    executor = args.executor or suite.launch.executor
    out = _out_dir(args, suite)
    t0 = time.time()
    status = run_suite(suite, specs, out, executor)
    text, problems = leaderboard.write(out, "md")
    print(text)
    failed = [k for k, v in status.items() if v != "complete"]
    print(f"{len(status) - len(failed)}/{len(status)} runs complete in {time.time() - t0:.1f} s; "
          f"leaderboard: {out / 'leaderboard.md'}, {out / 'leaderboard.csv'}", file=sys.stderr)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if failed else (2 if problems else 0)


def cmd_leaderboard(args) -> int:
    from bench import leaderboard

    out = Path(args.dir)
    if not (out / "runs").is_dir():
        raise UserError(f"{out}: not a tdbench output directory (no runs/ inside)")
    text, problems = leaderboard.write(out, args.format)
    print(text, end="" if text.endswith("\n") else "\n")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 2 if problems else 0


def cmd_status(args) -> int:
    from bench.records import read_record, record_status

    out = Path(args.dir)
    if not (out / "runs").is_dir():
        raise UserError(f"{out}: not a tdbench output directory (no runs/ inside)")
    counts: dict[str, int] = {}
    for rd in sorted((out / "runs").iterdir()):
        if not rd.is_dir():
            continue
        st = record_status(rd)
        counts[st] = counts.get(st, 0) + 1
        extra = ""
        if st in ("complete", "failed", "running"):
            r = read_record(rd / "result.json")
            extra = f"{r.get('label')} {r.get('size')} seed={r.get('seed')}"
            if st == "failed":
                extra += f"  error: {r.get('error')}"
        print(f"{st:9s} {rd.name}  {extra}")
    print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no runs")
    return 0


def cmd_methods(args) -> int:
    from bench.registry import BROKEN, all_methods

    for mod, err in BROKEN.items():
        print(f"error: plugin {mod} failed to import: {err}", file=sys.stderr)
    for name, cls in all_methods().items():
        print(f"{name}  ({cls.default_label(cls.Params())}; {cls.likelihood} likelihood, "
              f"{cls.time} time; supports: {', '.join(cls.supports())})")
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        if doc:
            print(f"    {doc[0]}")
        if cls.variants:
            print("    variants: " + "; ".join(f"{k} = {v}" for k, v in cls.variants.items()))
        for fname, f in cls.Params.model_fields.items():
            ann = getattr(f.annotation, "__name__", str(f.annotation)).replace("typing.", "")
            desc = f"  # {f.description}" if f.description else ""
            print(f"    {fname}: {ann} = {f.default!r}{desc}")
    return 2 if BROKEN else 0


TEMPLATE = '''"""{title}: one-line summary of the method (cite the paper and equation numbers).

Write the forward process, the loss and the bound here with the paper's symbols.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.method import Method, Params
from bench.registry import register


class {cls}Params(Params):
    example: float = 1.0  # every parameter has a default; unknown keys are YAML errors


@register("{name}")
class {cls}(Method):
    Params = {cls}Params
    likelihood = "bound"       # "exact" | "bound" | "none"
    time = "continuous"        # "continuous" | "discrete" | "none"

    def nll(self, x0, counted, u):
        """Per-sequence NLL upper bound (nats) for one time draw u per sequence."""
        raise NotImplementedError("write the bound of {name}")

    @torch.no_grad()
    def sample(self, n, steps=64, generator=None):
        raise NotImplementedError("write the sampler of {name}")
'''


def cmd_new_method(args) -> int:
    import re

    name = args.name
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise UserError(f"new-method NAME: '{name}' must be lowercase letters, digits, underscores")
    from bench.registry import all_methods
    if name in all_methods():
        raise UserError(f"new-method NAME: '{name}' is already registered")
    path = Path(args.dir) / f"{name}.py"
    if path.exists():
        raise UserError(f"{path}: already exists")
    cls = "".join(p.capitalize() for p in name.split("_"))
    from bench.records import atomic_write_text
    atomic_write_text(path, TEMPLATE.format(name=name, cls=cls, title=cls))
    print(f"wrote {path}: fill in nll() and sample(); `tdbench methods` lists it once it imports")
    return 0


def cmd_submit(args) -> int:
    raise UserError("submit: the Slurm launcher is not available in this version "
                    "(use --executor local or debug)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tdbench", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run every incomplete run of a suite, then write the leaderboard")
    r.add_argument("suite")
    r.add_argument("--out", help="output dir (default runs/<suite name>)")
    r.add_argument("--executor", choices=["local", "debug", "slurm"])
    r.add_argument("--cluster", help="slurm cluster profile (name in slurm/ or a path)")
    r.set_defaults(fn=cmd_run)
    s = sub.add_parser("submit", help="queue a suite's incomplete runs on Slurm and return")
    s.add_argument("suite")
    s.add_argument("--cluster", required=True)
    s.add_argument("--out")
    s.set_defaults(fn=cmd_submit)
    st = sub.add_parser("status", help="state of each run in an output dir")
    st.add_argument("dir")
    st.set_defaults(fn=cmd_status)
    lb = sub.add_parser("leaderboard", help="(re)generate the leaderboard of an output dir")
    lb.add_argument("dir")
    lb.add_argument("--format", choices=["csv", "md", "json", "latex"], default="md")
    lb.set_defaults(fn=cmd_leaderboard)
    m = sub.add_parser("methods", help="list registered methods, parameters and metrics")
    m.set_defaults(fn=cmd_methods)
    n = sub.add_parser("new-method", help="write a method plugin skeleton")
    n.add_argument("name")
    n.add_argument("--dir", default="methods")
    n.set_defaults(fn=cmd_new_method)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "executor", None) == "slurm" or getattr(args, "cluster", None):
        if args.cmd == "run":
            return _fail("--executor slurm: the Slurm launcher is not available in this version")
    try:
        return args.fn(args)
    except UserError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
