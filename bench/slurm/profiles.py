"""Cluster profiles (``slurm/<name>.yaml`` or a path): the schema, finding and loading one."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator

from bench.config_io import read_validated
from bench.errors import UserError, did_you_mean

REPO_SLURM = Path(__file__).resolve().parents[2] / "slurm"
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
    path = find_profile(name_or_path)
    prof = read_validated(path, ClusterProfile)
    if prof.name is None:
        prof = prof.model_copy(update={"name": path.stem})
    return prof, path
