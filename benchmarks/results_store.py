"""The results store at scale: N run records (copies of a small suite's records, each with its
own run id and seed, content hashes rewritten), then the time of the tables, the plot and
`tdbench status`, cold (no index yet) and warm (index up to date), in this process, plus the
wall time of the whole `tdbench leaderboard` / `tdbench status` / `tdbench report` commands
(python start-up and imports included) and the size of report.html.

    python benchmarks/results_store.py [--n 10000] [--dir /tmp/store10k]

It first runs a tiny 2-run suite (debug executor, a few seconds) for the records to copy.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SUITE = """name: store
data: {train: {name: austen}, eval: [{name: austen}, {name: kjv}], tokenizer: {name: bpe, vocab_size: 512}, seq_len: 32}
sizes: {tiny: {layers: 1, hidden: 32, heads: 2, cond_dim: 16}}
methods: [{method: mdlm}]
train: {steps: 20, batch_size: 8, warmup: 2, ckpt_every: 20}
eval: {t_samples: 2, max_blocks: 8, batch_size: 8}
launch: {executor: debug, threads: 1}
"""


def make(n: int, d: Path) -> None:
    from bench.cli import main
    from bench.records import read_record, write_record

    src = Path(tempfile.mkdtemp())
    (src / "s.yaml").write_text(SUITE)
    assert main(["run", str(src / "s.yaml"), "--out", str(src / "out")]) == 0
    recs = [read_record(p) for p in sorted((src / "out" / "runs").glob("*/result.json"))]
    shutil.rmtree(d, ignore_errors=True)
    (d / "runs").mkdir(parents=True)
    for i in range(n):
        r = dict(recs[i % len(recs)])
        seed = i // len(recs)
        rid = f"{r['method']}-{r['size']}-s{seed}-copy{i:06d}"
        r.update(run_id=rid, seed=seed)
        write_record(d / "runs" / rid / "result.json", r)
    shutil.rmtree(src, ignore_errors=True)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "tdbench-store"))
    a = ap.parse_args()
    d = Path(a.dir)
    t, _ = timed(lambda: make(a.n, d))
    print(f"made {a.n} records in {d} ({t:.1f} s)")
    from bench import leaderboard, live
    from bench.index import INDEX, scan
    from bench.plots import training_curves

    for phase in ("cold (no index)", "warm (index up to date)"):
        if phase.startswith("cold"):
            (d / INDEX).unlink(missing_ok=True)
        t_scan, (runs, _) = timed(lambda: scan(d))
        recs = [r for r in runs.values() if r["status"] == "complete"]
        t_tab, tab = timed(lambda: leaderboard.markdown(leaderboard.tidy(recs)))
        t_plot, _ = timed(lambda: training_curves(recs, d / "training.png"))
        t_status, rows = timed(lambda: live.rows(d))
        print(f"{phase}: read records {t_scan:.2f} s; tables (tidy + markdown) {t_tab:.2f} s "
              f"-> tables in all {t_scan + t_tab:.2f} s; training.png {t_plot:.2f} s; status rows {t_status:.2f} s "
              f"({len(rows)} runs)")
    for cmd in (["leaderboard", str(d), "--format", "csv"], ["status", str(d)], ["report", str(d)]):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "bench.cli", *cmd], capture_output=True, text=True,
                           cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
        t = time.perf_counter() - t0
        print(f"`tdbench {' '.join(cmd[:1])} DIR` (whole command, warm index): {t:.2f} s, rc {r.returncode}, "
              f"{len(r.stdout.splitlines())} lines; last: {r.stdout.strip().splitlines()[-1][:100]}")
    print(f"report.html: {(d / 'report.html').stat().st_size / 1e6:.2f} MB")
    print(json.dumps({"n": a.n}))


if __name__ == "__main__":
    main()
