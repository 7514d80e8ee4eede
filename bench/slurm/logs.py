"""submitit's per-task stdout/stderr files of a job."""
from __future__ import annotations

import re
from pathlib import Path

from bench.slurm.ledger import slurm_dir


def job_log_paths(out: Path, job_id: str) -> list[Path]:
    """submitit's stdout/stderr of every task of a job, rank 0 first."""
    folder = slurm_dir(out)
    return sorted(folder.glob(f"{job_id}_*_log.out"), key=_task_no) + \
        sorted(folder.glob(f"{job_id}_*_log.err"), key=_task_no)


def _task_no(p: Path) -> int:
    m = re.search(r"_(\d+)_log\.", p.name)
    return int(m.group(1)) if m else 0
