"""Experiment tracking (``launch.log_with``, bench.tracking) read back from the TensorBoard
event files and held against the run's own record:

- every training step once: ``train/loss`` equal to the record's loss curve, ``train/lr`` the
  documented schedule (linear warmup, cosine to 10% of the peak), ``train/tokens`` the tokens
  the record counts; the eval-curve points equal the record's ``train.curve``; the final
  metrics equal ``result.json`` and the sample metrics ``scores.json``, each logged once;
- a process SIGKILLed after logging past its last checkpoint, then resumed: every step is in
  the event files once, equal to the resumed record (what the killed process logged after the
  checkpoint is cut back);
- a 2-process DDP run of a two-stage method: only rank 0 writes, the step counts over both
  stages and each stage's lr follows its own schedule;
- off by default: no tracking directory and no tracker imported; a requested tracker that is
  not installed is one line naming ``launch.log_with`` and the install command, before any run.

Tolerances: TensorBoard stores a scalar as a 32-bit float, so a logged value is compared with
the record's value rounded to float32, exactly; the learning rate, which the test computes from
the documented formula rather than from the harness's own function, within 1e-6 relative (a few
float32 ulps: the two float64 computations may differ in the last bit before rounding).
"""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import complete_record, specs_of, start_ranks, subprocess_env, tiny_suite, write_suite

from bench.cli import main
from bench.runner import execute
from bench.tracking import TRACKING_DIR, TrackSettings

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TRAIN = {"steps": 12, "batch_size": 8, "lr": 3e-3, "warmup": 2, "ckpt_every": 4}
EVAL = {"t_samples": 2, "max_blocks": 8, "batch_size": 8, "curve_every": 4, "curve_blocks": 4}


def f32(x: float) -> float:
    return float(np.float32(x))


def schedule(k: int, peak: float, warmup: int, steps: int) -> float:
    """docs/running.md's schedule, written out here: the lr of 0-based step k."""
    if k < warmup:
        return peak * (k + 1) / warmup
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (k - warmup) / max(1, steps - warmup)))))


def scalars(run_dir: Path, project: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), …]} of every event file of the run's TensorBoard directory, all
    events kept (a step logged twice shows twice)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / TRACKING_DIR / project), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def event_files(run_dir: Path, project: str) -> list[Path]:
    return sorted((run_dir / TRACKING_DIR / project).glob("events.out.tfevents.*"))


def check_training(sc: dict, rec: dict, peak: float, warmup: int) -> None:
    """Loss, lr, tokens and the eval curve of a single-stage run against its record."""
    tr, steps = rec["train"], rec["train"]["steps"]
    assert len(tr["loss_curve"]) == steps                       # (under 100 steps the record keeps all)
    assert sc["train/loss"] == [(s, f32(v)) for s, v in zip(range(1, steps + 1), tr["loss_curve"])]
    assert [s for s, _ in sc["train/lr"]] == list(range(1, steps + 1))
    for s, v in sc["train/lr"]:
        assert math.isclose(v, schedule(s - 1, peak, warmup, steps), rel_tol=1e-6), s
    assert sc["train/tokens"][-1] == (steps, f32(tr["tokens"]))
    assert [s for s, _ in sc["train/tokens_per_s"]] == list(range(1, steps + 1))
    assert all(v > 0 and math.isfinite(v) for _, v in sc["train/tokens_per_s"])
    assert tr["curve"] and sc["eval/curve_nll_per_token"] == [(p["step"], f32(p["nll_per_token"])) for p in tr["curve"]]
    tokens = dict(sc["train/tokens"])
    assert all(tokens[p["step"]] == f32(p["tokens"]) for p in tr["curve"])


def check_final(sc: dict, rec: dict) -> None:
    """Every metric row of the record, once, at the last step."""
    want = {}
    for m in rec["metrics"]:
        for part, tag in (("value", ""), ("ci_low", "_ci_low"), ("ci_high", "_ci_high")):
            if m.get(part) is not None:
                want[f"final/{m['dataset']}/{m['metric']}{tag}"] = [(rec["train"]["steps"], f32(m[part]))]
    assert want and {k: v for k, v in sc.items() if k.startswith("final/")} == want


