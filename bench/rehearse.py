"""``tdbench rehearse SUITE``: every run of a suite, at its real size, for a handful of steps on CPU.

What a rehearsal runs. Each run of the suite at its own size, vocabulary and block length, with
batch 1: ``steps`` optimizer steps per training stage through the training loop, killed right
after its first checkpoint (at step ``steps − 1`` of its first stage) and started again in a
fresh process that resumes from that checkpoint, trains to the end, evaluates the first block of
each evaluation set with the suite's K time draws and draws one sample with ``sample_steps``
steps — all of it :func:`bench.runner.execute`, the code of ``tdbench run``, in child processes
(bench.rehearse_child), one run at a time, so that a run that fails or is killed (out of memory)
is a failed row and never takes the others down. What it changes in each run's spec, and says in
the row: batch 1 (evaluation and sampling too), ``steps`` steps and a checkpoint every
``steps − 1``, one evaluation block, one sample, no learning curve; hub datasets (never
downloaded by a rehearsal) are replaced by an embedded corpus; a GPT-2 hub model (hf-causal-lm)
that is not in the local hub cache is replaced by a randomly initialised GPT-2 of its published
shape. Runs that differ only in seed or data (same method, params, size, L, V) share every
shape and are rehearsed once; the row lists the others.

What it measures, per run (bench.rehearse_child): the peak RSS of each process; per training
step (leaving out a stage's first step, which allocates the optimizer's state) its seconds and
its peak RSS; per evaluation and per sampling call the same. "Working memory" W of a call is its
peak RSS above the RSS before it; S of a training step, the RSS above that when the method's
forward returns its loss (what the forward keeps for the backward).

The GPU projection, at the suite's batch (``train.batch_size`` split over ``launch.nodes ×
tasks_per_node`` processes and ``launch.micro_batch``: b sequences per forward per GPU):

- training, per stage: 4·(N + N_frozen) bytes of fp32 weights + 4·N_u gradients + 8·N_u AdamW
  moments + 4·N_ema EMA copy (N_u the stage's parameters its steps update — a trained parameter
  no loss reaches has no gradient and no AdamW state —, N_ema the entries the EMA averages) +
  b·A, A = max(S, W − 4·N_u) the activations of one sequence (the backward frees activations as
  it allocates gradients, so W − 4·N_u alone understates them when both are of a size; S alone
  misses the backward's own temporaries); the largest stage is the run's figure;
- sampling: 4·(N + N_frozen) + b_s·W_s, b_s = the sampling batch (bench.samples.sampling_batch),
  W_s a sampling call's working memory at batch 1;
- step time: 6·N_u·(per-GPU sequences × L) FLOPs at ``mfu`` of ``peak_tflops`` (bench.plan's
  compute model; the method's own work beyond its network — a frozen encoder, V-wide losses —
  is not in it: the CPU seconds per step beside it show that cost against AR's).

A is measured in fp32 with the CPU attention kernel; under bf16 autocast a GPU keeps most saved
activations at half that size, so the activation term is an upper bound (within ~2×). Not in
it: the CUDA context and the allocator's fragmentation (~1–2 GiB per GPU), DeepSpeed's sharding.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from pydantic import Field, PositiveInt, field_validator

from bench.config import RunSpec, Strict
from bench.errors import UserError
from bench.plan import DEFAULT_MFU, DEFAULT_PEAK_TFLOPS

# GPT-2's published shapes (OpenAI's config.json on the hub): name -> (n_embd, n_layer, n_head);
# every one has n_positions 1024 and GPT-2's 50,257-token vocabulary.
GPT2_SHAPES = {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20),
               "gpt2-xl": (1600, 48, 25)}
GPT2_SHAPES.update({f"openai-community/{k}": v for k, v in list(GPT2_SHAPES.items())})
MARK = ".rehearsal"          # a rehearsal's run directory holds it: only such a directory is ever replaced
MMAP_THRESHOLD = "131072"    # glibc's mmap threshold pinned in the children (bench.rehearse_child)
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "SUBMITIT_EXECUTOR")  # a rehearsal's child is one process of its own, whatever launched the parent


class RehearsalSettings(Strict):
    """The settings of ``tdbench rehearse`` (its command-line options are derived from these)."""

    steps: int = Field(3, ge=2, le=1000, description="optimizer steps per training stage (≥ 2: the run is "
                                                     "killed after its checkpoint at step steps − 1, then resumed)")
    sample_steps: PositiveInt = Field(2, le=4096, description="step budget of the one sample drawn per run")
    corpus: str = Field("austen", description="the embedded corpus that stands in for every hub dataset")
    threads: Optional[PositiveInt] = Field(None, description="torch threads of each run (default: torch's)")
    mfu: float = Field(DEFAULT_MFU, gt=0, le=1, description="GPU step-time projection: model FLOPs utilisation")
    peak_tflops: float = Field(DEFAULT_PEAK_TFLOPS, gt=0, description="GPU step-time projection: peak TFLOP/s "
                                                                      "per GPU")
    only: list[str] = Field([], description="rehearse only these runs (run ids, or their prefixes, or labels)")
    keep: bool = Field(False, description="keep the checkpoints and GPT-2 stand-ins (deleted after each run)")

    @field_validator("corpus")
    @classmethod
    def _embedded(cls, v):
        from bench.data.corpora import CORPORA

        if v not in CORPORA:
            raise ValueError(f"{v}: not an embedded corpus ({', '.join(CORPORA)})")
        return v


# ----------------------------------------------------------------------------- what runs
def shape_key(spec: RunSpec) -> tuple:
    """What fixes every tensor shape of a run: method, params, backbone, L and tokenizer (V);
    not its seed, its data or its training settings (a rehearsal trains at batch 1 anyway)."""
    import json

    return (spec.method, json.dumps(spec.params, sort_keys=True), spec.backbone.model_dump_json(),
            spec.data.seq_len, spec.data.tokenizer.model_dump_json())


def by_shape(specs: list[RunSpec]) -> list[tuple[RunSpec, list[RunSpec]]]:
    """(the run rehearsed, the other runs of its shape) per shape, in the suite's order."""
    groups: dict[tuple, list[RunSpec]] = {}
    for s in specs:
        groups.setdefault(shape_key(s), []).append(s)
    return [(g[0], g[1:]) for g in groups.values()]


