"""Where the CPU time of a cold smoke run goes: `tdbench run suites/smoke.yaml` in one process
(the debug executor: the runs one after the other, one torch thread) under cProfile with a
CPU-time clock, then the cumulative CPU seconds of each phase's function. CPU time rather than
wall time, so that other jobs on a shared machine inflate it less (they still do, through
shared caches and SMT siblings); cProfile's own overhead inflates Python-heavy phases (imports,
plotting, tokenizer glue) more than torch-heavy ones (training). With the local executor the two
runs train side by side, so on 2 idle cores the wall time is about the slower run's share plus
the serial phases.

    TDBENCH_CACHE=$(mktemp -d) python benchmarks/smoke_profile.py /tmp/smoke-profile   # cold cache
"""
from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# (label, path suffix of the file, function name); nested phases are indented
PHASES = [
    ("runs (build, train, evaluate, sample, record)", "bench/runner.py", "_execute"),
    ("  data: tokenizer and blocks", "bench/data/__init__.py", "load_blocks"),
    ("  training (both runs)", "bench/train.py", "train"),
    ("    optimizer construction (first use imports torch._dynamo)", "bench/train.py", "build"),
    ("    checkpoints", "bench/train.py", "checkpoint"),
    ("  evaluation (3 datasets per run)", "bench/runner.py", "evaluate_all"),
    ("  sampling (samples.jsonl)", "bench/runner.py", "write_samples"),
    ("sample metrics (score_suite_dir)", "bench/cli/outdir.py", "score_suite_dir"),
    ("  MAUVE featurizer load", "bench/metrics/mauve.py", "__init__"),
    ("  MAUVE", "bench/metrics/mauve.py", "mauve_score"),
    ("  memorization index", "bench/metrics/ngrams.py", "build_index"),
    ("  gen ppl", "bench/metrics/genppl.py", "gen_ppl"),
    ("tables and plots (leaderboard.write)", "bench/leaderboard.py", "write"),
    ("  frontier.png", "bench/plots.py", "frontier"),
    ("  training.png", "bench/plots.py", "training_curves"),
]


def main() -> int:
    from bench.cli import main as cli

    out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/smoke-profile"
    torch.set_num_threads(1)
    pr = cProfile.Profile(time.process_time)
    t0, c0 = time.time(), time.process_time()
    pr.enable()
    rc = cli(["run", "suites/smoke.yaml", "--out", out, "--executor", "debug"])
    pr.disable()
    wall, cpu = time.time() - t0, time.process_time() - c0
    stats = pstats.Stats(pr).stats
    print(f"\nexit code {rc}; wall {wall:.1f} s, CPU {cpu:.1f} s (one process, one torch thread)")
    print("| phase | CPU s | share |\n|---|---|---|")
    for label, path, fn in PHASES:
        ct = sum(v[3] for (f, _, n), v in stats.items() if n == fn and f.endswith(path))
        print(f"| {label} | {ct:.1f} | {ct / cpu:.1%} |")
    return rc


if __name__ == "__main__":
    sys.exit(main())
