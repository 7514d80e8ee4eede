"""Slurm: cluster profiles, submission as job arrays, honest states, cancel, logs.

A **cluster profile** (``slurm/<name>.yaml``, or any path) says where and how jobs run:
partition, account, qos, GPUs per node, CPUs per task, memory, time limit, constraint, extra
sbatch options, setup lines (``module load …``), the cap on concurrently running array tasks.
It is validated like a suite (one line naming the key, exit 2) and then checked against the
live cluster (partition exists, the resources fit its nodes, and ``sbatch --test-only``
accepts them) before anything is submitted.

``submit`` queues every incomplete run of a suite through submitit: one job array per
resource shape (``nodes × tasks_per_node`` processes, CPUs, GPUs, memory, time), never one
sbatch per run. Each array task runs :class:`RunJob`, i.e. ``bench.runner.execute`` — the
same code as the local and debug executors. Which job runs which run is appended to
``<out>/.slurm/jobs.jsonl`` (the ledger); submitit's pickles and the jobs' stdout/stderr are
in ``<out>/.slurm/``.

The run records are the truth. States (``run_states``) come from them plus one ``squeue``
call (and one ``sacct`` call for jobs that left the queue without a final record); nothing
ever blocks on submitit's ``job.result()``.

Preemption and time limits: jobs get ``--signal=USR2@signal_delay_s``; the training loop saves
a checkpoint on every rank at the next step boundary and rank 0 lets submitit requeue the job
(bench.distributed.PreemptionGuard). A requeued job — by submitit or by an external
``scontrol requeue``, which reruns the original pickle — resumes from the newest checkpoint
in the run directory: the pickle holds only the spec and the run directory, never state.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator

from bench.errors import UserError, did_you_mean
from bench.runner import now

REPO_SLURM = Path(__file__).resolve().parents[1] / "slurm"
LEDGER = "jobs.jsonl"
# sbatch options a profile sets through its own keys (not through `sbatch:`)
MANAGED = {"partition", "account", "qos", "time", "nodes", "ntasks-per-node", "cpus-per-task", "mem",
           "gpus-per-node", "constraint", "array", "job-name", "output", "error", "signal", "wrap",
           "ntasks", "gres", "gpus"}


# ----------------------------------------------------------------------------- profiles
class ClusterProfile(BaseModel):
    """One cluster: where jobs go and what each task of a run gets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Optional[str] = None                       # default: the file name without .yaml
    partition: str                                   # required
    account: Optional[str] = None
    qos: Optional[str] = None
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: PositiveInt = 1
    mem_gb: Optional[PositiveFloat] = None           # per node; default: the cluster's default
    time_min: PositiveInt = 60                       # job time limit (a suite's launch.timeout_min overrides)
    constraint: Optional[str] = None                 # node features, e.g. "a100&ib"
    max_running: PositiveInt = 64                    # array tasks running at once (sbatch --array=…%N)
    signal_delay_s: int = Field(120, ge=0)           # USR2 this long before the time limit: checkpoint
    max_requeue: int = Field(3, ge=0)                # time-outs that may requeue a job (submitit)
    sbatch: dict[str, Union[str, int, float, bool]] = {}  # extra sbatch options: {exclude: "node[1-2]"}
    setup: list[str] = []                            # job-script lines before srun: module load, source …
    srun_args: list[str] = []                        # extra srun arguments
    python: Optional[str] = None                     # python on the nodes (default: this one)

    @field_validator("sbatch")
    @classmethod
    def _not_managed(cls, v):
        for k in v:
            flag = k.replace("_", "-").lstrip("-")
            if flag in MANAGED:
                raise ValueError(f"'{k}' is set by the profile's own keys or by tdbench, not here")
        return v


