"""The one training loop for every method (Accelerate; DDP or DeepSpeed when distributed).

Stages: a method trains its ``stages`` in order (one, ``train``, unless it declares more). Each
stage has its settings (``spec.train.for_stage``), its optimizer, schedule and EMA over
``method.stage_parameters(stage)`` — requires_grad is set to exactly those before the model is
wrapped, so DDP registers and synchronises only them — and its checkpoints. Frozen parts
(``Method.add_frozen``) are no parameters: never optimised, averaged, synchronised or saved.

Determinism and resume: the batch of step k and all noise drawn at step k depend only on
(seed, k) — in stage s > 0 on (stage_seed(seed, s), k) — batches come from a per-epoch
permutation seeded by (seed, epoch) (or, for a synthetic source's ``train_blocks: stream``,
are drawn fresh from the source seeded by (seed, k): bench.data.StreamBlocks) and the global
RNG is re-seeded with (seed, k, o) before each micro-batch, o = the offset of its first
sequence in the global batch — so a run resumed from a checkpoint at step k replays exactly
what the uninterrupted run would have done (on CPU, bit for bit).

Distributed: the global batch (``train.batch_size``) and the time draws u (stratified over the
global batch) are the same whatever the world size; process r takes its slice of both, in
``accum`` micro-batches (bench.distributed.batch_plan). The objective is exactly the global
per-token mean: micro-batch m's loss is weighted by c_m / C · world (c_m its counted tokens, C
the global batch's, known on every rank without communication) so that DDP's gradient
average gives Σ_m loss_m · c_m / C. Because the noise of a micro-batch depends on its offset,
W processes with micro-batch b compute what one process computes with micro-batch b and W
accumulation steps, up to float summation order.

Checkpoints (bench.checkpoint): every ``train.ckpt_every`` steps and at the end of each stage,
with the model, EMA, optimizer, scheduler and RNG state and the loop's state (step, tokens, loss
curve); the latest is loaded at start (of a multi-stage run: the latest of its last stage that
has one; the run goes on in that stage), and the frozen parts' sources and hashes recorded in
it are checked. Under Slurm a preemption signal makes every rank save at the next step
boundary (bench.distributed.PreemptionGuard) before the requeue.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from bench.checkpoint import checkpoint_root, first_intact
from bench.config import RunSpec
from bench.data import Blocks, StreamBlocks
from bench.distributed import NONE, REQUEUE, batch_plan, current_guard
from bench.engine import PlainEngine, make_engine
from bench.evaluate import batch_u
from bench.lease import LeaseLost
from bench.progress import Progress, recent_loss, windowed


def lr_lambda(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def seed_of(*xs) -> int:
    """A deterministic 31-bit seed from integers (Python's hash() is salted for strings)."""
    return int(np.random.SeedSequence([int(x) for x in xs]).generate_state(1)[0]) & 0x7FFFFFFF


class EMA:
    """Exponential moving average of the model's state (``keys=None``: all of it, the
    single-stage case) or of the entries ``keys`` (a stage's parameters)."""

    def __init__(self, model: torch.nn.Module, decay: float, keys=None):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()
                       if keys is None or k in keys}

    @torch.no_grad()
    def update(self, model):
        for k, v in model.state_dict().items():
            if k in self.shadow and v.dtype.is_floating_point:
                self.shadow[k].mul_(self.decay).add_(v.float(), alpha=1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model):
        state = model.state_dict()
        for k, v in self.shadow.items():
            state[k].copy_(v.to(state[k].dtype))


# ----------------------------------------------------------------------------- loop
def stage_seed(seed: int, index: int) -> int:
    """The seed stage ``index`` draws its batches and noise from: the run's own seed for the
    first stage (a single-stage run is what it always was), a derived one for each later
    stage, so that every draw depends on (seed, stage, step) only."""
    return seed if index == 0 else seed_of(seed, index, 1 << 22)


