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

Modules: ``profiles`` (schema, find/load), ``cluster`` (live cluster facts, shapes, checks),
``submit`` (RunJob, submit, cancel), ``ledger`` (jobs.jsonl), ``queue`` (squeue/sacct),
``states`` (run_states), ``logs`` (job log files).
"""
from bench.slurm.cluster import ClusterInfo, Shape, check_profile, cluster_info, shape_of
from bench.slurm.ledger import LEDGER, read_ledger, slurm_dir
from bench.slurm.logs import job_log_paths
from bench.slurm.profiles import MANAGED, REPO_SLURM, ClusterProfile, find_profile, load_profile
from bench.slurm.queue import LIVE, sacct, squeue
from bench.slurm.states import STATES, RunState, run_states
from bench.slurm.submit import RunJob, Submission, cancel, live_runs, submit

__all__ = ["LEDGER", "LIVE", "MANAGED", "REPO_SLURM", "STATES", "ClusterInfo", "ClusterProfile", "RunJob", "RunState",
           "Shape", "Submission", "cancel", "check_profile", "cluster_info", "find_profile", "job_log_paths",
           "live_runs", "load_profile", "read_ledger", "run_states", "sacct", "shape_of", "slurm_dir", "squeue",
           "submit"]
