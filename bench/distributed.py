"""Distributed state inside a run: where the processes come from and how they agree.

One run is ``launch.nodes × launch.tasks_per_node`` processes. The harness code is the same
whatever started them:

- a submitit job (``slurm`` executor, or ``local`` with ``tasks_per_node > 1``): every task
  builds the torch environment from the job (``TorchDistributedEnvironment().export()``);
- ``torchrun`` / ``accelerate launch``: ``RANK`` and ``WORLD_SIZE`` are already set;
- otherwise one process (``debug`` executor, a plain ``python``).

Then :func:`make_accelerator` builds Accelerate's state: DDP (gloo on CPU, NCCL on CUDA), or
DeepSpeed ZeRO 0–3 through Accelerate's DeepSpeed plugin when the suite says
``train.engine: deepspeed``. The global batch is fixed by the suite; each process takes
``batch_size / world`` sequences per optimizer step in ``accum`` micro-batches of
``launch.micro_batch`` (default: all of them, accum = 1), see :func:`batch_plan`.

Preemption (Slurm only): :class:`PreemptionGuard` turns submitit's preemption/time-limit
signal (USR2) and SIGTERM into a request that the training loop honours at the next step
boundary on every rank at once (the ranks agree through one all-reduce per step), so all
ranks save one consistent checkpoint; then global rank 0 hands over to submitit, which
requeues the job. The requeued job finds that checkpoint in the run directory.
"""
from __future__ import annotations

import gc
import hashlib
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

from bench.errors import UserError


# ----------------------------------------------------------------------------- world and batch
@dataclass(frozen=True)
class BatchPlan:
    world: int      # processes
    per_rank: int   # sequences per process per optimizer step
    micro: int      # sequences per forward/backward
    accum: int      # micro-batches per optimizer step (gradient accumulation)


def batch_plan(batch: int, world: int, micro: int | None = None) -> BatchPlan:
    """Split the global batch over ``world`` processes and micro-batches of ``micro``.

    The global batch never changes with the world size; gradient accumulation is derived."""
    if batch % world:
        raise UserError(f"train.batch_size: {batch} is not divisible by the world size {world} "
                        "(launch.nodes × launch.tasks_per_node)")
    per_rank = batch // world
    micro = min(micro or per_rank, per_rank)
    if per_rank % micro:
        raise UserError(f"launch.micro_batch: {micro} does not divide the per-process batch {per_rank} "
                        f"(train.batch_size {batch} / {world} processes)")
    return BatchPlan(world, per_rank, micro, per_rank // micro)


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    source: str  # "single" | "submitit" | "env"


def _in_submitit_job() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def process_rank() -> tuple[int, int]:
    """(global rank, world size) of this process, read from its environment before any process
    group exists: torchrun-style RANK/WORLD_SIZE, else submitit's job environment (local and
    Slurm executors: one task per rank), else a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if _in_submitit_job():
        from submitit import JobEnvironment

        env = JobEnvironment()
        return env.global_rank, env.num_tasks
    return 0, 1


def setup() -> Dist:
    """Export the torch distributed environment of this process (idempotent)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                    int(os.environ.get("LOCAL_RANK", 0)), "env")
    if _in_submitit_job():
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        if JobEnvironment().num_tasks > 1:
            # every task sees the node's GPUs and Accelerate takes cuda:LOCAL_RANK
            env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            _one_bound_gpu(env.local_world_size)
            return Dist(env.rank, env.world_size, env.local_rank, "submitit")
    return Dist(0, 1, 0, "single")


def _one_bound_gpu(local_world: int) -> None:
    """When the scheduler bound one GPU to each task (--gpus-per-task, gpu-bind), that GPU is
    cuda:0 in every task: Accelerate must not look for cuda:LOCAL_RANK."""
    vis = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if local_world > 1 and len(vis) == 1:
        os.environ["LOCAL_RANK"] = "0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reset_accelerate_state() -> None:
    """The debug executor runs many runs in one process: let each build its own state."""
    try:
        from accelerate.state import AcceleratorState, GradientState, PartialState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        PartialState._reset_state()
    except Exception:  # noqa: BLE001 - private API; a fresh process needs none of this
        pass


