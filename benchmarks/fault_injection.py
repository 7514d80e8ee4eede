"""Fault injection: two concurrent `tdbench run` on one `--out`, killed and stalled at random.

Each cycle starts two `tdbench run` of a tiny suite (debug executor, 4 runs) on a fresh results
directory, and at random moments SIGKILLs one of them (restarted a moment later) or stops it
with SIGSTOP for longer than the lease's stale time (a Slurm suspend, an NFS hang), then
SIGCONT. When both have exited it checks:

- both commands (the last start of each) exited 0;
- every run is complete, and was completed exactly once (one "complete" line in its log);
- every result equals an undisturbed run's (param_checksums and every metric value);
- no staging directory (``.tmp_step_*``) and no lease is left behind.

A cycle with any of these wrong is lost. Prints one line per cycle and ``N cycles, K lost``;
exits 1 if K > 0. The lease times are shortened through ``TDBENCH_LEASE_STALE_S`` and
``TDBENCH_LEASE_HEARTBEAT_S`` (``--stale-s``; the heartbeat is a sixth of it).

    python benchmarks/fault_injection.py --cycles 20 --seed 1
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

SUITE = {
    "name": "faults",
    "data": {"train": {"name": "austen"}, "eval": [{"name": "austen"}],
             "tokenizer": {"name": "bpe", "vocab_size": 512}, "seq_len": 32},
    "sizes": {"tiny": {"layers": 1, "hidden": 32, "heads": 2, "cond_dim": 16}},
    "methods": [{"method": "mdlm"}],
    "baseline": "ar",
    "train": {"steps": 60, "batch_size": 8, "lr": 3e-3, "warmup": 2, "ckpt_every": 4},
    "eval": {"t_samples": 2, "max_blocks": 8, "batch_size": 8},
    "seeds": [0, 1],
    "launch": {"executor": "debug", "threads": 1},
}


def start(suite: Path, out: Path, env: dict, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.cli", "run", str(suite), "--out", str(out)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def results(out: Path) -> dict[str, dict]:
    """{run id: what must equal the undisturbed run's} of every run directory."""
    got = {}
    for rd in sorted((out / "runs").iterdir()):
        try:
            rec = json.loads((rd / "result.json").read_text())
        except (OSError, ValueError):
            got[rd.name] = {"status": "no record"}
            continue
        got[rd.name] = {"status": rec.get("status"),
                        "param_checksums": (rec.get("train") or {}).get("param_checksums"),
                        "metrics": [(m["dataset"], m["metric"], m["value"], m.get("ci_low"), m.get("ci_high"))
                                    for m in rec.get("metrics", [])]}
    return got


def problems(out: Path, ref: dict, rcs: list[int]) -> list[str]:
    bad = [f"a tdbench run exited {rc}" for rc in rcs if rc != 0]
    got = results(out)
    if set(got) != set(ref):
        bad.append(f"runs {sorted(set(ref) ^ set(got))} missing or extra")
    for rid, want in ref.items():
        have = got.get(rid, {})
        if have.get("status") != "complete":
            bad.append(f"{rid}: {have.get('status')}")
        elif have != want:
            bad.append(f"{rid}: result differs from the undisturbed run's")
        log = out / "runs" / rid / "log.txt"
        n = len(re.findall(rf"run {rid}: complete$", log.read_text(), re.M)) if log.exists() else 0
        if n != 1:
            bad.append(f"{rid}: completed {n} times")
    left = [str(p.relative_to(out)) for p in (out / "runs").rglob(".tmp_step_*")]
    left += [str(p.relative_to(out)) for p in (out / "runs").glob("*/lease.json")]
    if left:
        bad.append(f"left behind: {left}")
    return bad


def cycle(rng: random.Random, suite: Path, out: Path, env: dict, stale_s: float, span: float,
          logdir: Path) -> tuple[list[str], list[str]]:
    """One cycle: (what was injected, what is wrong)."""
    logs = [open(logdir / f"p{i}.log", "a") for i in range(2)]
    procs = [start(suite, out, env, logs[0])]
    time.sleep(rng.uniform(0, 2))
    procs.append(start(suite, out, env, logs[1]))
    t0, faults, stopped, restart = time.monotonic(), [], {}, {}
    budget, next_at = rng.randint(1, 3), t0 + rng.uniform(0.5, span / 2)   # two share the work: ~span/2
    try:
        while True:
            now = time.monotonic()
            for i, t in list(stopped.items()):
                if now >= t:
                    signal_group(procs[i], signal.SIGCONT)
                    del stopped[i]
            for i, t in list(restart.items()):
                if now >= t:
                    procs[i] = start(suite, out, env, logs[i])
                    del restart[i]
            alive = [i for i, p in enumerate(procs) if p.poll() is None and i not in stopped and i not in restart]
            if len(faults) < budget and now >= next_at and alive:
                i = rng.choice(alive)
                if rng.random() < 0.5:
                    signal_group(procs[i], signal.SIGKILL)
                    procs[i].wait()
                    restart[i] = now + rng.uniform(0, 2)
                    faults.append(f"kill p{i} at {now - t0:.1f}s")
                else:
                    signal_group(procs[i], signal.SIGSTOP)
                    stopped[i] = now + stale_s + rng.uniform(0.5, 3)
                    faults.append(f"stop p{i} at {now - t0:.1f}s for {stopped[i] - now:.1f}s")
                next_at = now + rng.uniform(0.5, span / 4)
            if not stopped and not restart and all(p.poll() is not None for p in procs):
                break
            if now - t0 > 900:
                return faults, ["timed out after 900 s"]
            time.sleep(0.05)
    finally:
        for p in procs:
            signal_group(p, signal.SIGCONT)
            if p.poll() is None:
                signal_group(p, signal.SIGKILL)
                p.wait()
        for f in logs:
            f.close()
    return faults, problems(out, REF, [p.returncode for p in procs])


REF: dict = {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stale-s", type=float, default=3.0, help="the lease's stale time (the heartbeat: a sixth)")
    ap.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="tdbench-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    suite = work / "suite.yaml"
    suite.write_text(yaml.safe_dump(SUITE, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "TDBENCH_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1",
           "TDBENCH_LEASE_STALE_S": str(args.stale_s), "TDBENCH_LEASE_HEARTBEAT_S": str(args.stale_s / 6)}
    t = time.monotonic()
    ref = subprocess.run([sys.executable, "-m", "bench.cli", "run", str(suite), "--out", str(work / "reference")],
                         cwd=REPO, env=env, capture_output=True, text=True)
    if ref.returncode != 0:
        print(ref.stdout[-2000:] + ref.stderr[-2000:], file=sys.stderr)
        return 2
    span = time.monotonic() - t
    REF.update(results(work / "reference"))
    print(f"undisturbed run: {len(REF)} runs in {span:.0f} s; stale time {args.stale_s:g} s", flush=True)
    rng, lost, kinds = random.Random(args.seed), 0, {"kill": 0, "stop": 0}
    for c in range(args.cycles):
        out = work / f"cycle{c}"
        faults, bad = cycle(rng, suite, out, env, args.stale_s, span, work)
        for f in faults:
            kinds[f.split()[0]] += 1
        lost += bool(bad)
        print(f"cycle {c}: {', '.join(faults) or 'no fault'}: {'; '.join(bad) if bad else 'ok'}", flush=True)
        if not bad:
            shutil.rmtree(out, ignore_errors=True)
    print(f"{args.cycles} cycles, {lost} lost ({kinds['kill']} kills, {kinds['stop']} stalls > the stale time)")
    if args.work is None and not lost:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