def test_tensorboard_series_equal_the_record(tmp_path):
    suite = tiny_suite(name="trk", train=TRAIN, eval={**EVAL, "samples": 4, "sample_steps": [4]},
                       metrics={"mauve": None}, baseline=None,
                       launch={"executor": "debug", "threads": 1, "log_with": ["tensorboard"]})
    out = tmp_path / "out"
    assert main(["run", str(write_suite(tmp_path / "s.yaml", suite)), "--out", str(out)]) == 0
    for rd in sorted((out / "runs").iterdir()):
        rec = complete_record(rd)
        sc = scalars(rd, "trk")
        check_training(sc, rec, TRAIN["lr"], TRAIN["warmup"])
        check_final(sc, rec)
        scores = json.loads((rd / "scores.json").read_text())
        at = lambda b: "samples" if b["steps"] is None else f"samples/steps_{b['steps']}"  # noqa: E731 (AR: no budget)
        want = {f"{at(b)}/{k}": [(rec["train"]["steps"], f32(m["value"]))]
                for b in scores["budgets"] for k, m in b["metrics"].items() if m.get("value") is not None}
        want.update({f"{at(b)}/nfe": [(rec["train"]["steps"], f32(b["nfe"]))] for b in scores["budgets"]})
        assert "samples/steps_4/entropy" in want
        assert {k: v for k, v in sc.items() if k.startswith("samples/")} == want
        # the config: the run spec, flattened, stored once
        hp = list((rd / TRACKING_DIR / "trk").glob("*/hparams.yml"))
        assert len(hp) == 1
        cfg = yaml.safe_load(hp[0].read_text())
        assert cfg["label"] == rec["label"] and cfg["train/lr"] == TRAIN["lr"] and cfg["seed"] == rec["seed"]
    # a second `tdbench run` (everything complete) logs nothing again
    before = {p: p.stat().st_size for p in (out / "runs").rglob("events.out.tfevents.*")}
    assert main(["run", str(tmp_path / "s.yaml"), "--out", str(out)]) == 0
    assert {p: p.stat().st_size for p in (out / "runs").rglob("events.out.tfevents.*")} == before


# A child that runs one spec with TensorBoard tracking and SIGKILLs itself right after the tracker
# logged step K: two steps past the checkpoint at step 4, so that it leaves logged steps the
# resumed process will train (and log) again.
KILL_AFTER_LOG = """
import json, os, signal, sys
import bench.tracking as T
from bench.runner import execute
step, K = T.RunTracker.step, int(sys.argv[3])
def step_then_die(self, stage, elapsed):
    step(self, stage, elapsed)
    if stage.state["step"] == K:
        os.kill(os.getpid(), signal.SIGKILL)
T.RunTracker.step = step_then_die
execute(json.loads(sys.argv[1]), sys.argv[2], 1, tracking=T.TrackSettings(("tensorboard",), "trk"))
"""


def test_resume_after_a_kill_past_the_checkpoint_logs_every_step_once(tmp_path):
    suite = tiny_suite(name="trk", train=TRAIN, eval=EVAL, baseline=None)
    spec = specs_of(suite, tmp_path)[0]
    rd = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_LOG, json.dumps(spec.model_dump(mode="json")), str(rd),
                           "6"], env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(p.name for p in (rd / "ckpt").glob("step_*"))[-1] == "step_0000004"
    killed = scalars(rd, "trk")
    assert [s for s, _ in killed["train/loss"]] == [1, 2, 3, 4, 5, 6]   # two steps past the checkpoint

    assert execute(spec.model_dump(mode="json"), rd, 1, tracking=TrackSettings(("tensorboard",), "trk")) == "complete"
    rec = complete_record(rd)
    assert rec["train"]["resumed_from_step"] == 4
    assert len(event_files(rd, "trk")) == 2                              # a new file from the resumed step on
    sc = scalars(rd, "trk")
    check_training(sc, rec, TRAIN["lr"], TRAIN["warmup"])
    check_final(sc, rec)
    assert len(list((rd / TRACKING_DIR / "trk").glob("*/hparams.yml"))) == 1   # the config: first start only