def select(groups, only: list[str]):
    """The groups a run of which ``only`` names (an id prefix or a label); all when empty."""
    if not only:
        return groups
    hit = lambda s, w: s.run_id.startswith(w) or s.label == w  # noqa: E731
    for w in only:
        if not any(hit(s, w) for rep, rest in groups for s in [rep, *rest]):
            raise UserError(f"--only: {w}: no run of the suite has this id (prefix) or label")
    return [(rep, rest) for rep, rest in groups if any(hit(s, w) for s in [rep, *rest] for w in only)]


def substitute_data(spec: RunSpec, corpus: str) -> tuple[dict, list[str]]:
    """The spec's data block with every hub dataset replaced by ``corpus`` (evaluation sets
    that become the same one kept once), and the notes saying so."""
    from bench.config import DatasetRef
    from bench.data import DATASETS

    hub = lambda r: DATASETS[r.name][0] == "hub"  # noqa: E731
    d = spec.data
    train = DatasetRef(name=corpus) if hub(d.train) else d.train
    evals = list({r.key: r for r in (DatasetRef(name=corpus) if hub(r) else r for r in d.eval)}.values())
    swapped = [r.key for r in (d.train, *d.eval) if hub(r)]
    notes = [f"data {', '.join(dict.fromkeys(swapped))} → {corpus} (hub datasets are not downloaded)"] * bool(swapped)
    return {**d.model_dump(mode="json"), "train": train.model_dump(), "eval": [r.model_dump() for r in evals]}, notes


def substitute_models(params: dict, standins: Path) -> tuple[dict, list[str], dict]:
    """Params with every GPT-2 hub name the local hub cache lacks replaced by the directory of a
    randomly initialised GPT-2 of its published shape; (params, notes, {dir: (name, shape)})."""
    from bench.hf import hub_revision

    out, notes, todo = dict(params), [], {}
    for k, v in params.items():
        if isinstance(v, str) and v in GPT2_SHAPES and hub_revision(v) is None:
            path = standins / v.replace("/", "--")
            out[k], todo[str(path)] = str(path), (v, GPT2_SHAPES[v])
            notes.append(f"{k} {v}: random-init stand-in of its published shape (not in the local hub cache)")
    return out, notes, todo


