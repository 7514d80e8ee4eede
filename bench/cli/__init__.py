"""The ``tdbench`` command line. Bad input: one line on stderr, exit code 2, nothing written.

Each module adds its own commands to the parser (``register``) and handles them:
``run`` (run, submit, status, cancel, logs), ``results`` (leaderboard, score, sample,
experiment), ``data`` (data prepare|list), ``methods`` (methods, new-method) and ``tools``
(speed). Heavy libraries (torch, pandas) are imported only by the command that needs them,
so that ``tdbench --help`` and a bad argument answer at once.
"""
from __future__ import annotations

import argparse
import os
import sys

from bench.cli import data, methods, results, run, tools
from bench.errors import UserError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tdbench", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = p.add_subparsers(dest="cmd", required=True)
    for module in (run, results, data, methods, tools):   # --help lists them by group, in this order
        module.register(sub)
    return p


def one_line(msg: str, limit: int = 2000) -> str:
    """A message as the one line the CLI promises: line breaks shown as ``\\n``, bounded length."""
    msg = msg.replace("\r", "\\r").replace("\n", "\\n")
    return msg if len(msg) <= limit else msg[:limit - 1] + "…"


def main(argv=None) -> int:
    args = parser().parse_args(argv)
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
