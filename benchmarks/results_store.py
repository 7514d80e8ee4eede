"""The results store at scale: N run records (copies of a small suite's records, each with its
own run id and seed, content hashes rewritten), then the time of the tables, the plot and
`tdbench status`, cold (no index yet) and warm (index up to date), in this process, plus the
wall time of the whole `tdbench leaderboard` / `tdbench status` / `tdbench report` commands
(python start-up and imports included), best and median of --repeat runs of each, and the size of
report.html:

- first: no index.json and no plots yet (the first leaderboard of a directory);
- cold:  no index.json, the plots of the previous call present (index deleted by hand);
- warm:  index.json and plots up to date (the next leaderboard after `tdbench run`).

    python benchmarks/results_store.py [--n 10000] [--dir /tmp/store10k] [--repeat 5]
        [--code DIR ...]   # time the commands of other checkouts too (e.g. the previous version), interleaved

It first runs a tiny 2-run suite (debug executor, a few seconds) for the records to copy
(skipped when --dir already holds N records).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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


def in_process(d: Path) -> None:
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


def command(code: Path, args: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall s, CPU s of the child, result) of `python -m bench.cli ARGS` with ``code`` first on the path."""
    before = os.times()
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True, cwd=code,
                       env={**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    after = os.times()
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system), r


def whole_commands(d: Path, codes: list[Path], repeat: int) -> None:
    """`tdbench leaderboard DIR` first / cold / warm and `tdbench status DIR` warm, per checkout,
    the checkouts interleaved in every repetition (a shared machine's load hits them alike)."""
    times: dict = {}
    for _ in range(repeat):
        for code in codes:
            for state in ("first", "cold", "warm"):
                for f in (["index.json"] if state == "cold" else ["index.json", "training.png", "learning.png"]
                          if state == "first" else []):
                    (d / f).unlink(missing_ok=True)
                wall, cpu, r = command(code, ["leaderboard", str(d), "--format", "csv"])
                assert r.returncode == 0, r.stderr[-2000:]
                times.setdefault((str(code), f"leaderboard, {state}"), []).append((wall, cpu))
            wall, cpu, r = command(code, ["status", str(d)])
            times.setdefault((str(code), "status, warm"), []).append((wall, cpu))
            if (Path(code) / "bench" / "report.py").is_file():
                wall, cpu, r = command(code, ["report", str(d)])
                assert r.returncode == 0, r.stderr[-2000:]
                times.setdefault((str(code), "report, warm"), []).append((wall, cpu))
    for (code, what), ts in times.items():
        w = sorted(t[0] for t in ts)
        c = sorted(t[1] for t in ts)
        print(f"{code}: `tdbench {what}`: wall best {w[0]:.2f} s, median {statistics.median(w):.2f} s; "
              f"CPU best {c[0]:.2f} s, median {statistics.median(c):.2f} s ({len(ts)} runs)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "tdbench-store"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--code", nargs="*", default=[], help="other checkouts whose commands to time as well")
    a = ap.parse_args()
    d = Path(a.dir)
    have = len(list((d / "runs").glob("*/result.json"))) if (d / "runs").is_dir() else 0
    if have != a.n:
        t, _ = timed(lambda: make(a.n, d))
        print(f"made {a.n} records in {d} ({t:.1f} s)")
    in_process(d)
    whole_commands(d, [ROOT, *map(Path, a.code)], a.repeat)
    if (d / "report.html").is_file():
        print(f"report.html: {(d / 'report.html').stat().st_size / 1e6:.2f} MB")
    print(json.dumps({"n": a.n, "cpus": os.cpu_count(), "load": os.getloadavg()}))


if __name__ == "__main__":
    main()
