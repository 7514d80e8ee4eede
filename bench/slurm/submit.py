"""Submission (one job array per resource shape, through submitit), the job each array task
runs, and cancelling."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from bench.errors import UserError
from bench.records import private_dir
from bench.rundir import check_run_dirs, plan, run_dir
from bench.runner import now
from bench.slurm.cluster import Shape, check_profile, shape_of, slurm_cmd
from bench.slurm.ledger import append_ledger, read_ledger, slurm_dir
from bench.slurm.profiles import ClusterProfile
from bench.slurm.queue import LIVE, squeue
from bench.tracking import settings_of


# ----------------------------------------------------------------------------- the job
class RunJob:
    """What every array task runs: the harness's ``execute`` under a preemption guard.

    ``checkpoint`` (called by submitit on global rank 0 when the job is preempted or about to
    time out, after the training loop saved the run's checkpoint on every rank) resubmits the
    same arguments: the requeued job reads its resume point from the run directory."""

    def __call__(self, spec_json: dict, run_dir: str, threads: Optional[int] = None,
                 micro_batch: Optional[int] = None, tracking=None) -> str:
        from bench.distributed import install_preemption_guard
        from bench.runner import execute

        install_preemption_guard()
        return execute(spec_json, run_dir, threads, micro_batch, tracking)

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(RunJob(), *args, **kwargs)


# ----------------------------------------------------------------------------- submit
@dataclass
class Submission:
    array_job_id: str
    shape: Shape
    run_ids: list[str]
    job_ids: list[str] = field(default_factory=list)


def live_runs(out: Path, queue: Optional[dict] = None) -> dict[str, str]:
    """{run_id: job id} of runs whose latest job is still in the queue."""
    ledger, _ = read_ledger(out)
    if not ledger:
        return {}
    queue = squeue() if queue is None else queue
    if queue is None:
        raise UserError("slurm: squeue does not answer; cannot tell which runs are already queued")
    return {rid: e["job_id"] for rid, e in ledger.items() if e["job_id"] in queue
            and queue[e["job_id"]]["state"] in LIVE}


def submit(suite, specs, out: Path, prof: ClusterProfile, prof_path: Path, max_running: Optional[int] = None,
           log=print) -> tuple[list[Submission], dict[str, str], list]:
    """Queue every incomplete run not already queued. Returns (submissions, already queued
    {run_id: job id}, complete specs). Validates the profile against the cluster first."""
    import submitit

    out = Path(out).resolve()
    launch = suite.launch
    shape = shape_of(launch, prof)
    check_profile(prof, prof_path, [shape])
    threads = launch.threads or prof.cpus_per_task
    todo, done = plan(specs, out)
    check_run_dirs(out, todo)
    todo_ids = {s.run_id for s in todo}
    queued = {r: j for r, j in (live_runs(out) if todo else {}).items() if r in todo_ids}
    todo = [s for s in todo if s.run_id not in queued]
    subs: list[Submission] = []
    if not todo:
        return subs, queued, done
    (out / "runs").mkdir(parents=True, exist_ok=True)
    folder = private_dir(slurm_dir(out))   # 0700: submitit's pickles, unpickled by the jobs
    groups: dict[Shape, list] = {}
    for s in todo:  # one shape per suite today; the grouping is what keeps it one array per shape
        groups.setdefault(shape, []).append(s)
    for shp, group in groups.items():
        ex = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=prof.max_requeue, python=prof.python)
        extra = {"open_mode": "append", "requeue": True, **prof.sbatch}
        params = dict(partition=prof.partition, time=shp.time_min, nodes=shp.nodes,
                      ntasks_per_node=shp.tasks_per_node, cpus_per_task=shp.cpus_per_task,
                      job_name=f"tdbench-{suite.name}", signal_delay_s=prof.signal_delay_s,
                      array_parallelism=min(max_running or prof.max_running, len(group)),
                      setup=list(prof.setup), additional_parameters=extra,
                      srun_args=["--open-mode=append", *prof.srun_args])
        if shp.gpus_per_node:
            params["gpus_per_node"] = shp.gpus_per_node
        if shp.mem_gb:
            params["mem"] = f"{int(shp.mem_gb * 1024)}M"
        for k in ("account", "qos", "constraint"):
            if getattr(prof, k):
                params[k] = getattr(prof, k)
        ex.update_parameters(**params)
        jobs = ex.map_array(RunJob(), [s.model_dump(mode="json") for s in group],
                            [str(run_dir(out, s)) for s in group], [threads] * len(group),
                            [launch.micro_batch] * len(group), [settings_of(suite)] * len(group))
        array_id = jobs[0].job_id.split("_")[0]
        sub = Submission(array_id, shp, [s.run_id for s in group], [j.job_id for j in jobs])
        append_ledger(out, {"array_job_id": array_id, "submitted": now(), "profile": prof.name,
                             "suite": suite.name, "shape": shp.__dict__,
                             "runs": {s.run_id: {"job_id": j.job_id, "label": s.label, "size": s.size,
                                                 "seed": s.seed} for s, j in zip(group, jobs)}})
        subs.append(sub)
    return subs, queued, done


def cancel(out: Path) -> list[str]:
    """scancel every queued job of this output dir; returns the job ids cancelled."""
    ledger, _ = read_ledger(out)
    queue = squeue()
    if queue is None:
        raise UserError("slurm: squeue does not answer; nothing was cancelled")
    ids = sorted({e["job_id"] for e in ledger.values() if e["job_id"] in queue
                  and queue[e["job_id"]]["state"] in LIVE})
    for i in range(0, len(ids), 500):
        r = slurm_cmd(["scancel", *ids[i:i + 500]])
        if r.returncode != 0:
            raise UserError(f"slurm: scancel failed: {r.stderr.strip()}")
    if ids:
        append_ledger(out, {"cancelled": ids, "at": now()})
    return ids