def find_profile(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists() or "/" in name_or_path:
        if not p.is_file():
            raise UserError(f"--cluster {name_or_path}: file not found")
        return p
    for d in (Path.cwd() / "slurm", REPO_SLURM):
        for ext in (".yaml", ".yml"):
            if (d / f"{name_or_path}{ext}").is_file():
                return d / f"{name_or_path}{ext}"
    known = sorted({q.stem for d in (Path.cwd() / "slurm", REPO_SLURM) if d.is_dir() for q in d.glob("*.yaml")})
    raise UserError(f"--cluster: {did_you_mean(name_or_path, known)}; or give a path to a profile")


def load_profile(name_or_path: str) -> tuple[ClusterProfile, Path]:
    from bench.config import read_validated

    path = find_profile(name_or_path)
    prof = read_validated(path, ClusterProfile)
    if prof.name is None:
        prof = prof.model_copy(update={"name": path.stem})
    return prof, path


# ----------------------------------------------------------------------------- the cluster
def _slurm(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise UserError(f"slurm: '{args[0]}' not found: Slurm's client commands are not installed here "
                        "(for the dev cluster: slurm/dev-cluster.sh up)") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"slurm: '{' '.join(args[:3])}' did not answer in {timeout:.0f} s") from None


def _kv(line: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))


@dataclass
class ClusterInfo:
    partitions: dict[str, dict]
    nodes: dict[str, dict]

    def partition_nodes(self, part: str) -> list[dict]:
        return [n for n in self.nodes.values() if part in n.get("Partitions", "").split(",")]


def cluster_info() -> ClusterInfo:
    parts, nodes = {}, {}
    for cmd, out in ((["scontrol", "show", "partition", "-o"], parts), (["scontrol", "show", "node", "-o"], nodes)):
        r = _slurm(cmd)
        if r.returncode != 0:
            msg = (r.stderr.strip() or r.stdout.strip()).splitlines()
            raise UserError(f"slurm: cannot reach the cluster ({' '.join(cmd[:3])}: "
                            f"{msg[-1] if msg else 'rc ' + str(r.returncode)}); is SLURM_CONF set?")
        for line in r.stdout.splitlines():
            d = _kv(line)
            key = d.get("PartitionName") or d.get("NodeName")
            if key:
                out[key] = d
    return ClusterInfo(parts, nodes)


def _gpus(gres: str) -> int:
    n = 0
    for m in re.finditer(r"gpu(?::[\w.-]+)?:(\d+)", gres or ""):
        n += int(m.group(1))
    return n


def _minutes(limit: str) -> Optional[int]:
    """Slurm time (``UNLIMITED``, ``MM``, ``HH:MM:SS``, ``D-HH:MM:SS``) → minutes (None: no limit)."""
    if not limit or limit.upper() in ("UNLIMITED", "INFINITE", "NONE"):
        return None
    days = 0
    if "-" in limit:
        d, limit = limit.split("-", 1)
        days = int(d)
    parts = [int(x) for x in limit.split(":")]
    if len(parts) == 1:
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, s = 0, parts[0], parts[1]
    else:
        h, m, s = parts[-3:]
    return days * 1440 + h * 60 + m + (1 if s else 0)


@dataclass(frozen=True)
class Shape:
    """The resources of one job (one run): every run with the same shape shares an array."""

    nodes: int
    tasks_per_node: int
    cpus_per_task: int
    gpus_per_node: int
    mem_gb: Optional[float]
    time_min: int

    def sbatch_flags(self, prof: ClusterProfile) -> list[str]:
        f = [f"--partition={prof.partition}", f"--nodes={self.nodes}",
             f"--ntasks-per-node={self.tasks_per_node}", f"--cpus-per-task={self.cpus_per_task}",
             f"--time={self.time_min}"]
        if self.gpus_per_node:
            f.append(f"--gpus-per-node={self.gpus_per_node}")
        if self.mem_gb:
            f.append(f"--mem={int(self.mem_gb * 1024)}M")
        for key, flag in (("account", "account"), ("qos", "qos"), ("constraint", "constraint")):
            if getattr(prof, key):
                f.append(f"--{flag}={getattr(prof, key)}")
        for k, v in prof.sbatch.items():
            k = k.replace("_", "-").lstrip("-")
            if v is True:
                f.append(f"--{k}")
            elif v is not False:
                f.append(f"--{k}={v}")
        return f


def shape_of(launch, prof: ClusterProfile) -> Shape:
    time_min = launch.timeout_min if "timeout_min" in launch.model_fields_set else prof.time_min
    return Shape(nodes=launch.nodes, tasks_per_node=launch.tasks_per_node, cpus_per_task=prof.cpus_per_task,
                 gpus_per_node=prof.gpus_per_node, mem_gb=prof.mem_gb, time_min=time_min)


