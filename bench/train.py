"""The one training loop for every method (Accelerate; DDP or DeepSpeed when distributed).

Determinism and resume: the batch of step k and all noise drawn at step k depend only on
(seed, k) — batches come from a per-epoch permutation seeded by (seed, epoch) and the global
RNG is re-seeded with (seed, k, rank) before each step — so a run resumed from a checkpoint at
step k replays exactly what the uninterrupted run would have done (on CPU, bit for bit).

Checkpoints: ``<run>/ckpt/step_XXXXXXX/`` with model (and EMA) weights in safetensors, the
optimizer and scheduler state, RNG states and ``state.json`` (step, tokens, loss curve). They
are written to a temp dir and renamed; only the latest is kept; the latest is loaded at start.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from bench.config import RunSpec
from bench.data import Blocks
from bench.errors import UserError
from bench.evaluate import batch_u


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
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model):
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(self.decay).add_(v.float(), alpha=1 - self.decay)

    def copy_to(self, model):
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})


# ----------------------------------------------------------------------------- checkpoints
def latest_checkpoint(run_dir: Path) -> Path | None:
    ck = sorted((Path(run_dir) / "ckpt").glob("step_*[0-9]"))
    ck = [c for c in ck if (c / "state.json").is_file()]
    return ck[-1] if ck else None


def save_checkpoint(run_dir: Path, step: int, model, opt, sched, ema, state: dict) -> None:
    from safetensors.torch import save_file

    root = Path(run_dir) / "ckpt"
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    if ema is not None:
        save_file(ema.shadow, tmp / "ema.safetensors")
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in root.glob("step_*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt: Path, model, opt, sched, ema) -> dict:
    from safetensors.torch import load_file

    f = ckpt / "model.safetensors"
    try:
        model.load_state_dict(load_file(f))
        if ema is not None:
            f = ckpt / "ema.safetensors"
            ema.shadow = load_file(f)
        f = ckpt / "optim.pt"
        blob = torch.load(f, weights_only=False)
        opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["torch_rng"])
        f = ckpt / "state.json"
        return json.loads(f.read_text())
    except Exception as e:  # noqa: BLE001 - any failure here means a corrupt checkpoint
        raise UserError(f"{f}: corrupt checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        f"delete {ckpt} to restart from the previous state") from None


# ----------------------------------------------------------------------------- loop
def train(method, spec: RunSpec, data: Blocks, run_dir: Path, accelerator, log=print) -> dict:
    cfg = spec.train
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % world:
        raise UserError(f"train.batch_size: {cfg.batch_size} is not divisible by the world size {world}")
    opt = torch.optim.AdamW(method.parameters(), lr=cfg.lr, betas=(0.9, 0.999),
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, cfg.warmup, cfg.steps))
    ema = EMA(method, cfg.ema) if cfg.ema > 0 else None
    state = {"step": 0, "tokens": 0, "losses": [], "wall_s": 0.0}
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        state = load_checkpoint(ckpt, method, opt, sched, ema)
        log(f"resuming from {ckpt.name} (step {state['step']})")
    resumed_from, wall_before = state["step"], state["wall_s"]
    model, opt = accelerator.prepare(method, opt)
    N, per_rank = len(data), cfg.batch_size // world
    t0, tokens_here = time.time(), 0
    bar = tqdm(range(state["step"], cfg.steps), initial=state["step"], total=cfg.steps,
               desc=f"train {spec.label}", disable=not accelerator.is_main_process, mininterval=2)
    for step in bar:
        torch.manual_seed(seed_of(spec.seed, step, rank))
        idx = batch_indices(step, cfg.batch_size, N, spec.seed)[rank * per_rank:(rank + 1) * per_rank]
        x = torch.as_tensor(data.tokens[idx], dtype=torch.long, device=accelerator.device)
        c = torch.as_tensor(data.counted[idx], dtype=torch.bool, device=accelerator.device)
        g = torch.Generator().manual_seed(seed_of(spec.seed, step, 1 << 20))
        u = batch_u(cfg.batch_size, g)[rank * per_rank:(rank + 1) * per_rank].to(accelerator.device)
        model.train()
        with accelerator.autocast():
            loss = model(x, c, u)
        accelerator.backward(loss)
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(accelerator.unwrap_model(model))
        ntok = int(c.sum()) * world
        state["tokens"] += ntok
        tokens_here += ntok
        state["losses"].append(round(float(loss.detach()), 6))
        state["step"] = step + 1
        el = time.time() - t0
        bar.set_postfix(loss=f"{state['losses'][-1]:.3f}", tok_s=f"{tokens_here / max(el, 1e-9):,.0f}", refresh=False)
        if state["step"] % cfg.ckpt_every == 0 or state["step"] == cfg.steps:
            state["wall_s"] = wall_before + el
            if accelerator.is_main_process:
                save_checkpoint(run_dir, state["step"], accelerator.unwrap_model(model), opt, sched, ema,
                                state)
            accelerator.wait_for_everyone()
    bar.close()
    el = time.time() - t0
    model = accelerator.unwrap_model(model)
    if ema is not None:
        ema.copy_to(model)
    losses = state["losses"]
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": state["step"], "tokens": state["tokens"], "resumed_from_step": resumed_from,
            "tokens_per_s": tokens_here / el if el > 0 and tokens_here else None,
            "wall_s": round(wall_before + el, 3), "final_loss": sum(tail) / len(tail) if tail else None,
            "loss_curve": losses[:: max(1, len(losses) // 100)]}