def rehearsal_spec(spec: RunSpec, st: RehearsalSettings, standins: Path) -> tuple[RunSpec, list[str], dict]:
    """(the spec a rehearsal runs, the notes on what it changed, the stand-ins it needs)."""
    from bench.config import StageOverrides

    data, notes = substitute_data(spec, st.corpus)
    params, more, todo = substitute_models(spec.params, standins)
    small = {"steps": st.steps, "batch_size": 1, "ckpt_every": st.steps - 1}
    train = spec.train.model_copy(update={**small, "stages": {
        k: StageOverrides(**{**v.model_dump(), **small}) for k, v in spec.train.stages.items()}})
    ev = {**spec.eval.model_dump(mode="json"), "max_blocks": 1, "batch_size": 1, "samples": 1,
          "sample_steps": [st.sample_steps], "curve_every": 0}
    r = RunSpec(**{**spec.model_dump(mode="json"), "params": params, "data": data,
                   "train": train.model_dump(mode="json"), "eval": ev})
    return r, notes + more, todo


# ----------------------------------------------------------------------------- the children
def child_env() -> dict:
    """The children's environment: this checkout first on the path, no distributed variables,
    no GPU (a rehearsal is the CPU's), glibc's mmap threshold pinned, no progress bars."""
    root = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")])), CUDA_VISIBLE_DEVICES="",
               MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD, TQDM_DISABLE="1")
    return env


def _die_with_parent() -> None:
    """(In the child, before exec) SIGKILL when the parent dies: a rehearsal killed outright
    leaves no run training behind (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_child(argv: list[str], log: Path) -> tuple[int, int, float]:
    """(exit code — minus the signal that killed it —, its peak RSS in bytes, seconds) of
    ``python -m bench.rehearse_child ARGV``, its output appended to ``log``. The child is
    killed when this process is interrupted or terminated, or dies."""
    t0 = time.time()
    with open(log, "ab") as f:
        p = subprocess.Popen([sys.executable, "-m", "bench.rehearse_child", *argv], stdout=f,
                             stderr=subprocess.STDOUT, env=child_env(), preexec_fn=_die_with_parent)
        try:
            _, status, usage = os.wait4(p.pid, 0)
        except BaseException:
            p.kill()
            p.wait()
            raise
    p.returncode = os.waitstatus_to_exitcode(status)   # (reaped: Popen must not wait for it again)
    return p.returncode, usage.ru_maxrss * 1024, time.time() - t0


def why_failed(code: int, run_dir: Path, log: Path) -> str:
    """One line: the run's recorded error, else how its process ended and its last line."""
    from bench.records import read_record

    try:
        rec = read_record(run_dir / "result.json")
        if rec.get("status") == "failed":
            return rec.get("error") or "failed"
    except Exception:  # noqa: BLE001 - no (readable) record: the process died before writing it
        pass
    if code < 0:
        name = signal.Signals(-code).name
        return f"killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()] if log.is_file() else []
    return f"exit code {code}" + (f": {lines[-1].strip()[:300]}" if lines else "")


def mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(x.split()[1]) * 1024 for x in f if x.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def state_bytes(spec: RunSpec) -> int | None:
    """Bytes of fp32 weights, gradients, AdamW moments and EMA copy of a run that trains every
    parameter: what its training holds before any activation. Counted on PyTorch's ``meta``
    device (nothing allocated); None for a method that cannot be built there (a pretrained
    part) or that does not train."""
    import torch

    from bench.plan import vocab_size
    from bench.registry import get_method

    cls = get_method(spec.method)
    if not cls.trains:
        return None
    try:
        with torch.device("meta"):
            n = sum(p.numel() for p in cls(cls.Params(**spec.params), spec.backbone, vocab_size(spec),
                                           spec.data.seq_len).parameters())
    except Exception:  # noqa: BLE001 - built for real in its run, which reports any error
        return None
    return 4 * n * (4 + (spec.train.ema > 0))


def fresh_dir(run_dir: Path) -> None:
    """An empty run directory: one left by an earlier rehearsal (it holds MARK) is replaced; any
    other existing one is refused (checked for every run before the first one starts)."""
    if run_dir.exists():
        if not (run_dir / MARK).is_file():
            raise UserError(f"--out: {run_dir} exists and is not a rehearsal's run directory; choose another --out")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / MARK).write_text("a tdbench rehearsal's run directory (bench.rehearse)\n")


