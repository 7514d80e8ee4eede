"""The live cluster: what its partitions and nodes offer, job shapes, and checking a profile
against them (``sbatch --test-only`` included) before anything is submitted."""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bench.errors import UserError, did_you_mean
from bench.slurm.profiles import ClusterProfile


# ----------------------------------------------------------------------------- the cluster
def slurm_cmd(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
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
        r = slurm_cmd(cmd)
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
        r = slurm_cmd(["sbatch", "--test-only", *s.sbatch_flags(prof), "--wrap=true"])
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