def check_profile(prof: ClusterProfile, path: Path, shapes: list[Shape], info: ClusterInfo | None = None) -> None:
    """Raise UserError (naming the key) unless the cluster can run every shape."""
    info = info or cluster_info()
    where = f"{path}: "
    if prof.partition not in info.partitions:
        raise UserError(where + f"partition: {did_you_mean(prof.partition, info.partitions)}")
    part = info.partitions[prof.partition]
    pnodes = info.partition_nodes(prof.partition)
    if part.get("State", "UP") not in ("UP",):
        raise UserError(where + f"partition: '{prof.partition}' is {part.get('State')}")
    cpus = max((int(n.get("CPUTot", n.get("CPUEfctv", 0)) or 0) for n in pnodes), default=0)
    mem = max((int(n.get("RealMemory", 0) or 0) for n in pnodes), default=0)
    gpus = max((_gpus(n.get("Gres", "")) for n in pnodes), default=0)
    feats = {f for n in pnodes for f in (n.get("AvailableFeatures") or "").split(",") if f and f != "(null)"}
    n_nodes = int(part.get("TotalNodes", len(pnodes)) or len(pnodes))
    max_time = _minutes(part.get("MaxTime", "UNLIMITED"))
    p = f"partition '{prof.partition}'"
    if prof.cpus_per_task > cpus:
        raise UserError(where + f"cpus_per_task: {prof.cpus_per_task} CPUs per task, but the largest node of {p} "
                                f"has {cpus}")
    if prof.gpus_per_node > gpus:
        raise UserError(where + f"gpus_per_node: {prof.gpus_per_node} GPUs per node, but the nodes of {p} have "
                                f"{gpus or 'no'} GPU{'s' if gpus != 1 else ''}")
    if prof.mem_gb and prof.mem_gb * 1024 > mem:
        raise UserError(where + f"mem_gb: {prof.mem_gb:g} GB per node, but the largest node of {p} has "
                                f"{mem / 1024:.1f} GB")
    if prof.constraint:
        for word in re.findall(r"[A-Za-z_][\w.-]*", prof.constraint):
            if word not in feats:
                raise UserError(where + f"constraint: no node of {p} has the feature '{word}' "
                                        f"(features: {', '.join(sorted(feats)) or 'none'})")
    for s in shapes:
        if s.nodes > n_nodes:
            raise UserError(f"launch.nodes: {s.nodes} nodes per run, but {p} has {n_nodes}")
        if s.tasks_per_node * s.cpus_per_task > cpus:
            raise UserError(f"launch.tasks_per_node: {s.tasks_per_node} tasks × {s.cpus_per_task} CPUs "
                            f"(cpus_per_task in {path}) do not fit the largest node of {p} ({cpus} CPUs)")
        if s.gpus_per_node and s.tasks_per_node > s.gpus_per_node:
            raise UserError(f"launch.tasks_per_node: {s.tasks_per_node} tasks per node but {s.gpus_per_node} GPUs "
                            f"per node (gpus_per_node in {path}): one task per GPU")
        if max_time is not None and s.time_min > max_time:
            key = "launch.timeout_min" if s.time_min != prof.time_min else f"{path}: time_min"
            raise UserError(f"{key}: {s.time_min} min exceeds the time limit of {p} ({max_time} min)")
    for s in shapes:  # whatever else the scheduler objects to (account, qos, limits, …)
        r = _slurm(["sbatch", "--test-only", *s.sbatch_flags(prof), "--wrap=true"])
        if r.returncode != 0:
            msg = " ".join(x.removeprefix("sbatch: error: ").strip()
                           for x in r.stderr.strip().splitlines() if "error" in x.lower()) or r.stderr.strip()
            low = msg.lower()
            key = next((k for k, words in (("account", ("account",)), ("qos", ("qos",)),
                                           ("partition", ("partition",)), ("constraint", ("feature", "constraint")),
                                           ("mem_gb", ("memory",)), ("time_min", ("time limit",)),
                                           ("gpus_per_node", ("gres", "gpu")))
                        if any(w in low for w in words)), "sbatch")
            raise UserError(where + f"{key}: the cluster rejects these resources (sbatch --test-only: {msg})")