# ----------------------------------------------------------------------------- one run, all runs
def rehearse_one(spec: RunSpec, others: list[RunSpec], suite, out: Path, st: RehearsalSettings):
    """Rehearse ``spec`` (standing for ``others`` too) into ``out/runs/<run id>``: a Row."""
    import json

    from bench.registry import get_method
    from bench.rehearse_child import STOPPED
    from bench.rehearse_table import Row, measure

    rspec, notes, todo = rehearsal_spec(spec, st, out / "standins")
    cls = get_method(spec.method)
    if not cls.trains:
        notes.append("evaluated only (a pretrained model): no training, checkpoint or resume")
    if cls.likelihood == "none":
        notes.append("no likelihood: not evaluated")
    if "sampling" not in cls.supports():
        notes.append("no sampler: no sample drawn")
    if others:
        notes.append(f"rehearsed once for {len(others) + 1} runs of the same shapes (also "
                     f"{', '.join(s.run_id for s in others)})")
    row = Row.of(spec, others, notes)
    need, have = state_bytes(spec), mem_available()
    if need is not None and have is not None and need > have:
        return row.failed(f"not started: weights, gradients, AdamW and EMA alone take {need / 2**30:.1f} GiB, "
                          f"{have / 2**30:.1f} GiB available")
    rd = out / "runs" / spec.run_id
    fresh_dir(rd)
    (rd / "rehearsal-spec.json").write_text(json.dumps(rspec.model_dump(mode="json")))
    t0, rss, probes = time.time(), [], {}
    for path, (name, shape) in todo.items():
        if not (Path(path) / "config.json").is_file():
            code, _, _ = run_child(["standin", name, path, *map(str, shape)], rd / "rehearse-standin.log")
            if code != 0:
                return row.failed(f"GPT-2 stand-in for {name}: {why_failed(code, rd, rd / 'rehearse-standin.log')}")
    phases = ["stop", "finish"] if cls.trains else ["finish"]
    for phase in phases:
        log = rd / f"rehearse-{phase}.log"
        code, peak, _ = run_child([phase, str(rd / "rehearsal-spec.json"), str(rd), str(rd / f"probe-{phase}.json"),
                                   str(st.threads or "")], log)
        rss.append(peak)
        if code != (STOPPED if phase == "stop" else 0) or not (rd / f"probe-{phase}.json").is_file():
            return row.failed(why_failed(code, rd, log), time.time() - t0, max(rss))
        probes[phase] = json.loads((rd / f"probe-{phase}.json").read_text())
        rss.append(probes[phase]["process_peak"])   # (the probe's resets hide earlier peaks from ru_maxrss)
    if not st.keep:
        shutil.rmtree(rd / "ckpt", ignore_errors=True)
    return measure(row, rd, probes, spec, suite, time.time() - t0, max(rss))


def rehearse(suite_path: str | Path, out: Path | None, st: RehearsalSettings, log=None):
    """Rehearse every shape of the suite (``st.only``: some); returns (suite, rows, output dir).
    ``log``: one progress line per run. The table is rewritten (atomically) after every run."""
    from bench.rehearse_table import progress_line, write_outputs
    from bench.suite import load_suite

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    suite, specs = load_suite(suite_path)
    groups = select(by_shape(specs), st.only)
    out = Path(out) if out else Path("runs") / f"{suite.name}-rehearsal"
    for rep, _ in groups:   # refuse a foreign directory before anything is written
        rd = out / "runs" / rep.run_id
        if rd.exists() and not (rd / MARK).is_file():
            raise UserError(f"--out: {rd} exists and is not a rehearsal's run directory; choose another --out")
    log(f"{suite.name}: {len(specs)} runs, {len(groups)} to rehearse (one per shape) into {out}")
    rows = []
    term = signal.signal(signal.SIGTERM, _terminated)   # SIGTERM unwinds like ^C: the running child is killed
    try:
        for i, (rep, rest) in enumerate(groups, 1):
            rows.append(rehearse_one(rep, rest, suite, out, st))
            log(progress_line(i, len(groups), rows[-1]))
            write_outputs(out, suite, rows, st)
    finally:
        signal.signal(signal.SIGTERM, term)
        if not st.keep:
            shutil.rmtree(out / "standins", ignore_errors=True)
    return suite, rows, out


def _terminated(signum, frame):
    raise SystemExit(128 + signum)
