"""Experiment tracking through Accelerate's trackers (the suite's ``launch.log_with``).

Off by default: without ``log_with`` nothing here runs, no tracker is imported and a run writes
no ``tracking/`` directory. With it, the main process of every run (rank 0 of a DDP/DeepSpeed
run) builds its Accelerator with ``log_with`` and ``project_dir = <run>/tracking``
(bench.distributed.make_accelerator), calls ``init_trackers`` (project = the suite's name; the
run spec, flattened, as the config on the run's first start), then logs through
``accelerator.log``:

- every optimizer step s (1-based, counted over all stages of a multi-stage method):
  ``train/loss`` (the global loss of the step, as the record's loss curve has it), ``train/lr``
  (the learning rate that step used, from the stage's own schedule), ``train/tokens`` (counted
  tokens so far, all stages) and ``train/tokens_per_s`` (as the progress line shows it);
- at each learning-curve probe (``eval.curve_every``): ``eval/curve_nll_per_token``, the point
  the record's ``train.curve`` holds;
- once, after ``result.json`` says complete, at the last step: ``final/<dataset>/<metric>``
  (and ``…_ci_low`` / ``…_ci_high``) for every metric row of the record;
- once, after ``tdbench run`` scored the run's samples: ``samples/steps_<k>/<metric>``
  (:func:`log_scores`).

The trackers are finished by bench.distributed.teardown (``accelerator.end_training``).

Resume: a resumed process starts a new TensorBoard event file, from the step after the
checkpoint it resumed from; before its first step it cuts every earlier event file of the run
back to the steps up to that checkpoint (:func:`truncate_events`), so what a killed process
logged after its last checkpoint (and a torn last record) is gone and every step is in the
files once. wandb and trackio continue the same run (``resume="allow"``; wandb's id is the run
id), mlflow the run whose id the first process left in ``tracking/mlflow-run-id``; those
services keep or drop a repeated step by their own rules.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from bench.errors import UserError

TRACKING_DIR = "tracking"
MLFLOW_RUN_ID = "mlflow-run-id"
SCORES_LOGGED = "scores-logged"

# tracker (launch.log_with) → (the module that must be importable, how to install it)
INSTALL = {"tensorboard": ("tensorboard", "pip install 'tdbench[track]'"),
           "wandb": ("wandb", "pip install wandb"),
           "trackio": ("trackio", "pip install trackio"),
           "mlflow": ("mlflow", "pip install mlflow")}


@dataclass(frozen=True)
class TrackSettings:
    """What a run process needs of the suite to track itself (picklable: the local and Slurm
    executors hand it to their jobs)."""

    log_with: tuple[str, ...]
    project: str   # the suite's name: TensorBoard's sub-directory, the wandb/trackio project, mlflow's experiment


def settings_of(suite) -> TrackSettings | None:
    """The suite's tracking settings; None when ``launch.log_with`` is empty (off)."""
    names = tuple(dict.fromkeys(suite.launch.log_with))
    return TrackSettings(names, suite.name) if names else None


def check_installed(log_with) -> None:
    """UserError naming ``launch.log_with`` and the install command for the first requested
    tracker that is not installed (looked up without importing it)."""
    import importlib.util

    for name in log_with:
        module, pip = INSTALL[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"launch.log_with: {name} is not installed ({pip})")


def flat_config(d: dict, prefix: str = "") -> dict:
    """A nested run spec as the flat ``{key: bool | int | float | str | None}`` every tracker
    accepts: nested keys joined with ``/``, lists as JSON text."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "/"))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def run_name(spec) -> str:
    return f"{spec.label} {spec.size} seed={spec.seed}"


def init_kwargs(settings: TrackSettings, spec, root: Path) -> dict:
    """Accelerate's ``init_kwargs`` per tracker: the run's name, the suite as tag (trackio:
    group), offline where the tracker has such a mode unless the user chose otherwise
    (``WANDB_MODE``), and what makes a resumed process continue the same run."""
    mlflow_id = root / MLFLOW_RUN_ID
    return {"wandb": {"name": run_name(spec), "tags": [settings.project], "id": spec.run_id, "resume": "allow",
                      "dir": str(root), "mode": os.environ.get("WANDB_MODE", "offline")},
            "trackio": {"name": run_name(spec), "group": settings.project, "resume": "allow"},
            "mlflow": {"run_name": run_name(spec), "tags": {"suite": settings.project, "run_id": spec.run_id},
                       "run_id": mlflow_id.read_text().strip() if mlflow_id.is_file() else None}}


def accelerator_args(settings: TrackSettings | None, run_dir: Path) -> dict:
    """The Accelerator's ``log_with`` and ``project_dir`` for a run (none when off)."""
    if settings is None:
        return {}
    return {"log_with": list(settings.log_with), "project_dir": str(Path(run_dir) / TRACKING_DIR)}


def start_tracker(accelerator, settings: TrackSettings | None, spec, run_dir: Path):
    """The run's trackers (:class:`RunTracker`) on its main process; :class:`Off` when tracking
    is off or on any other process."""
    return RunTracker(accelerator, settings, spec, run_dir) if settings and accelerator.is_main_process else Off()


class Off:
    """No tracking: every call does nothing."""

    def step(self, stage, elapsed: float) -> None:
        pass

    def final(self, metrics: list[dict], step: int) -> None:
        pass