def stage_parameters(method, stage: str, requires: dict[int, bool]) -> list[torch.nn.Parameter]:
    """``method.stage_parameters(stage)``, checked, with requires_grad set to exactly them
    (asked with every parameter's requires_grad as the method built it, ``requires``)."""
    for p in method.parameters():
        p.requires_grad_(requires[id(p)])
    mine = {id(p) for p in method.parameters()}
    params = list(method.stage_parameters(stage))
    if not params or any(id(p) not in mine for p in params):
        raise ValueError(f"{type(method).__name__}.stage_parameters('{stage}') must return a non-empty list of "
                         f"the method's own parameters")
    train_ids = {id(p) for p in params}
    for p in method.parameters():
        p.requires_grad_(id(p) in train_ids)
    return params


def train(method, spec: RunSpec, data: Blocks | StreamBlocks, run_dir: Path, accelerator, log=print,
          micro_batch: int | None = None, curve=None, writer=None, tracker=None) -> dict:
    """Train ``method`` through its stages (``method.stages``, in order), each with its own
    settings (``spec.train.for_stage``), optimizer and schedule over its own parameters
    (``method.stage_parameters``), EMA and checkpoints; returns the record's training stats.
    A multi-stage run resumes in the last stage that has a checkpoint (each checkpoint holds
    all of the method's weights, so the earlier stages' results come with it). ``curve``
    (optional): a callable ``curve(model, step, tokens) -> dict`` called on the main process
    every ``curve.every`` steps of the last stage; its points are kept in the checkpointed
    state. ``writer``: the run's lease (bench.lease.Lease), checked before every checkpoint is
    published; LeaseLost when it is lost. ``tracker``: the run's experiment trackers
    (bench.tracking.start_tracker; they log on the main process only), told of every step."""
    engine = make_engine(accelerator)
    engine.check_stages(spec, tuple(method.stages))
    training = Training(method, spec, data, Path(run_dir), accelerator, engine, log, micro_batch,
                        {id(p): p.requires_grad for p in method.parameters()}, writer, tracker)
    start, ckpt = resume_point(training)
    if ckpt is None:   # a fresh run: what the method computes from the training set (a checkpoint holds it)
        fit_training_set(method, data, accelerator, log)
    done, results = [], []
    for i in range(start, len(training.stages)):
        last = i == len(training.stages) - 1
        stage = Stage(training, i, curve if last else None)
        stage.build()
        stage.resume(ckpt if i == start else None, done)
        results.append(stage.run())
        done = results[-1].done + [results[-1].stats]
        if not last:   # the next stage wraps the method anew (DDP registers only its parameters)
            engine.release(stage.model, method)
    resumed = {"resumed_from_step": results[0].resumed_from}
    if training.multi:
        resumed["resumed_in_stage"] = training.stages[start] if ckpt is not None else None
    return run_stats(training, stage, results, resumed)


def fit_training_set(method, data, accelerator, log) -> None:
    """``method.fit_training_set(data)`` on the training device, under the training autocast,
    without gradient; its line (and the time it took) into the run's log."""
    t0 = time.time()
    method.to(accelerator.device)
    with torch.no_grad(), accelerator.autocast():
        note = method.fit_training_set(data)
    if note:
        log(f"{note} ({time.time() - t0:.1f} s)")


@dataclass(frozen=True)
class Training:
    """What every stage of one :func:`train` call shares."""

    method: torch.nn.Module
    spec: RunSpec
    data: Blocks | StreamBlocks
    run_dir: Path
    accelerator: object
    engine: PlainEngine
    log: Callable[[str], None]
    micro_batch: int | None
    requires: dict[int, bool]   # every parameter's requires_grad as the method built it
    writer: object = None       # the run's lease: its token names the staging dirs; checked before publishing
    tracker: object = None      # bench.tracking's RunTracker (launch.log_with, main process) or Off

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(self.method.stages)

    @property
    def multi(self) -> bool:
        return len(self.stages) > 1


