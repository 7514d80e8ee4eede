"""What a training run shows while it runs: ``<run>/progress.json`` (the live view and ``tdbench
status`` read it: phase, step/total, loss, tokens/s, ETA) and the loss it shows — the mean of the
last LOSS_WINDOW steps, as training.png's points are window means (bench.train keeps the
per-step losses; this module only summarises and writes them)."""
from __future__ import annotations

import os
import time
from pathlib import Path

from bench.rundir import PROGRESS

PROGRESS_EVERY_S = 2.0
# The loss shown while training (progress bar, progress.json: live view, status) is the mean of the
# last LOSS_WINDOW steps and training.png's points are window means: one batch's loss is far
# noisier (SEDD Uniform, synthetic suite: sd 0.17 nats/token) than what it is compared with.
LOSS_WINDOW = 50


def windowed(losses: list[float], w: int) -> list[float]:
    """Means of consecutive windows of ``w`` steps (the last one shorter)."""
    return [round(sum(c) / len(c), 6) for c in (losses[i:i + w] for i in range(0, len(losses), w))]


def recent_loss(losses: list[float]) -> float | None:
    """The mean loss of the last LOSS_WINDOW steps (None before the first)."""
    tail = losses[-LOSS_WINDOW:]
    return sum(tail) / len(tail) if tail else None


def write_progress(run_dir: Path, **fields) -> None:
    """``<run>/progress.json``: the live numbers a suite's live view and ``tdbench status``
    read (phase, step/total, loss, tokens/s, ETA), rewritten atomically."""
    from bench.records import write_json

    write_json(Path(run_dir) / PROGRESS, {**fields, "updated": time.time()})



class Progress:
    """A stage's ``progress.json``, written by the main process at the start, then at most every
    PROGRESS_EVERY_S seconds and at its last step."""

    def __init__(self, stage, t0: float):   # a bench.train.Stage
        self.stage, self.t0, self.last = stage, t0, 0.0
        self.phase = f"train:{stage.name}" if stage.training.multi else "train"
        self.on = stage.training.accelerator.is_main_process
        if self.on:
            self.write()

    def tick(self) -> None:
        step, total = self.stage.state["step"], self.stage.cfg.steps
        if self.on and (time.time() - self.last >= PROGRESS_EVERY_S or step == total):
            self.write()
            self.last = time.time()

    def write(self) -> None:
        st, state = self.stage, self.stage.state
        el = time.time() - self.t0
        rate = st.tokens_here / el if el > 0 and st.tokens_here else None
        steps = state["step"] - st.resumed_from
        eta = (st.cfg.steps - state["step"]) * el / steps if steps > 0 else None
        write_progress(st.training.run_dir, phase=self.phase, step=state["step"], total=st.cfg.steps,
                       loss=recent_loss(state["losses"]), tokens_per_s=rate,
                       eta_s=eta, pid=os.getpid())
