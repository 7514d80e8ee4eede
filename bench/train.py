"""The one training loop for every method (Accelerate; DDP or DeepSpeed when distributed).

Stages: a method trains its ``stages`` in order (one, ``train``, unless it declares more). Each
stage has its settings (``spec.train.for_stage``), its optimizer, schedule and EMA over
``method.stage_parameters(stage)`` — requires_grad is set to exactly those before the model is
wrapped, so DDP registers and synchronises only them — and its checkpoints. Frozen parts
(``Method.add_frozen``) are no parameters: never optimised, averaged, synchronised or saved.

Determinism and resume: the batch of step k and all noise drawn at step k depend only on
(seed, k) — in stage s > 0 on (stage_seed(seed, s), k) — batches come from a per-epoch
permutation seeded by (seed, epoch) and the global RNG is re-seeded with (seed, k, o) before
each micro-batch, o = the offset of its first sequence in the global batch — so a run resumed from a checkpoint at step k replays exactly
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
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from bench.config import RunSpec
from bench.data import Blocks
from bench.errors import UserError
from bench.evaluate import batch_u
from bench import checkpoint
from bench.checkpoint import checkpoint_root, latest_checkpoint
from bench.rundir import PROGRESS


PROGRESS_EVERY_S = 2.0


def write_progress(run_dir: Path, **fields) -> None:
    """``<run>/progress.json``: the live numbers a suite's live view and ``tdbench status``
    read (phase, step/total, loss, tokens/s, ETA), rewritten atomically."""
    from bench.records import write_json

    write_json(Path(run_dir) / PROGRESS, {**fields, "updated": time.time()})


def lr_lambda(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def seed_of(*xs) -> int:
    """A deterministic 31-bit seed from integers (Python's hash() is salted for strings)."""
    return int(np.random.SeedSequence([int(x) for x in xs]).generate_state(1)[0]) & 0x7FFFFFFF


def batch_indices(step: int, batch: int, n: int, seed: int) -> np.ndarray:
    """Global batch of step ``step``: consecutive slots of per-epoch permutations."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, off = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[off: off + batch - len(out)].tolist())
    return np.asarray(out)


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


def train(method, spec: RunSpec, data: Blocks, run_dir: Path, accelerator, log=print,
          micro_batch: int | None = None, curve=None) -> dict:
    """Train ``method`` through its stages (``method.stages``, in order), each with its own
    settings (``spec.train.for_stage``), optimizer and schedule over its own parameters
    (``method.stage_parameters``), EMA and checkpoints. A multi-stage run resumes in the last
    stage that has a checkpoint (each checkpoint holds all of the method's weights, so the
    earlier stages' results come with it). ``curve`` (optional): a callable
    ``curve(model, step, tokens) -> dict`` called on the main process every ``curve.every``
    steps of the last stage; its points are kept in the checkpointed state."""
    from bench.distributed import is_deepspeed, param_checksum

    stages = tuple(method.stages)
    multi = len(stages) > 1
    if multi and is_deepspeed(accelerator):
        raise UserError(f"train.engine: deepspeed trains one model engine per run; {spec.method} trains in "
                        f"{len(stages)} stages; use ddp")
    roots = [checkpoint_root(run_dir, st if multi else None, i) for i, st in enumerate(stages)]
    start, ckpt = 0, None
    for i in reversed(range(len(stages))):
        ckpt = latest_checkpoint(run_dir, roots[i])
        if ckpt is not None:
            start = i
            break
    done: list[dict] = []   # what each finished stage did (kept in every later checkpoint)
    total = {"tokens_here": 0, "el": 0.0}
    requires = {id(p): p.requires_grad for p in method.parameters()}
    for i in range(start, len(stages)):
        last = i == len(stages) - 1
        out = _train_stage(method, spec, i, stages[i], data, run_dir, roots[i], ckpt if i == start else None,
                           done, requires, accelerator, log, micro_batch, curve if last else None)
        done = out["done"] + [out["stats"]]
        total["tokens_here"] += out["tokens_here"]
        total["el"] += out["el"]
        if i == start:
            resumed = {"resumed_from_step": out["resumed_from"]}
            if multi:
                resumed["resumed_in_stage"] = stages[start] if ckpt is not None else None
        if not last:   # the next stage wraps the method anew (DDP registers only its parameters)
            accelerator.unwrap_model(out["model"], keep_fp32_wrapper=False)
            method.__dict__.pop("_is_accelerate_prepared", None)
            accelerator.free_memory()
    model, state, cfg, plan = out["model"], out["state"], out["cfg"], out["plan"]
    for p in method.parameters():
        p.requires_grad_(requires[id(p)])
    world, ds = accelerator.num_processes, is_deepspeed(accelerator)
    unwrapped = accelerator.unwrap_model(model)
    checksums = None
    if not (ds and cfg.zero_stage == 3):
        mine = param_checksum(unwrapped)
        checksums = [mine]
        if world > 1:
            checksums = [None] * world
            torch.distributed.all_gather_object(checksums, mine)
    if out["ema"] is not None:
        out["ema"].copy_to(unwrapped)
    losses = state["losses"]
    el, tokens_here = total["el"], total["tokens_here"]
    stats = {"steps": sum(d["steps"] for d in done), "tokens": sum(d["tokens"] for d in done), **resumed,
             "tokens_per_s": tokens_here / el if el > 0 and tokens_here else None,
             "wall_s": round(sum(d["wall_s"] for d in done), 3), "final_loss": done[-1]["final_loss"],
             "loss_curve": losses[:: max(1, len(losses) // 100)],
             "world_size": world, "micro_batch": plan.micro, "grad_accum": plan.accum,
             "engine": "deepspeed" if ds else "ddp" if world > 1 else "single",
             "compiled": bool(cfg.compile), "fused_adamw": out["fused"],
             "param_checksums": checksums, "curve": state.get("curve", []),
             "curve_s": round(state.get("curve_s", 0.0), 3)}
    if multi:
        stats["stages"] = {d["stage"]: {k: v for k, v in d.items() if k != "stage"} for d in done}
    return stats


def _train_stage(method, spec: RunSpec, index: int, stage: str, data: Blocks, run_dir: Path, root: Path, ckpt,
                 done: list, requires: dict, accelerator, log, micro_batch, curve) -> dict:
    """One stage: its optimizer, schedule and EMA over its parameters, from its checkpoint
    ``ckpt`` (or from the method as it is), to its ``steps``."""
    from bench.distributed import NONE, REQUEUE, batch_plan, current_guard, is_deepspeed

    multi = len(method.stages) > 1
    cfg = spec.train.for_stage(stage)
    seed = stage_seed(spec.seed, index)
    world, rank = accelerator.num_processes, accelerator.process_index
    plan = batch_plan(cfg.batch_size, world, micro_batch)
    ds = is_deepspeed(accelerator)
    if ds and cfg.ema > 0 and cfg.zero_stage == 3:
        raise UserError("train.ema: EMA is not supported with ZeRO-3 (parameters are partitioned); "
                        "use zero_stage 1 or 2")
    scalars = [n for n, p in method.named_parameters() if p.dim() == 0] if ds else []
    if scalars:   # DeepSpeed's start-up broadcast takes a byte view of each parameter
        raise UserError(f"train.engine: deepspeed cannot broadcast 0-dim parameters of {spec.label} "
                        f"({', '.join(scalars)}); give them shape (1,)")
    params = stage_parameters(method, stage, requires)
    method.current_stage = stage
    # the fused AdamW kernel (one pass per parameter tensor): on GPUs, and on CPUs too, where the
    # per-tensor loop of elementwise ops took ~30% of a 12 × 768 CPU step (4.6× slower in isolation)
    fused = accelerator.device.type in ("cuda", "cpu") and not ds
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999),
                            weight_decay=cfg.weight_decay, **({"fused": True} if fused else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, cfg.warmup, cfg.steps))
    every = len(params) == len(list(method.parameters()))
    ema_keys = None if every else {n for n, p in method.named_parameters() if p.requires_grad}
    ema = EMA(method, cfg.ema, ema_keys) if cfg.ema > 0 else None
    state = {"step": 0, "tokens": 0, "losses": [], "wall_s": 0.0}
    if ckpt is not None and not ds:
        state = checkpoint.load(ckpt, method, opt, sched, ema)
    model, opt = accelerator.prepare(method, opt)
    forward = torch.compile(model) if cfg.compile else model  # train.compile: the forward only
    if ckpt is not None and ds:
        state = checkpoint.load_deepspeed(ckpt, accelerator, model, sched, ema)
    state.pop("world_size", None)
    if ckpt is not None:
        method.check_frozen(state.get("frozen"))
        done = state.get("stages_done", done)
        where = f"stage {stage} ({index + 1}/{len(method.stages)}) " if multi else ""
        log(f"resuming {where}from {ckpt.name} (step {state['step']})")
    elif multi:
        log(f"stage {stage} ({index + 1}/{len(method.stages)}): {cfg.steps} steps, batch {cfg.batch_size}, "
            f"lr {cfg.lr:g}, {sum(p.numel() for p in params):,} trained parameters")
    if multi:
        state.update(stage=stage, stage_index=index, stages_done=done)
    if method.frozen_modules():
        state["frozen"] = method.frozen_info()
    resumed_from, wall_before = state["step"], state["wall_s"]
    N = len(data)
    # DeepSpeed divides each micro-batch's loss by accum itself; DDP averages over ranks.
    scale = world * (plan.accum if ds else 1)
    guard = current_guard()
    t0, tokens_here = time.time(), 0
    desc = f"train {spec.label}" + (f" [{stage}]" if multi else "")
    bar = tqdm(range(state["step"], cfg.steps), initial=state["step"], total=cfg.steps,
               desc=desc, disable=not accelerator.is_main_process, mininterval=2)
    if guard is not None:
        guard.training = True
    main = accelerator.is_main_process
    last_progress = 0.0
    phase = f"train:{stage}" if multi else "train"

    def progress(phase: str) -> None:
        el_ = time.time() - t0
        rate = tokens_here / el_ if el_ > 0 and tokens_here else None
        done_ = state["step"] - resumed_from
        eta = (cfg.steps - state["step"]) * el_ / done_ if done_ > 0 else None
        write_progress(run_dir, phase=phase, step=state["step"], total=cfg.steps,
                       loss=state["losses"][-1] if state["losses"] else None, tokens_per_s=rate,
                       eta_s=eta, pid=os.getpid())

    if main:
        progress(phase)
    for step in bar:
        gidx = batch_indices(step, cfg.batch_size, N, seed)
        C = max(int(data.counted[gidx].sum()), 1)
        g = torch.Generator().manual_seed(seed_of(seed, step, 1 << 20))
        u_all = batch_u(cfg.batch_size, g)
        model.train()
        step_loss = 0.0
        for j in range(plan.accum):
            off = rank * plan.per_rank + j * plan.micro
            torch.manual_seed(seed_of(seed, step, off))
            idx = gidx[off:off + plan.micro]
            x = torch.as_tensor(data.tokens[idx], dtype=torch.long, device=accelerator.device)
            c = torch.as_tensor(data.counted[idx], dtype=torch.bool, device=accelerator.device)
            u = u_all[off:off + plan.micro].to(accelerator.device)
            last = j == plan.accum - 1
            w = int(c.sum()) / C
            with accelerator.autocast():
                loss = forward(x, c, u)
            scaled = loss if w * scale == 1.0 else loss * (w * scale)
            if ds:
                accelerator.deepspeed_engine_wrapped.backward(scaled, sync_gradients=last)
            elif last or world == 1:
                accelerator.backward(scaled)
            else:
                with accelerator.no_sync(model):
                    accelerator.backward(scaled)
            step_loss += float(loss.detach()) if w == 1.0 else float(loss.detach()) * w
        if cfg.grad_clip > 0 and not ds:
            accelerator.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(accelerator.unwrap_model(model))
        request = NONE
        if guard is not None:
            request, step_loss = guard.agree(accelerator, step_loss)
        elif world > 1:
            t = torch.tensor([step_loss], dtype=torch.float64, device=accelerator.device)
            torch.distributed.all_reduce(t)
            step_loss = float(t[0])
        state["tokens"] += C
        tokens_here += C
        state["losses"].append(round(step_loss, 6))
        state["step"] = step + 1
        if curve is not None and state["step"] % curve.every == 0 and accelerator.is_main_process:
            tc = time.time()
            state.setdefault("curve", []).append(curve(accelerator.unwrap_model(model), state["step"],
                                                       state["tokens"]))
            state["curve_s"] = state.get("curve_s", 0.0) + time.time() - tc
        el = time.time() - t0
        bar.set_postfix(loss=f"{state['losses'][-1]:.3f}", tok_s=f"{tokens_here / max(el, 1e-9):,.0f}", refresh=False)
        if main and (time.time() - last_progress >= PROGRESS_EVERY_S or state["step"] == cfg.steps):
            progress(phase)
            last_progress = time.time()
        if state["step"] % cfg.ckpt_every == 0 or state["step"] == cfg.steps or request != NONE:
            state["wall_s"] = wall_before + el
            if multi:
                state["stage_complete"] = state["step"] == cfg.steps   # the record that the stage is done
            if ds:
                checkpoint.save_deepspeed(root, state["step"], accelerator, model, sched, ema, state)
            else:
                if accelerator.is_main_process:
                    checkpoint.save(root, state["step"], accelerator.unwrap_model(model), opt, sched, ema,
                                    state)
                accelerator.wait_for_everyone()
        if request != NONE:
            guard.handled(request)
            log(guard.describe(request).format(step=state["step"], world=world))
            if request == REQUEUE:
                bar.close()
                guard.requeue(accelerator)
    if guard is not None:
        guard.leave_training()
    bar.close()
    el = time.time() - t0
    if ema is not None and multi and index < len(method.stages) - 1:
        ema.copy_to(method)   # the next stage starts from this stage's averaged weights
    losses = state["losses"]
    tail = losses[-max(1, len(losses) // 10):]
    stats = {"stage": stage, "steps": state["step"], "tokens": state["tokens"],
             "wall_s": round(wall_before + el, 3), "final_loss": sum(tail) / len(tail) if tail else None}
    if multi:
        stats.update(batch_size=cfg.batch_size, lr=cfg.lr)
    return {"model": model, "state": state, "cfg": cfg, "plan": plan, "ema": ema, "fused": fused,
            "stats": stats, "done": done, "tokens_here": tokens_here, "el": el, "resumed_from": resumed_from}