class RunTracker:
    """One run's trackers, on its main process: started here, told of every step by the
    training loop (:meth:`step`), of the final metrics by the runner (:meth:`final`)."""

    def __init__(self, accelerator, settings: TrackSettings, spec, run_dir: Path):
        self.acc = accelerator
        root = Path(run_dir) / TRACKING_DIR
        first = not root.exists()
        # the event files earlier processes of this run wrote (cut back at the first step)
        events = root / settings.project
        self.earlier = sorted(events.glob("events.out.tfevents.*")) if "tensorboard" in settings.log_with else []
        root.mkdir(parents=True, exist_ok=True)
        accelerator.init_trackers(settings.project, config=flat_config(spec.model_dump(mode="json")) if first else None,
                                  init_kwargs=init_kwargs(settings, spec, root))
        if "mlflow" in settings.log_with and not (root / MLFLOW_RUN_ID).is_file():
            (root / MLFLOW_RUN_ID).write_text(accelerator.get_tracker("mlflow", unwrap=True).info.run_id)
        self.started = False

    def offset(self, stage) -> int:
        """Steps of the stages before ``stage`` (the tracked step counts over all stages)."""
        train = stage.training.spec.train
        return sum(train.for_stage(s).steps for s in stage.training.stages[:stage.index])

    def step(self, stage, elapsed: float) -> None:
        """Log the step ``stage`` just accounted (``elapsed``: seconds it has trained in this
        process). The first call of a process cuts the earlier event files back to the step it
        resumed from."""
        if getattr(stage.training.writer, "lost", None):
            return   # another process took the run over: it logs from here
        state, base = stage.state, self.offset(stage)
        if not self.started:
            truncate_events(self.earlier, base + stage.resumed_from)
            self.started = True
        k, tokens = state["step"], sum(d["tokens"] for d in stage.done) + state["tokens"]
        values = {"train/loss": state["losses"][-1], "train/tokens": tokens,
                  "train/lr": stage.sched.base_lrs[0] * stage.sched.lr_lambdas[0](k - 1)}
        if elapsed > 0 and stage.tokens_here:
            values["train/tokens_per_s"] = stage.tokens_here / elapsed
        curve = state.get("curve")
        if curve and curve[-1]["step"] == k:
            values["eval/curve_nll_per_token"] = curve[-1]["nll_per_token"]
        self.acc.log(values, step=base + k)

    def final(self, metrics: list[dict], step: int) -> None:
        """The record's metric rows, once, at the last step."""
        self.acc.log(final_values(metrics), step=step)


def final_values(metrics: list[dict]) -> dict:
    out = {}
    for m in metrics:
        for part, tag in (("value", ""), ("ci_low", "_ci_low"), ("ci_high", "_ci_high")):
            if m.get(part) is not None:
                out[f"final/{m['dataset']}/{m['metric']}{tag}"] = float(m[part])
    return out


def truncate_events(files: list[Path], last_step: int) -> None:
    """Cut each TensorBoard event file back to its events of steps <= ``last_step`` (a torn
    last record goes too), rewritten atomically: what a killed process logged after the
    checkpoint a run resumes from is what the resumed process logs again."""
    if not files:
        return
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    for f in files:
        keep = [r for r in RawEventFileLoader(str(f)).Load() if Event.FromString(r).step <= last_step]
        tmp = f.with_name(".truncating")   # no "tfevents" in the name: never read as an event file
        with open(tmp, "wb") as fh:
            w = RecordWriter(fh)
            for r in keep:
                w.write(r)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, f)


def open_trackers(settings: TrackSettings, spec, root: Path) -> list:
    """The run's trackers outside its training process (as ``init_trackers`` builds them)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    kwargs = init_kwargs(settings, spec, root)
    out = []
    for name in settings.log_with:
        cls = LOGGER_TYPE_TO_CLASS[name]
        args = (settings.project, str(root)) if cls.requires_logging_directory else (settings.project,)
        out.append(cls(*args, **kwargs.get(name, {})))
        out[-1].start()
    return out


def log_scores(settings: TrackSettings | None, out: Path, specs) -> None:
    """After ``tdbench run`` scored the samples: each tracked, complete run's sample metrics
    (``samples/steps_<k>/<metric>`` and ``…/nfe``; ``samples/<metric>`` without a step budget)
    at its last step, once per run (a marker in ``tracking/`` says it was done; a later
    rescoring is not logged again)."""
    if settings is None:
        return
    from bench.metrics.score import read_scores
    from bench.records import read_record, record_status
    from bench.rundir import run_dir

    for spec in specs:
        rd = run_dir(out, spec)
        root = rd / TRACKING_DIR
        if not root.is_dir() or (root / SCORES_LOGGED).exists() or record_status(rd) != "complete":
            continue
        scores = read_scores(rd)   # None: no scores.json, or one that cannot be read
        if scores is None:
            continue
        values = tracked_values(scores)
        step = read_record(rd / "result.json")["train"]["steps"]
        trackers = open_trackers(settings, spec, root)
        for t in trackers:
            t.log(values, step=step)
            t.finish()
        (root / SCORES_LOGGED).write_text(json.dumps({"step": step, "tags": sorted(values)}) + "\n")


def tracked_values(scores: dict) -> dict:
    """A run's scores.json as tracker scalars: samples[/steps_K]/<metric> and .../nfe."""
    out = {}
    for b in scores.get("budgets", []):
        where = "samples" if b.get("steps") is None else f"samples/steps_{b['steps']}"   # (AR: no step budget)
        for name, m in b.get("metrics", {}).items():
            if isinstance(m, dict) and isinstance(m.get("value"), (int, float)):
                out[f"{where}/{name}"] = float(m["value"])
        if isinstance(b.get("nfe"), (int, float)):
            out[f"{where}/nfe"] = float(b["nfe"])
    return out
