"""One process of a dress rehearsal (bench.rehearse): a run's phase, observed from inside.

``python -m bench.rehearse_child MODE SPEC_JSON RUN_DIR PROBE_JSON [THREADS]`` runs
:func:`bench.runner.execute` — the very code of ``tdbench run``: lease, build, the training loop,
checkpoints, resume, evaluation, sampling, the record — and writes what it observed to
PROBE_JSON. MODE ``stop``: the process ends right after its first checkpoint is published, as a
preempted or killed job would (``os._exit``: no clean-up, the lease left to go stale), with exit
code :data:`STOPPED`. MODE ``finish``: the run goes on from its newest checkpoint to the end.
``python -m bench.rehearse_child standin NAME DIR HIDDEN LAYERS HEADS`` saves a randomly
initialised GPT-2 of that shape to DIR (a hub model the machine has no copy of).

The probe wraps four functions of the harness for the life of the process, changing nothing
they compute: ``bench.train.Stage.step`` and ``Stage.checkpoint``, ``bench.evaluate.
per_sequence_nll`` and ``bench.samples.draw``. Around each call it records the wall time, the
resident set size (RSS) before the call and the peak RSS during it: the kernel's high-water mark
``VmHWM``, reset through ``/proc/self/clear_refs`` before the call (Linux ≥ 4.0); in a training
step also the RSS when the method's forward returns its loss (what it keeps for the backward,
through a forward hook on the method). The parent
pins glibc's mmap threshold (``MALLOC_MMAP_THRESHOLD_``), so that every large tensor is mapped
and unmapped and a call's peak above the RSS before it is its own working memory. Each such
process asks the kernel to pick it first when memory runs out (:func:`first_to_go`).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

STOPPED = 75   # exit code of a ``stop`` process that ended after its first published checkpoint


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss() -> int | None:
    """Resident set size now, bytes (None off Linux)."""
    v = _status_kib("VmRSS:")
    return None if v is None else v * 1024


def reset_peak() -> bool:
    """Reset the RSS high-water mark to the RSS now; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak() -> int | None:
    """The RSS high-water mark since the last reset (or the process start), bytes."""
    v = _status_kib("VmHWM:")
    return None if v is None else v * 1024


class Probe:
    """What the wrapped calls of one process did: ``steps``, ``evals``, ``samples``,
    ``checkpoints`` (lists of dicts), and whether the peaks are per call (``reset``)."""

    def __init__(self, stop_after_checkpoint: bool, out: Path):
        self.stop, self.out = stop_after_checkpoint, out
        self.steps, self.evals, self.samples, self.checkpoints = [], [], [], []
        self.reset = True
        self.high = 0   # the process's peak RSS: the high-water mark before each reset, kept here

    def process_peak(self) -> int:
        """The peak RSS of the whole process so far (a reset hides earlier peaks from the kernel's
        own count, and from the parent's ``ru_maxrss``: the probe keeps the maximum)."""
        self.high = max(self.high, peak() or 0)
        return self.high

    def measure(self, fn, *a, **k):
        """(fn's result, {s, rss_before, peak}) of one call."""
        self.process_peak()
        before = rss()
        self.reset = reset_peak() and self.reset
        t0 = time.perf_counter()
        out = fn(*a, **k)
        s, high = time.perf_counter() - t0, peak()
        self.high = max(self.high, high or 0)
        return out, {"s": s, "rss_before": before, "peak": high}

    def install(self) -> None:
        import bench.evaluate
        import bench.samples
        import bench.train

        probe, step, ckpt = self, bench.train.Stage.step, bench.train.Stage.checkpoint
        nll, draw = bench.evaluate.per_sequence_nll, bench.samples.draw

        def probed_step(stage, k):
            fresh = len(stage.opt.state) == 0   # this step allocates the optimizer's state
            method, ends = stage.training.method, []
            hook = method.register_forward_hook(lambda *_: ends.append(rss()))   # RSS as the loss is returned
            try:
                out, m = probe.measure(step, stage, k)
            finally:
                hook.remove()
            probe.steps.append({**m, "stage": stage.name, "step": k + 1, "fresh_optimizer": fresh,
                                "after_forward": max(ends) if ends and None not in ends else None,
                                "params": sum(p.numel() for p in method.parameters()),
                                "trained": sum(p.numel() for p in stage.params),
                                # those the step updated: a parameter no loss reaches has no
                                # gradient and no AdamW state (torch skips it)
                                "updated": sum(p.numel() for p in stage.params if p in stage.opt.state),
                                "ema": sum(v.numel() for v in stage.ema.shadow.values()) if stage.ema else 0,
                                "frozen": sum(p.numel() for f in method.frozen_modules().values()
                                              for p in f.parameters())})
            return out

        def probed_checkpoint(stage, elapsed):
            out, m = probe.measure(ckpt, stage, elapsed)
            probe.checkpoints.append({**m, "stage": stage.name, "step": stage.state["step"]})
            if probe.stop:
                probe.write("stopped")
                os._exit(STOPPED)
            return out

        def probed_nll(method, tokens, *a, **k):
            out, m = probe.measure(nll, method, tokens, *a, **k)
            probe.evals.append({**m, "forwards": int(out[0].size)})
            return out

        def probed_draw(method, spec, tokenizer, steps, n, start=0):
            out, m = probe.measure(draw, method, spec, tokenizer, steps, n, start)
            probe.samples.append({**m, "steps": steps, "n": len(out),
                                  "nfe": sum(r["nfe"] for r in out) / max(len(out), 1)})
            return out

        bench.train.Stage.step, bench.train.Stage.checkpoint = probed_step, probed_checkpoint
        bench.evaluate.per_sequence_nll, bench.samples.draw = probed_nll, probed_draw

    def write(self, status: str) -> None:
        from bench.records import write_json

        write_json(self.out, {"status": status, "reset": self.reset, "process_peak": self.process_peak(),
                              "steps": self.steps, "evals": self.evals, "samples": self.samples,
                              "checkpoints": self.checkpoints})


def standin(name: str, path: str, hidden: int, layers: int, heads: int) -> None:
    """A randomly initialised GPT-2 of the given shape (GPT-2's vocabulary and context), saved
    without a tokenizer: hf-causal-lm then scores the suite's GPT-2 ids as they are."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=1024, vocab_size=50257,
                                  name_or_path=name)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)


def first_to_go() -> None:
    """Volunteer this process as the kernel's first choice when memory runs out (oom_score_adj
    1000): a rehearsal too large for the machine ends as a failed row, not as another job's kill."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def main(argv: list[str]) -> int:
    first_to_go()
    mode = argv[0]
    if mode == "standin":
        standin(argv[1], argv[2], *map(int, argv[3:6]))
        return 0
    spec_json, run_dir, out = json.loads(Path(argv[1]).read_text()), argv[2], Path(argv[3])
    threads = int(argv[4]) if len(argv) > 4 and argv[4] else None
    probe = Probe(mode == "stop", out)
    probe.install()
    from bench.runner import execute

    status = execute(spec_json, run_dir, threads)
    probe.write(status)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