# ----------------------------------------------------------------------------- the job
class RunJob:
    """What every array task runs: the harness's ``execute`` under a preemption guard.

    ``checkpoint`` (called by submitit on global rank 0 when the job is preempted or about to
    time out, after the training loop saved the run's checkpoint on every rank) resubmits the
    same arguments: the requeued job reads its resume point from the run directory."""

    def __call__(self, spec_json: dict, run_dir: str, threads: Optional[int] = None,
                 micro_batch: Optional[int] = None) -> str:
        from bench.distributed import install_preemption_guard
        from bench.runner import execute

        install_preemption_guard()
        return execute(spec_json, run_dir, threads, micro_batch)

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(RunJob(), *args, **kwargs)


# ----------------------------------------------------------------------------- ledger
def slurm_dir(out: Path) -> Path:
    return Path(out) / ".slurm"


def read_ledger(out: Path) -> tuple[dict[str, dict], set[str]]:
    """({run_id: its latest submission entry}, {cancelled job ids})."""
    runs, cancelled = {}, set()
    p = slurm_dir(out) / LEDGER
    if not p.is_file():
        return runs, cancelled
    for line in p.read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash: the run records are the truth anyway
        if "cancelled" in e:
            cancelled.update(e["cancelled"])
            continue
        for rid, r in e.get("runs", {}).items():
            runs[rid] = {**r, "array_job_id": e["array_job_id"], "submitted": e.get("submitted"),
                         "profile": e.get("profile")}
    return runs, cancelled


def _append_ledger(out: Path, entry: dict) -> None:
    p = slurm_dir(out) / LEDGER
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- scheduler
LIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
        "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "STOPPED"}


