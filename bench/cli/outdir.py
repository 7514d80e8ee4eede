"""Output directories as the commands meet them: where a suite writes, checking that a
directory is one, and scoring every run in one (commands of both ``run`` and ``results``)."""
from __future__ import annotations

import sys
from pathlib import Path

from bench.errors import UserError
from bench.records import write_json


def out_dir(args, suite) -> Path:
    """``--out``, else runs/<suite name>."""
    return Path(args.out) if args.out else Path("runs") / suite.name


def need_out(d: str) -> Path:
    out = Path(d)
    if not (out / "runs").is_dir():
        raise UserError(f"{out}: not a tdbench output directory (no runs/ inside)")
    return out


def score_suite_dir(out: Path, cfg, reuse: bool = True) -> dict:
    """Score every run's samples (bench.metrics.score), recording the settings in metrics.json."""
    from bench.metrics.score import score_dir  # imports torch

    write_json(Path(out) / "metrics.json", cfg.model_dump(mode="json"))
    return score_dir(out, cfg, reuse=reuse, log=lambda m: print(m, file=sys.stderr))