def test_ddp_two_stages_rank_zero_logs_the_steps_of_both_stages(tmp_path):
    import stage_plugin

    from bench import registry

    registry.discover()
    registry.register(stage_plugin.NAME)(stage_plugin.TwoStageToy)
    try:
        st = {"autoencoder": {"steps": 6, "lr": 1e-2}, "diffusion": {"steps": 8}}
        suite = tiny_suite(methods=[{"method": stage_plugin.NAME}], baseline=None,
                           train={**TRAIN, "steps": 10, "stages": st})
        spec = specs_of(suite, tmp_path)[0]
    finally:
        registry._METHODS.pop(stage_plugin.NAME, None)
    child = ("import json,sys,stage_plugin; from bench.registry import register; "
             "register(stage_plugin.NAME)(stage_plugin.TwoStageToy); from bench.runner import execute; "
             "from bench.tracking import TrackSettings; "
             "execute(json.loads(sys.argv[1]), sys.argv[2], 1, tracking=TrackSettings(('tensorboard',), 'trk'))")
    rd = tmp_path / "ddp"
    procs = start_ranks([sys.executable, "-c", child, json.dumps(spec.model_dump(mode="json")), str(rd)])
    try:
        errs = [p.communicate(timeout=300)[1].decode()[-3000:] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], errs
    rec = complete_record(rd)
    assert rec["train"]["world_size"] == 2
    assert len(event_files(rd, "trk")) == 1                               # rank 0's only
    sc = scalars(rd, "trk")
    assert [s for s, _ in sc["train/loss"]] == list(range(1, 15))        # 6 + 8 steps, counted across stages
    assert sc["train/loss"][6:] == [(s, f32(v)) for s, v in zip(range(7, 15), rec["train"]["loss_curve"])]
    for s, v in sc["train/lr"]:
        want = schedule(s - 1, 1e-2, 2, 6) if s <= 6 else schedule(s - 7, 3e-3, 2, 8)
        assert math.isclose(v, want, rel_tol=1e-6), s
    assert sc["train/tokens"][-1] == (14, f32(rec["train"]["tokens"]))
    check_final(sc, rec)


OFF = """
import sys
from bench.cli import main
code = main(["run", sys.argv[1], "--out", sys.argv[2]])
print(code, sorted(m for m in sys.modules if m.split(".")[0] in ("tensorboard", "wandb", "mlflow", "trackio",
                                                                 "tensorboardX") or m == "torch.utils.tensorboard"))
"""


def test_off_by_default_no_directory_and_no_tracker_imported(tmp_path):
    f = write_suite(tmp_path / "s.yaml", tiny_suite(train={**TRAIN, "steps": 4}, eval=EVAL, baseline=None))
    proc = subprocess.run([sys.executable, "-c", OFF, str(f), str(tmp_path / "out")], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout.split("\n")[-2] == "0 []", proc.stdout[-500:] + proc.stderr[-2000:]
    (rd,) = (tmp_path / "out" / "runs").iterdir()
    assert complete_record(rd) and not (rd / TRACKING_DIR).exists()


@pytest.mark.parametrize("tracker,hint", [("tensorboard", "pip install 'tdbench[track]'"),
                                          ("wandb", "pip install wandb")])
def test_missing_tracker_is_one_line_before_any_run(tmp_path, capsys, monkeypatch, tracker, hint):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else real(name, *a))
    suite = tiny_suite(launch={"executor": "debug", "threads": 1, "log_with": [tracker]})
    assert main(["run", str(write_suite(tmp_path / "s.yaml", suite)), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: launch.log_with: {tracker} is not installed ({hint})"
    assert not (tmp_path / "o").exists()


def test_tracker_settings_per_tracker(tmp_path, monkeypatch):
    """wandb offline unless WANDB_MODE says otherwise; every tracker gets the run's name
    (label, size, seed) and the suite as tag or group; a resumed wandb run is the same run."""
    from bench.tracking import flat_config, init_kwargs

    spec = specs_of(tiny_suite(baseline=None), tmp_path)[0]
    st = TrackSettings(("wandb", "trackio", "mlflow"), "trk")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    kw = init_kwargs(st, spec, tmp_path)
    assert kw["wandb"]["mode"] == "offline" and kw["wandb"]["id"] == spec.run_id and kw["wandb"]["tags"] == ["trk"]
    assert kw["trackio"]["group"] == "trk" and kw["mlflow"]["tags"]["suite"] == "trk" and kw["mlflow"]["run_id"] is None
    assert {kw["wandb"]["name"], kw["trackio"]["name"], kw["mlflow"]["run_name"]} == {f"MDLM tiny seed={spec.seed}"}
    monkeypatch.setenv("WANDB_MODE", "online")
    assert init_kwargs(st, spec, tmp_path)["wandb"]["mode"] == "online"
    flat = flat_config(spec.model_dump(mode="json"))
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert flat["backbone/hidden"] == spec.backbone.hidden and json.loads(flat["eval/sample_steps"]) == [64]
