"""tdbench on a real Slurm cluster (slurm/dev-cluster.sh, accounting on), through submitit.

Nothing is mocked: jobs are submitted with sbatch (job arrays), preempted with submitit's
interrupt (SIGTERM + USR2, as a preemption does) or requeued with ``scontrol requeue``, and
read back with squeue/sacct and the run records. Every wait is bounded and fails with the
queue and the run's logs; every job a test submitted is cancelled at its end.
Skipped, with the reason, only where Slurm cannot be installed (dev-cluster.sh exit 3).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny_suite, write_suite

from bench.launch import run_suite
from bench.suite import load_suite

pytestmark = pytest.mark.slurm

SCRIPT = REPO / "slurm" / "dev-cluster.sh"
TDBENCH = [sys.executable, "-m", "bench.cli"]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster():
    if not sys.platform.startswith("linux") or shutil.which("bash") is None:
        pytest.skip("the dev Slurm cluster needs Linux and bash")
    r = subprocess.run(["bash", str(SCRIPT), "up", "--accounting"], capture_output=True, text=True, timeout=900)
    if r.returncode == 3:
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "(no message)"
        pytest.skip(f"cannot install/run Slurm here: {last}")
    assert r.returncode == 0, f"dev-cluster.sh up failed (rc {r.returncode}):\n{r.stderr[-3000:]}"
    m = re.fullmatch(r"export SLURM_CONF=(\S+)", r.stdout.strip().splitlines()[-1])
    assert m, f"unexpected output of dev-cluster.sh up: {r.stdout!r}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", m.group(1))
        yield m.group(1)


@pytest.fixture
def outs(cluster):
    """Output dirs whose jobs are cancelled when the test ends, whatever happened."""
    dirs: list[Path] = []
    yield dirs
    from bench.slurm import cancel

    for d in dirs:
        try:
            cancel(d)
        except Exception as e:  # noqa: BLE001 - cleanup must not mask the test's own failure
            print(f"cleanup: could not cancel the jobs of {d}: {e}", file=sys.stderr)


def tdbench(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([*TDBENCH, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=os.environ.copy())


def diagnose(out: Path) -> str:
    parts = [subprocess.run(["squeue"], capture_output=True, text=True).stdout]
    st = tdbench("status", out, timeout=60)
    parts.append(st.stdout + st.stderr)
    for p in sorted(out.glob("runs/*/log.txt")) + sorted(out.glob(".slurm/*_log.err"))[-2:]:
        parts.append(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:]))
    return "\n".join(parts)


def wait_for(pred, timeout: float, what: str, out: Path, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    pytest.fail(f"{what}: not after {timeout:.0f} s\n{diagnose(out)}")


def states(out: Path) -> dict[str, str]:
    from bench.slurm import run_states

    return {s.run_id: s.state for s in run_states(out)}


def all_final(out: Path, n: int):
    st = states(out)
    return len(st) == n and all(v in ("completed", "failed", "cancelled") for v in st.values()) and st


def only_record(out: Path) -> dict:
    recs = sorted(out.glob("runs/*/result.json"))
    assert len(recs) == 1, f"expected exactly one run record, found {recs}"
    return json.loads(recs[0].read_text())


def metric_values(rec: dict) -> list:
    return [(m["dataset"], m["metric"], m["value"], m["ci_low"], m["ci_high"]) for m in rec["metrics"]]


def ledger_job(out: Path) -> str:
    lines = (out / ".slurm" / "jobs.jsonl").read_text().splitlines()
    assert len(lines) == 1, f"one submission expected, ledger has {lines}"
    (entry,) = json.loads(lines[0])["runs"].values()
    return entry["job_id"]


def sacct_states(job_id: str) -> list[str]:
    r = subprocess.run(["sacct", "-n", "-P", "-D", "-X", "-j", job_id.split("_")[0], "-o", "JobID,State"],
                       capture_output=True, text=True, timeout=30)
    return [line.split("|")[1].split()[0] for line in r.stdout.splitlines()
            if "|" in line and line.split("|")[0] == job_id]


# ----------------------------------------------------------------------------- profiles
@pytest.mark.parametrize("profile,suite_launch,key", [
    ({"partition": "nope"}, {}, "partition: unknown name 'nope'"),
    ({"partition": "debug", "cpus_per_task": 64}, {}, "cpus_per_task: 64 CPUs per task"),
    ({"partition": "debug", "mem_gb": 100000}, {}, "mem_gb: 100000 GB per node"),
    ({"partition": "debug", "gpus_per_node": 1}, {}, "gpus_per_node: 1 GPUs per node"),
    ({"partition": "debug", "constraint": "a100"}, {},
     "constraint: no node of partition 'debug' has the feature 'a100'"),
    ({"partition": "debug", "sbatch": {"exclude": "no-such-node"}}, {}, "sbatch: the cluster rejects these resources"),
    ({"partition": "debug", "cpus_per_task": 4}, {"tasks_per_node": 4}, "launch.tasks_per_node: 4 tasks × 4 CPUs"),
    ({"partition": "debug"}, {"nodes": 2}, "launch.nodes: 2 nodes per run, but partition 'debug' has 1"),
])
def test_bad_profile_fails_before_anything_is_submitted(cluster, tmp_path, capsys, profile, suite_launch, key):
    from bench.cli import main

    prof = tmp_path / "bad.yaml"
    prof.write_text(yaml.safe_dump(profile))
    suite = write_suite(tmp_path / "s.yaml", tiny_suite(launch={"threads": 1, **suite_launch}))
    out = tmp_path / "out"
    before = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout
    rc = main(["submit", str(suite), "--cluster", str(prof), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and key in err, err
    assert not (out / ".slurm").exists(), "nothing may be submitted"
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.count("\n") <= before.count("\n")


# ----------------------------------------------------------------------------- smoke: slurm == local
def test_smoke_suite_on_slurm_gives_the_local_leaderboard(cluster, outs, tmp_path):
    smoke = yaml.safe_load((REPO / "suites" / "smoke.yaml").read_text())
    smoke["name"] = "smoke-mini"
    smoke["train"].update(steps=16, ckpt_every=8, warmup=4)
    smoke["eval"].update(max_blocks=8, samples=2, sample_steps=8)
    smoke["launch"] = {"executor": "local", "threads": 1}  # identical numbers need identical threads
    path = write_suite(tmp_path / "smoke-mini.yaml", smoke)
    suite, specs = load_suite(path)

    # Both through the CLI: `tdbench run` trains, samples and scores the samples (sample metrics
    # in the leaderboard) on either executor.
    local = tmp_path / "local"
    r = tdbench("run", path, "--executor", "local", "--out", local, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    slurm_out = tmp_path / "slurm"
    outs.append(slurm_out)
    r = tdbench("run", path, "--executor", "slurm", "--cluster", "dev", "--out", slurm_out, timeout=600)
    assert r.returncode == 0, f"{r.stderr[-3000:]}\n{diagnose(slurm_out)}"
    assert re.search(r"submitted \d+ run\(s\) as job array \d+ on dev", r.stderr), r.stderr
    recs = [json.loads(p.read_text()) for p in sorted(slurm_out.glob("runs/*/result.json"))]
    assert len(recs) == len(specs) and all(x["env"]["scheduler"] == "slurm" for x in recs)

    # Every number equal, except samples/s: a wall-clock speed, not a result.
    def results(out: Path) -> tuple[list[str], list[str]]:
        rows = [x for x in (out / "leaderboard.csv").read_text().splitlines() if ",samples_per_s," not in x]
        blocks = [b for b in (out / "leaderboard.md").read_text().split("\n\n") if "samples/s" not in b]
        return rows, blocks
    a, b = results(local), results(slurm_out)
    assert any(",gen_ppl," in x for x in a[0]), "the sample metrics are compared too"
    assert a == b, f"local and slurm leaderboards differ:\n{a}\n---\n{b}"


# ----------------------------------------------------------------------------- DDP on 2 tasks
def test_two_task_ddp_job_equals_one_process(cluster, outs, tmp_path):
    """tasks_per_node=2 on the cluster (gloo): equal replicas, and the same numbers as one
    process with the same global batch in 2 micro-batches (tolerance 1e-6 relative; the two
    differ at most by float summation order, in practice not at all)."""
    train = {"steps": 12, "batch_size": 8, "lr": 3e-3, "warmup": 2, "ckpt_every": 6}
    two = write_suite(tmp_path / "two.yaml", tiny_suite(name="two", baseline=None, train=train,
                                                        launch={"threads": 1, "tasks_per_node": 2}))
    out = tmp_path / "two"
    outs.append(out)
    r = tdbench("run", two, "--executor", "slurm", "--cluster", "dev", "--out", out, timeout=300)
    assert r.returncode == 0, f"{r.stderr[-3000:]}\n{diagnose(out)}"
    rec = only_record(out)
    t = rec["train"]
    assert rec["env"]["world_size"] == 2 and rec["env"]["scheduler"] == "slurm" and t["engine"] == "ddp"
    assert len(t["param_checksums"]) == 2 and t["param_checksums"][0] == t["param_checksums"][1], t
    log1 = sorted(out.glob(".slurm/*_1_log.out"))
    assert log1 and "global_rank=1(2)" in log1[0].read_text(), "rank 1 ran as a task of the same job"

    one = write_suite(tmp_path / "one.yaml", tiny_suite(name="two", baseline=None, train=train,
                                                        launch={"threads": 1, "micro_batch": 4}))
    suite, specs = load_suite(one)
    assert run_suite(suite, specs, tmp_path / "one", "debug") == {specs[0].run_id: "complete"}
    ref = only_record(tmp_path / "one")
    for a, b in zip(t["loss_curve"], ref["train"]["loss_curve"]):
        assert abs(a - b) <= 1e-6 * abs(b), (t["loss_curve"], ref["train"]["loss_curve"])
    for (d1, _, v1, *_), (d2, _, v2, *_) in zip(metric_values(rec), metric_values(ref)):
        assert d1 == d2 and abs(v1 - v2) <= 1e-6 * v2


# ----------------------------------------------------------------------------- preemption
# Long enough that, on an idle machine (~200 steps/s), training outlasts the dev cluster's
# KillWait (5 s) after the first checkpoint: an external requeue must find the run still
# training (with 1,200 steps it finished in 5 s, before Slurm's kill, and never resumed).
PRE_TRAIN = {"steps": 4000, "batch_size": 8, "lr": 3e-3, "warmup": 2, "ckpt_every": 150}


def _preempt(tmp_path: Path, outs: list, launch: dict, how: str) -> tuple[dict, dict, str, Path]:
    suite_path = write_suite(tmp_path / "pre.yaml", tiny_suite(name="pre", baseline=None, train=PRE_TRAIN,
                                                               launch={"threads": 1, **launch}))
    out = tmp_path / "pre"
    outs.append(out)
    r = tdbench("submit", suite_path, "--cluster", "dev", "--out", out, timeout=120)
    assert r.returncode == 0, r.stderr
    job_id = ledger_job(out)
    assert r.stdout.split() == [job_id.split("_")[0]], r.stdout  # submit prints the job ids
    wait_for(lambda: list(out.glob("runs/*/ckpt/step_*")), 180, "first checkpoint", out)
    if how == "interrupt":
        from submitit.slurm.slurm import SlurmJob
        SlurmJob(folder=out / ".slurm", job_id=job_id)._interrupt()  # SIGTERM then USR2
    else:
        subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, timeout=30)
    wait_for(lambda: "requeued" in states(out).values() or sacct_states(job_id)[:1] == ["REQUEUED"],
             60, "job requeued", out)
    wait_for(lambda: all_final(out, 1), 300, "requeued run finished", out, every=1)
    rec = only_record(out)
    assert rec["status"] == "complete", f"{rec.get('error')}\n{diagnose(out)}"

    ref_suite, specs = load_suite(write_suite(
        tmp_path / "ref.yaml", tiny_suite(name="pre", baseline=None, train=PRE_TRAIN,
                                          launch={"threads": 1, "micro_batch": 8 // launch.get("tasks_per_node", 1)})))
    assert run_suite(ref_suite, specs, tmp_path / "ref", "debug") == {specs[0].run_id: "complete"}
    return rec, only_record(tmp_path / "ref"), job_id, out


def _check_resumed(rec: dict, ref: dict, job_id: str, out: Path) -> int:
    log = next(out.glob("runs/*/log.txt")).read_text()
    m = re.search(r"resuming from step_(\d{7}) \(step (\d+)\)", log)
    assert m, f"the log does not show a resume:\n{log}"
    k = int(m.group(2))
    assert 0 < k < PRE_TRAIN["steps"], f"resumed from step {k}: not from a mid-training checkpoint"
    assert rec["train"]["resumed_from_step"] == k
    assert rec["env"]["restarts"] >= 1 and rec["env"]["scheduler"] == "slurm"
    assert log.count(": complete") == 1, "the run completed once"
    assert sacct_states(job_id)[:1] == ["REQUEUED"] and sacct_states(job_id)[-1] == "COMPLETED", \
        sacct_states(job_id)
    assert metric_values(rec) == metric_values(ref), "final metrics differ from the uninterrupted run"
    assert rec["train"]["loss_curve"] == ref["train"]["loss_curve"]
    assert len(list(out.glob("runs/*"))) == 1 and len(list(out.glob("runs/*/result.json"))) == 1
    st = tdbench("status", out, timeout=60)
    assert st.stdout.strip().splitlines()[-1] == "1 completed", st.stdout
    lg = tdbench("logs", next(out.glob("runs/*")), timeout=60)
    assert f"resuming from step_{k:07d}" in lg.stdout and f"job {job_id}" in lg.stdout, lg.stdout
    return k


def test_preemption_interrupt_checkpoints_requeues_and_resumes(cluster, outs, tmp_path):
    """submitit's interrupt on a 2-task DDP job: both ranks save at the same step boundary,
    rank 0 requeues, the job resumes from that step and ends with the uninterrupted numbers."""
    rec, ref, job_id, out = _preempt(tmp_path, outs, {"tasks_per_node": 2}, "interrupt")
    k = _check_resumed(rec, ref, job_id, out)
    log = next(out.glob("runs/*/log.txt")).read_text()
    assert f"preemption/time-limit signal: checkpoint saved at step {k} on all 2 process(es); requeueing" in log
    c = rec["train"]["param_checksums"]
    assert len(c) == 2 and c[0] == c[1]


def test_external_scontrol_requeue_resumes_from_the_run_directory(cluster, outs, tmp_path):
    """``scontrol requeue`` reruns the original pickle: the resume point comes from the run dir."""
    rec, ref, job_id, out = _preempt(tmp_path, outs, {}, "scontrol")
    _check_resumed(rec, ref, job_id, out)


# ----------------------------------------------------------------------------- scale
def test_submit_200_runs_as_one_array_quickly_and_status_answers_fast(cluster, outs, tmp_path):
    s = tiny_suite(name="many", seeds=list(range(100)),
                   train={"steps": 3, "batch_size": 4, "lr": 3e-3, "warmup": 1, "ckpt_every": 3},
                   launch={"threads": 1})
    path = write_suite(tmp_path / "many.yaml", s)
    out = tmp_path / "many"
    outs.append(out)
    t0 = time.monotonic()
    r = tdbench("submit", path, "--cluster", "dev", "--out", out, "--max-running", "2", timeout=120)
    t_submit = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    lines = (out / ".slurm" / "jobs.jsonl").read_text().splitlines()
    assert len(lines) == 1 and len(json.loads(lines[0])["runs"]) == 200, "one job array of 200 tasks"
    array = json.loads(lines[0])["array_job_id"]
    ids = {e["job_id"] for e in json.loads(lines[0])["runs"].values()}
    assert ids == {f"{array}_{i}" for i in range(200)}, "one sbatch: tasks 0..199 of one array"
    q = subprocess.run(["squeue", "-h", "-r", "-j", array, "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert q and set(q) <= ids, q[:5]
    t0 = time.monotonic()
    st = tdbench("status", out, timeout=60)
    t_status = time.monotonic() - t0
    assert st.returncode == 0 and len(st.stdout.strip().splitlines()) == 201, st.stdout[-2000:]
    print(f"\n200-run submit: {t_submit:.2f} s (one array, job {array}); status: {t_status:.2f} s")
    assert t_submit <= 10, f"submitting 200 runs took {t_submit:.1f} s"
    assert t_status <= 2, f"status of 200 runs took {t_status:.1f} s"

    again = tdbench("submit", path, "--cluster", "dev", "--out", out, timeout=120)
    assert again.returncode == 0 and "already queued" in again.stderr and again.stdout.strip() == "", again.stderr
    c = tdbench("cancel", out, timeout=120)
    assert c.returncode == 0 and c.stdout.startswith("cancelled "), c.stdout + c.stderr
    final = wait_for(lambda: all_final(out, 200), 120, "cancelled runs final", out, every=1)
    assert "cancelled" in final.values() and "pending" not in final.values()