def squeue() -> Optional[dict[str, dict]]:
    """{job id ('123_4' for array tasks): {state, restarts, reason}} of this user's jobs, or None
    when the scheduler does not answer (never 'gone' because of a hiccup)."""
    try:
        r = subprocess.run(["squeue", "--me", "-h", "-r", "-O", "JobArrayID:64,State:24,RestartCnt:8,Reason:64"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    out = {}
    for line in r.stdout.splitlines():
        parts = line.split(None, 3)
        if len(parts) >= 2:
            out[parts[0]] = {"state": parts[1], "restarts": int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0,
                             "reason": parts[3].strip() if len(parts) > 3 else ""}
    return out


def sacct(job_ids: list[str]) -> dict[str, str]:
    """{job id: final state} from accounting (empty when accounting is off)."""
    if not job_ids:
        return {}
    arrays = sorted({j.split("_")[0] for j in job_ids})
    try:
        r = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(arrays), "-o", "JobID,State"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in r.stdout.splitlines():
        if "|" in line:
            jid, st = line.split("|", 1)
            out[jid.strip()] = st.split()[0] if st.split() else st
    return out


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

    from bench.launch import plan, run_dir

    out = Path(out).resolve()
    launch = suite.launch
    shape = shape_of(launch, prof)
    check_profile(prof, prof_path, [shape])
    threads = launch.threads or prof.cpus_per_task
    todo, done = plan(specs, out)
    todo_ids = {s.run_id for s in todo}
    queued = {r: j for r, j in (live_runs(out) if todo else {}).items() if r in todo_ids}
    todo = [s for s in todo if s.run_id not in queued]
    subs: list[Submission] = []
    if not todo:
        return subs, queued, done
    (out / "runs").mkdir(parents=True, exist_ok=True)
    folder = slurm_dir(out)
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
                            [launch.micro_batch] * len(group))
        array_id = jobs[0].job_id.split("_")[0]
        sub = Submission(array_id, shp, [s.run_id for s in group], [j.job_id for j in jobs])
        _append_ledger(out, {"array_job_id": array_id, "submitted": now(), "profile": prof.name,
                             "suite": suite.name, "shape": shp.__dict__,
                             "runs": {s.run_id: {"job_id": j.job_id, "label": s.label, "size": s.size,
                                                 "seed": s.seed} for s, j in zip(group, jobs)}})
        subs.append(sub)
    return subs, queued, done


# ----------------------------------------------------------------------------- states
STATES = ("pending", "running", "requeued", "completed", "failed", "cancelled")


@dataclass
class RunState:
    run_id: str
    state: str            # one of STATES
    label: str = ""
    size: str = ""
    seed: Optional[int] = None
    job_id: Optional[str] = None
    detail: str = ""
    record: str = "pending"  # the run record's own status

    @property
    def final(self) -> bool:
        return self.state in ("completed", "failed", "cancelled")


def run_states(out: Path, only: Optional[set[str]] = None, queue: Optional[dict] = None,
               use_sacct: bool = True) -> list[RunState]:
    """Each run's state from its record, the ledger and the scheduler (one squeue call, and one
    sacct call for jobs that left the queue without a final record)."""
    from bench.records import read_record, record_status

    out = Path(out)
    ledger, cancelled = read_ledger(out)
    ids = set(ledger)
    runs_dir = out / "runs"
    if runs_dir.is_dir():
        ids.update(p.name for p in runs_dir.iterdir() if p.is_dir())
    if only is not None:
        ids &= set(only)
    if queue is None and ledger:
        queue = squeue()
    states, gone = [], []
    for rid in sorted(ids):
        rd = runs_dir / rid
        rec_st = record_status(rd)
        e = ledger.get(rid, {})
        st = RunState(rid, "pending", e.get("label", ""), e.get("size", ""), e.get("seed"), e.get("job_id"),
                      record=rec_st)
        rec = None
        if rec_st in ("complete", "failed", "running"):
            try:
                rec = read_record(rd / "result.json")
                st.label, st.size, st.seed = rec.get("label", st.label), rec.get("size", st.size), rec.get("seed")
            except UserError:
                rec_st = st.record = "corrupt"
        q = (queue or {}).get(st.job_id) if st.job_id else None
        if rec_st == "complete":
            st.state = "completed"
        elif q is not None and q["state"] in LIVE:
            again = q["restarts"] > 0
            if q["state"] in ("RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT"):
                st.state = "running"
            elif again or q["state"].startswith("REQUEUE"):
                st.state = "requeued"
            else:
                st.state = "pending"
            st.detail = q["state"].lower() + (f", requeued {q['restarts']}×" if again else "") \
                + (f" ({q['reason']})" if q["reason"] and q["reason"] not in ("None", "(null)") and q["state"] != "RUNNING" else "")
        elif rec_st == "failed":
            st.state = "failed"
            st.detail = str((rec or {}).get("error", ""))[:200]
        elif rec_st == "corrupt":
            st.state = "failed"
            st.detail = f"{rd / 'result.json'}: corrupt record"
        elif st.job_id and st.job_id in cancelled:
            st.state = "cancelled"
            st.detail = "cancelled with tdbench cancel"
        elif st.job_id and queue is not None:
            gone.append(st)  # left the queue without a final record: ask accounting why
        elif rec_st == "running":
            st.state = "running"
            st.detail = "no scheduler job (local run, or a process that died)"
        states.append(st)
    final = sacct([s.job_id for s in gone]) if (gone and use_sacct) else {}
    for s in gone:
        acct = final.get(s.job_id)
        if acct and acct.startswith("CANCELLED"):
            s.state, s.detail = "cancelled", "job cancelled (sacct: CANCELLED)"
        elif acct in LIVE:
            s.state, s.detail = ("running" if acct == "RUNNING" else "pending"), f"sacct: {acct}"
        else:
            s.state = "failed"
            s.detail = f"job {s.job_id} ended without a final record (sacct: {acct or 'unknown'})"
    return states


def job_log_paths(out: Path, job_id: str) -> list[Path]:
    """submitit's stdout/stderr of every task of a job, rank 0 first."""
    folder = slurm_dir(out)
    return sorted(folder.glob(f"{job_id}_*_log.out"), key=_task_no) + \
        sorted(folder.glob(f"{job_id}_*_log.err"), key=_task_no)


def _task_no(p: Path) -> int:
    m = re.search(r"_(\d+)_log\.", p.name)
    return int(m.group(1)) if m else 0


def cancel(out: Path) -> list[str]:
    """scancel every queued job of this output dir; returns the job ids cancelled."""
    ledger, _ = read_ledger(out)
    queue = squeue()
    if queue is None:
        raise UserError("slurm: squeue does not answer; nothing was cancelled")
    ids = sorted({e["job_id"] for e in ledger.values() if e["job_id"] in queue
                  and queue[e["job_id"]]["state"] in LIVE})
    for i in range(0, len(ids), 500):
        r = _slurm(["scancel", *ids[i:i + 500]])
        if r.returncode != 0:
            raise UserError(f"slurm: scancel failed: {r.stderr.strip()}")
    if ids:
        _append_ledger(out, {"cancelled": ids, "at": now()})
    return ids