def resume_point(training: Training) -> tuple[int, Path | None]:
    """(stage index, checkpoint) to start from: the newest intact checkpoint (sizes and hashes
    against its manifest) of the last stage that has one, else (0, None). A torn or damaged
    newer one is skipped, saying so in the log; UserError when checkpoints exist but none is
    intact."""
    roots = [checkpoint_root(training.run_dir, training.stages[i] if training.multi else None, i)
             for i in reversed(range(len(training.stages)))]
    ckpt = first_intact(roots, full=True, log=training.log)
    if ckpt is None:
        return 0, None
    return len(roots) - 1 - roots.index(ckpt.parent), ckpt


@dataclass(frozen=True)
class StageResult:
    stats: dict          # the stage's line of the record (steps, tokens, wall_s, final_loss …)
    done: list[dict]     # the lines of the stages finished before it (from its checkpoint on resume)
    resumed_from: int    # the step it started from (0: the beginning)
    tokens_here: int     # tokens it trained in this process's lifetime (not before a resume)
    elapsed: float       # seconds it trained in this process's lifetime


def run_stats(training: Training, last: "Stage", results: list[StageResult], resumed: dict) -> dict:
    """The record's training stats after the ``last`` stage; the method is left with its
    trained requires_grad flags back and the EMA weights (if any) in it."""
    acc = training.accelerator
    for p in training.method.parameters():
        p.requires_grad_(training.requires[id(p)])
    unwrapped = acc.unwrap_model(last.model)
    checksums = training.engine.checksums(unwrapped, last.cfg)
    if last.ema is not None:
        last.ema.copy_to(unwrapped)
    done = results[-1].done + [results[-1].stats]
    losses, state = last.state["losses"], last.state
    el, tokens_here = sum(r.elapsed for r in results), sum(r.tokens_here for r in results)
    stats = {"steps": sum(d["steps"] for d in done), "tokens": sum(d["tokens"] for d in done), **resumed,
             "tokens_per_s": tokens_here / el if el > 0 and tokens_here else None,
             "wall_s": round(sum(d["wall_s"] for d in done), 3), "final_loss": done[-1]["final_loss"],
             "loss_curve": windowed(losses, max(1, len(losses) // 100)),
             "world_size": acc.num_processes, "micro_batch": last.plan.micro, "grad_accum": last.plan.accum,
             "engine": training.engine.name, "compiled": bool(last.cfg.compile),
             "fused_adamw": training.engine.fused_adamw,
             "param_checksums": checksums, "curve": state.get("curve", []),
             "curve_s": round(state.get("curve_s", 0.0), 3)}
    if training.multi:
        stats["stages"] = {d["stage"]: {k: v for k, v in d.items() if k != "stage"} for d in done}
    return stats


class Stage:
    """One stage of a run: its settings, batch plan and seed; :meth:`build` its optimizer,
    schedule and EMA over its parameters; :meth:`resume` from its checkpoint (or from the
    method as it is); :meth:`run` to its ``steps``, one :meth:`step` at a time."""

    def __init__(self, training: Training, index: int, curve=None):
        self.training, self.index, self.curve = training, index, curve
        self.name = training.stages[index]
        self.cfg = training.spec.train.for_stage(self.name)
        self.seed = stage_seed(training.spec.seed, index)
        self.plan = batch_plan(self.cfg.batch_size, training.accelerator.num_processes, training.micro_batch)
        self.scale = training.engine.loss_scale(self.plan)
        self.root = checkpoint_root(training.run_dir, self.name if training.multi else None, index)
        self.where = f"stage {self.name} ({index + 1}/{len(training.stages)}) " if training.multi else ""
        self.tokens_here = 0

    def build(self) -> None:
        """Optimizer, schedule and EMA over the stage's parameters (requires_grad set to them)."""
        training, cfg = self.training, self.cfg
        training.engine.check(training.method, cfg, training.spec.label)
        self.params = stage_parameters(training.method, self.name, training.requires)
        training.method.current_stage = self.name
        fused = {"fused": True} if training.engine.fused_adamw else {}
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                                     **fused)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_lambda(s, cfg.warmup, cfg.steps))
        every = len(self.params) == len(list(training.method.parameters()))
        keys = None if every else {n for n, p in training.method.named_parameters() if p.requires_grad}
        self.ema = EMA(training.method, cfg.ema, keys) if cfg.ema > 0 else None

    def resume(self, ckpt: Path | None, done: list[dict]) -> None:
        """Wrap the method for training, restored from ``ckpt`` (None: as it is); ``done``: the
        stats of the stages finished before this one (a checkpoint brings its own)."""
        training, cfg = self.training, self.cfg
        self.model, self.opt, state = training.engine.prepare(training.method, self.opt, self.sched, self.ema, ckpt)
        self.forward = torch.compile(self.model) if cfg.compile else self.model  # train.compile: the forward only
        if state is None:
            state = {"step": 0, "tokens": 0, "losses": [], "wall_s": 0.0}
        state.pop("world_size", None)
        if ckpt is not None:
            training.method.check_frozen(state.get("frozen"))
            done = state.get("stages_done", done)
            training.log(f"resuming {self.where}from {ckpt.name} (step {state['step']})")
        elif training.multi:
            training.log(f"{self.where.rstrip()}: {cfg.steps} steps, batch {cfg.batch_size}, lr {cfg.lr:g}, "
                         f"{sum(p.numel() for p in self.params):,} trained parameters")
        if training.multi:
            state.update(stage=self.name, stage_index=self.index, stages_done=done)
        if training.method.frozen_modules():
            state["frozen"] = training.method.frozen_info()
        self.state, self.done = state, done
        self.resumed_from, self.wall_before = state["step"], state["wall_s"]

    def step(self, k: int) -> tuple[int, float]:
        """Optimizer step ``k``: this process's share of global batch ``k`` in ``accum``
        micro-batches, then the update. Returns (the global batch's counted tokens C, this
        process's share of the step's loss)."""
        cfg, plan = self.cfg, self.plan
        batch = self.training.data.batch(k, cfg.batch_size, self.seed)
        C = max(int(batch.counted.sum()), 1)
        u_all = batch_u(cfg.batch_size, torch.Generator().manual_seed(seed_of(self.seed, k, 1 << 20)))
        self.training.method.before_step(self.name, k)
        self.model.train()
        loss = 0.0
        for j in range(plan.accum):
            off = self.training.accelerator.process_index * plan.per_rank + j * plan.micro
            loss += self.micro_step(k, off, batch.tokens[off:off + plan.micro], batch.counted[off:off + plan.micro],
                                    u_all[off:off + plan.micro], C, last=j == plan.accum - 1)
        self.training.engine.clip(self.params, cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.training.accelerator.unwrap_model(self.model))
        return C, loss

    def micro_step(self, k: int, off: int, tokens, counted, u, C: int, last: bool) -> float:
        """Forward and backward of the micro-batch (``tokens``, ``counted``) at offset ``off`` of
        global batch ``k``; its loss is weighted by its share of the batch's counted tokens
        (c / C, times the engine's scale for the gradient). Returns its weighted loss."""
        acc = self.training.accelerator
        torch.manual_seed(seed_of(self.seed, k, off))
        x = torch.as_tensor(tokens, dtype=torch.long, device=acc.device)
        c = torch.as_tensor(counted, dtype=torch.bool, device=acc.device)
        w = int(c.sum()) / C
        with acc.autocast():
            loss = self.forward(x, c, u.to(acc.device))
        scale = w * self.scale
        self.training.engine.backward(self.model, loss if scale == 1.0 else loss * scale, last)
        return float(loss.detach()) if w == 1.0 else float(loss.detach()) * w

    def account(self, k: int, C: int, loss: float) -> None:
        """Step ``k`` is done: its tokens, its (global) loss and, when due, a curve point."""
        state, acc = self.state, self.training.accelerator
        state["tokens"] += C
        self.tokens_here += C
        state["losses"].append(round(loss, 6))
        state["step"] = k + 1
        if self.curve is not None and state["step"] % self.curve.every == 0 and acc.is_main_process:
            tc = time.time()
            state.setdefault("curve", []).append(self.curve(acc.unwrap_model(self.model), state["step"],
                                                            state["tokens"]))
            state["curve_s"] = state.get("curve_s", 0.0) + time.time() - tc

    def checkpoint(self, elapsed: float) -> None:
        """Checkpoint the stage at its current step (``elapsed``: seconds trained since start)."""
        state = self.state
        state["wall_s"] = self.wall_before + elapsed
        if self.training.multi:
            state["stage_complete"] = state["step"] == self.cfg.steps   # the record that the stage is done
        self.training.engine.save(self.root, state["step"], self.model, self.opt, self.sched, self.ema, state,
                                  self.training.writer)

    def run(self) -> StageResult:
        """Train from the resumed step to the last, checkpointing every ``ckpt_every`` steps, at
        the end and when a preemption signal asks for it."""
        training, cfg, state = self.training, self.cfg, self.state
        guard, t0 = current_guard(), time.time()
        bar = tqdm(range(state["step"], cfg.steps), initial=state["step"], total=cfg.steps,
                   desc=f"train {training.spec.label}" + (f" [{self.name}]" if training.multi else ""),
                   disable=not training.accelerator.is_main_process, mininterval=2)
        if guard is not None:
            guard.training = True
        progress = Progress(self, t0)
        lone = training.accelerator.num_processes == 1   # (ranks would wait for a rank that stopped)
        for k in bar:
            if lone and getattr(training.writer, "lost", None):
                raise LeaseLost(f"lease lost: {training.writer.lost}")
            C, loss = self.step(k)
            request, loss = agree(guard, training.accelerator, loss)
            self.account(k, C, loss)
            el = time.time() - t0
            bar.set_postfix(loss=f"{recent_loss(state['losses']):.3f}",
                            tok_s=f"{self.tokens_here / max(el, 1e-9):,.0f}", refresh=False)
            progress.tick()
            if training.tracker is not None:
                training.tracker.step(self, el)
            if state["step"] % cfg.ckpt_every == 0 or state["step"] == cfg.steps or request != NONE:
                self.checkpoint(el)
            if request != NONE:
                honour(guard, request, training.accelerator, training.log, state["step"], bar)
        if guard is not None:
            guard.leave_training()
        bar.close()
        el = time.time() - t0
        if self.ema is not None and training.multi and self.index < len(training.stages) - 1:
            self.ema.copy_to(training.method)   # the next stage starts from this stage's averaged weights
        return StageResult(self.stats(el), self.done, self.resumed_from, self.tokens_here, el)

    def stats(self, elapsed: float) -> dict:
        """The stage's line of the record; its final loss is the mean of its last tenth of steps."""
        losses = self.state["losses"]
        tail = losses[-max(1, len(losses) // 10):]
        out = {"stage": self.name, "steps": self.state["step"], "tokens": self.state["tokens"],
               "wall_s": round(self.wall_before + elapsed, 3), "final_loss": sum(tail) / len(tail) if tail else None}
        if self.training.multi:
            out.update(batch_size=self.cfg.batch_size, lr=self.cfg.lr)
        return out


def agree(guard, accelerator, loss: float) -> tuple[int, float]:
    """(the preemption request every rank agrees on, the step's global loss): the guard's one
    all-reduce of both, or without a guard an all-reduce of the loss when world > 1."""
    if guard is not None:
        return guard.agree(accelerator, loss)
    if accelerator.num_processes > 1:
        t = torch.tensor([loss], dtype=torch.float64, device=accelerator.device)
        torch.distributed.all_reduce(t)
        loss = float(t[0])
    return NONE, loss


def honour(guard, request: int, accelerator, log, step: int, bar) -> None:
    """After the checkpoint a preemption signal asked for: say so, and on a requeue request
    hand over to the scheduler (which ends this process)."""
    guard.handled(request)
    log(guard.describe(request).format(step=step, world=accelerator.num_processes))
    if request == REQUEUE:
        bar.close()
        guard.requeue(accelerator)