def deepspeed_config(spec, plan: BatchPlan, bf16: bool) -> dict:
    cfg = spec.train
    return {
        "train_micro_batch_size_per_gpu": plan.micro,
        "gradient_accumulation_steps": plan.accum,
        "train_batch_size": cfg.batch_size,
        "gradient_clipping": float(cfg.grad_clip),
        "zero_optimization": {"stage": int(cfg.zero_stage), "stage3_gather_16bit_weights_on_model_save": True},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def make_accelerator(spec, micro_batch: int | None = None, log_with: list[str] | None = None,
                     project_dir: str | None = None):
    """Accelerate state for this process: single, DDP (gloo on CPU) or DeepSpeed ZeRO; with
    ``log_with``, its experiment trackers writing under ``project_dir`` (bench.tracking)."""
    from datetime import timedelta

    import torch
    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs

    dist = setup()
    cuda = torch.cuda.is_available()
    bf16 = cuda and spec.train.precision in ("auto", "bf16")
    mp = "bf16" if bf16 else "no"
    if dist.world == 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        _reset_accelerate_state()
    # the process-group kwargs only when there is a group (Accelerate would expect one)
    pg = [InitProcessGroupKwargs(backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=30))]
    if spec.train.engine == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise UserError("train.engine: deepspeed is not installed (pip install 'tdbench[deepspeed]')") from None
        from accelerate import DeepSpeedPlugin

        if dist.world == 1:  # DeepSpeed always wants a process group, even of one
            for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())), ("RANK", "0"),
                         ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                if k not in os.environ:
                    os.environ[k] = v
                    _SET_ENV.append(k)
        plan = batch_plan(spec.train.batch_size, dist.world, micro_batch)
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(spec, plan, bf16))
        # cpu=False: Accelerate ignores the DeepSpeed plugin under cpu=True; DeepSpeed finds the
        # CPU itself when there is no GPU.
        return Accelerator(mixed_precision=mp, deepspeed_plugin=plugin, kwargs_handlers=pg, log_with=log_with,
                           project_dir=project_dir)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False)
    return Accelerator(cpu=not cuda, mixed_precision=mp, kwargs_handlers=pg + [ddp] if dist.world > 1 else [],
                       log_with=log_with, project_dir=project_dir)


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


_SET_ENV: list[str] = []


def teardown(accelerator=None) -> None:
    """Leave no process group behind (the debug executor runs the next run in this process).

    The prepared models go first: a DDP wrapper still held by the accelerator (or by a reference
    cycle) would keep the process group alive past destroy_process_group, to be freed at
    interpreter exit among gloo's threads. A second rank that exits right after training ended
    with SIGABRT ("terminate called without an active exception") in 2 of 29 runs of
    tests/test_stages.py's DDP test before this, 0 of 60 after (the cause is inferred from that)."""
    while _SET_ENV:
        os.environ.pop(_SET_ENV.pop(), None)
    if accelerator is not None:
        try:
            accelerator.free_memory()           # drops its prepared models and optimizers
        except Exception:  # noqa: BLE001
            pass
    gc.collect()
    if accelerator is not None and getattr(accelerator, "trackers", None):
        # finishes the experiment trackers (bench.tracking) and destroys the process group: here,
        # after the prepared models are gone, for the reason above
        try:
            accelerator.end_training()
        except Exception as e:  # noqa: BLE001 - the run is recorded; a tracker failing to close does not undo it
            print(f"experiment tracking: closing the trackers failed: {e}", file=sys.stderr)
    try:
        import torch.distributed as td

        if td.is_available() and td.is_initialized():
            td.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    if "deepspeed.utils.groups" in sys.modules:  # DeepSpeed caches groups of the old process group
        try:
            import deepspeed.comm.comm as dcomm
            import deepspeed.utils.groups as dg

            for k, v in list(vars(dg).items()):
                if k.startswith("_") and k.isupper() and k.endswith(("GROUP", "GROUP_RANKS", "WORLD_SIZE", "RANK")):
                    setattr(dg, k, {} if isinstance(v, dict) else None)
            dg.mesh_device = None
            dcomm.cdb = None
        except Exception:  # noqa: BLE001
            pass


def param_checksum(module) -> str:
    """sha256 of every parameter's bytes (replicas must agree bit for bit)."""
    import torch

    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        t = p.detach().to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            t = t.float()
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- preemption
NONE, SAVE, REQUEUE = 0, 1, 2
_GUARD: "PreemptionGuard | None" = None


