"""The engine a run trains under: plain PyTorch (one process, or DDP) or DeepSpeed ZeRO.

Chosen once per run from the accelerator (:func:`make_engine`); the training loop
(bench.train) calls the same methods whatever the engine and never asks which it is. What
differs:

- preparing: a plain run restores its checkpoint into the bare method and optimizer and then
  wraps them; DeepSpeed wraps first and restores into its engine (ZeRO shards);
- the loss scale: DDP averages gradients over ranks (a micro-batch's loss is scaled by the
  world size); DeepSpeed also divides each micro-batch's loss by the accumulation steps itself;
- backward: DDP skips the gradient all-reduce on all but the last micro-batch of a step;
  DeepSpeed is told where the accumulation boundary is and steps its optimizer there;
- clipping: Accelerate's for plain runs; DeepSpeed clips inside its own step;
- the fused AdamW kernel: plain runs only (DeepSpeed wraps the optimizer);
- checkpoints: bench.checkpoint's plain or DeepSpeed saver and loader (published only while
  the run's lease is held: LeaseLost on every rank otherwise);
- the replicas' parameter checksums: none under ZeRO-3 (parameters are partitioned).
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from bench import checkpoint
from bench.errors import UserError
from bench.lease import LeaseLost


def broadcast_object_list(objs: list, from_process: int = 0) -> list:
    from accelerate.utils import broadcast_object_list as bcast

    return bcast(objs, from_process=from_process)


class PlainEngine:
    """One process, or DDP over several (Accelerate's own wrapping)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.world = accelerator.num_processes
        self.name = "ddp" if self.world > 1 else "single"
        # the fused AdamW kernel (one pass per parameter tensor): on GPUs, and on CPUs too, where
        # the unfused per-tensor loop of elementwise ops is a large share of a small model's step
        self.fused_adamw = accelerator.device.type in ("cuda", "cpu")

    def check_stages(self, spec, stages: tuple[str, ...]) -> None:
        """UserError if the method's stages cannot train under this engine."""

    def check(self, method, cfg, label: str) -> None:
        """UserError if ``method`` cannot train with settings ``cfg`` under this engine."""

    def loss_scale(self, plan) -> int:
        """The factor on a micro-batch's share of the global loss that makes the engine's
        gradient reduction give the global per-token mean (DDP averages over ranks)."""
        return self.world

    def prepare(self, method, opt, sched, ema, ckpt: Path | None):
        """(model, optimizer, checkpointed state or None): ``method`` and ``opt`` wrapped for
        training, restored first from ``ckpt`` when given (with ``sched``, ``ema`` and the RNG)."""
        state = checkpoint.load(ckpt, method, opt, sched, ema) if ckpt is not None else None
        model, opt = self.accelerator.prepare(method, opt)
        return model, opt, state

    def backward(self, model, loss, last: bool) -> None:
        """Backward of one micro-batch; gradients are reduced over ranks on the ``last`` one of
        the step only (with one process ``no_sync`` is a no-op)."""
        with nullcontext() if last else self.accelerator.no_sync(model):
            self.accelerator.backward(loss)

    def clip(self, params, max_norm: float) -> None:
        if max_norm > 0:
            self.accelerator.clip_grad_norm_(params, max_norm)

    def save(self, root: Path, step: int, model, opt, sched, ema, state: dict, writer=None) -> None:
        """Checkpoint ``step`` under ``root``, written by the main process if ``writer`` (the
        run's lease) still holds the run; every rank waits, and raises LeaseLost if it did not."""
        lost = None
        if self.accelerator.is_main_process:
            try:
                checkpoint.save(root, step, self.accelerator.unwrap_model(model), opt, sched, ema, state, writer)
            except LeaseLost as e:
                lost = str(e)
        if self.world > 1:
            lost = broadcast_object_list([lost], from_process=0)[0]   # (also the barrier)
        if lost:
            raise LeaseLost(lost)

    def release(self, model, method) -> None:
        """Unwrap ``method`` so that the next stage prepares it anew (DDP then registers only
        that stage's parameters)."""
        self.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        method.__dict__.pop("_is_accelerate_prepared", None)
        self.accelerator.free_memory()

    def checksums(self, module, cfg) -> list[str] | None:
        """Every rank's checksum of ``module``'s parameters (replicas must agree bit for bit)."""
        import torch

        from bench.distributed import param_checksum

        mine = param_checksum(module)
        if self.world == 1:
            return [mine]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, mine)
        return out


class DeepSpeedEngine(PlainEngine):
    """DeepSpeed ZeRO 0–3 through Accelerate's DeepSpeed plugin (bench.distributed)."""

    def __init__(self, accelerator):
        super().__init__(accelerator)
        self.name = "deepspeed"
        self.fused_adamw = False

    def check_stages(self, spec, stages: tuple[str, ...]) -> None:
        if len(stages) > 1:
            raise UserError(f"train.engine: deepspeed trains one model engine per run; {spec.method} trains in "
                            f"{len(stages)} stages; use ddp")

    def check(self, method, cfg, label: str) -> None:
        if cfg.ema > 0 and cfg.zero_stage == 3:
            raise UserError("train.ema: EMA is not supported with ZeRO-3 (parameters are partitioned); "
                            "use zero_stage 1 or 2")
        scalars = [n for n, p in method.named_parameters() if p.dim() == 0]
        if scalars:   # DeepSpeed's start-up broadcast takes a byte view of each parameter
            raise UserError(f"train.engine: deepspeed cannot broadcast 0-dim parameters of {label} "
                            f"({', '.join(scalars)}); give them shape (1,)")

    def loss_scale(self, plan) -> int:
        return self.world * plan.accum   # DeepSpeed divides each micro-batch's loss by accum

    def prepare(self, method, opt, sched, ema, ckpt: Path | None):
        model, opt = self.accelerator.prepare(method, opt)
        state = checkpoint.load_deepspeed(ckpt, self.accelerator, model, sched, ema) if ckpt is not None else None
        return model, opt, state

    def backward(self, model, loss, last: bool) -> None:
        # Accelerate hands its sync_gradients flag to DeepSpeed as the accumulation boundary
        # (DeepSpeed reduces the gradients and steps its optimizer there)
        self.accelerator.sync_gradients = last
        self.accelerator.backward(loss)

    def clip(self, params, max_norm: float) -> None:
        pass   # DeepSpeed clips in its own step (its config's gradient_clipping)

    def save(self, root: Path, step: int, model, opt, sched, ema, state: dict, writer=None) -> None:
        """Collective: every rank writes its ZeRO shard."""
        checkpoint.save_deepspeed(root, step, self.accelerator, model, sched, ema, state, writer)

    def checksums(self, module, cfg) -> list[str] | None:
        return None if cfg.zero_stage == 3 else super().checksums(module, cfg)


def make_engine(accelerator) -> PlainEngine:
    from bench.distributed import is_deepspeed

    return DeepSpeedEngine(accelerator) if is_deepspeed(accelerator) else PlainEngine(accelerator)
