"""The ``tdbench`` command line. Bad input: one line on stderr, exit code 2, nothing written.

Each module adds its own commands to the parser (``register``) and handles them:
``run`` (run, submit, status, cancel, logs), ``results`` (leaderboard, score, sample,
experiment), ``lmeval`` (lm-eval), ``data`` (data prepare|list), ``methods`` (methods,
new-method) and ``tools`` (speed). Heavy libraries (torch, pandas) are imported only by the
command that needs them, so that ``tdbench --help`` and a bad argument answer at once; and a command named on the
command line registers only its own module (``GROUPS``), so that e.g. ``tdbench leaderboard``
never imports pydantic, the suite schema or the data registry (a fifth of its start-up).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from bench.errors import UserError

MODULES = ("run", "results", "lmeval", "data", "methods", "tools")   # --help lists them by group, in this order
# the module that registers each command (tests/test_results_store.py checks it against the parser);
# a command missing here still works: every module is then registered
GROUPS = {**dict.fromkeys(("run", "submit", "status", "cancel", "logs"), "run"),
          **dict.fromkeys(("leaderboard", "report", "sample", "score", "experiment"), "results"),
          "lm-eval": "lmeval", "data": "data", "methods": "methods", "new-method": "methods", "speed": "tools",
          "rehearse": "tools"}


def parser(argv=None) -> argparse.ArgumentParser:
    """The command-line parser: every command, or only the group of the command ``argv`` names."""
    p = argparse.ArgumentParser(prog="tdbench", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = p.add_subparsers(dest="cmd", required=True)
    first = argv[0] if argv else None
    for name in ([GROUPS[first]] if first in GROUPS else MODULES):
        importlib.import_module(f"bench.cli.{name}").register(sub)
    return p


def one_line(msg: str, limit: int = 2000) -> str:
    """A message as the one line the CLI promises: line breaks shown as ``\\n``, bounded length."""
    msg = msg.replace("\r", "\\r").replace("\n", "\\n")
    return msg if len(msg) <= limit else msg[:limit - 1] + "…"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser(argv).parse_args(argv)
    try:
        for k in ("max_running", "tail", "num_proc", "seq_len", "threads"):
            if getattr(args, k, None) is not None and getattr(args, k) < 1:
                raise UserError(f"--{k.replace('_', '-')}: must be a positive integer")
        return args.fn(args)
    except UserError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tdbench status DIR | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