class PreemptionGuard:
    """Signals → a request honoured by the training loop at the next step boundary.

    USR2 (submitit's preemption / time-limit signal; only global rank 0's submitit handler acts
    on it): save on every rank, then rank 0 calls submitit's handler, which calls the job's
    ``checkpoint()`` and requeues. SIGTERM (``scontrol requeue``, ``scancel``, or the first
    signal of a preemption): save on every rank and go on; SIGKILL follows after KillWait.
    Outside the training loop a USR2 goes straight to submitit (nothing to save: the last
    checkpoint is the final one, or training has not started)."""

    def __init__(self, log=None):
        # two flags, each written by one signal handler, so that clearing one after it was
        # honoured never loses the other arriving meanwhile
        self.want_save = False
        self.want_requeue = False
        self.training = False
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self._sig = None
        self._orig = None

    def install(self) -> "PreemptionGuard":
        from submitit import JobEnvironment

        try:
            self._sig = JobEnvironment._usr_sig()
        except Exception:  # noqa: BLE001
            self._sig = signal.SIGUSR2
        self._orig = signal.getsignal(self._sig)
        signal.signal(self._sig, self._on_usr)
        signal.signal(signal.SIGTERM, self._on_term)
        return self

    @property
    def request(self) -> int:
        return REQUEUE if self.want_requeue else SAVE if self.want_save else NONE

    def handled(self, request: int) -> None:
        """The loop honoured ``request`` (saved; for REQUEUE it never returns from requeue())."""
        if request == REQUEUE:
            self.want_requeue = False
        self.want_save = False

    def _on_usr(self, signum, frame):
        if self.training:
            self.want_requeue = True
        else:
            self._hand_over()

    def _on_term(self, signum, frame):
        if self.training:
            self.want_save = True

    @staticmethod
    def describe(request: int) -> str:
        return ("preemption/time-limit signal: checkpoint saved at step {step} on all {world} process(es); "
                "requeueing" if request == REQUEUE else
                "SIGTERM: checkpoint saved at step {step} on all {world} process(es); going on until stopped")

    def _hand_over(self) -> None:
        if callable(self._orig):
            self._orig(self._sig, None)  # submitit: checkpoint(), scontrol requeue, sys.exit

    def agree(self, accelerator, local_loss: float | None = None) -> tuple[int, float | None]:
        """(request every rank agrees on, global loss): one all-reduce when world > 1."""
        if accelerator.num_processes == 1:
            return self.request, local_loss
        import torch

        t = torch.tensor([local_loss or 0.0, float(self.want_save), float(self.want_requeue)],
                         dtype=torch.float64, device=accelerator.device)
        torch.distributed.all_reduce(t)
        req = REQUEUE if t[2] > 0 else SAVE if t[1] > 0 else NONE
        return req, float(t[0])

    def requeue(self, accelerator) -> None:
        """After a consistent save on every rank: rank 0 hands over to submitit (which exits the
        process once the job is requeued); the others wait to be stopped by the requeue."""
        import torch.distributed as td

        rank0 = accelerator.is_main_process
        multi = accelerator.num_processes > 1
        if rank0:
            try:
                self._hand_over()
            except BaseException as e:
                if isinstance(e, SystemExit):
                    raise
                if multi:
                    td.barrier()  # release the other ranks: this run is not requeued
                raise
            raise UserError("preempted: the checkpoint is saved but the job could not be requeued")
        try:
            td.barrier()  # returns only when rank 0 failed to requeue
        except Exception:  # noqa: BLE001 - rank 0 exited: the job is being requeued
            time.sleep(60)
            raise SystemExit(0) from None
        raise UserError("preempted: the checkpoint is saved but the job was not requeued")

    def leave_training(self) -> None:
        self.training = False
        self.want_save = False
        if self.want_requeue:  # arrived after the last step's agreement: the final checkpoint is saved
            self.want_requeue = False
            self._hand_over()


def install_preemption_guard() -> PreemptionGuard:
    global _GUARD
    if _GUARD is None:
        _GUARD = PreemptionGuard().install()
    return _GUARD


def current_guard() -> PreemptionGuard | None:
    return _GUARD
