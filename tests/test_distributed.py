"""Multi-process training without Slurm: 2 CPU processes with gloo, started by the local
executor (submitit's LocalExecutor with tasks_per_node=2, the same code path as a Slurm job).

- DDP: both ranks end with bit-identical parameters, and the run equals a 1-process run with
  the same global batch (micro-batch = the per-rank batch, so 2 accumulation steps). The
  noise of a micro-batch depends on its offset in the global batch, not on the rank, so the
  two compute the same thing up to float summation order. Tolerance: 1e-6 relative on every
  loss of the curve and on the perplexities, 1e-6 absolute on every weight (measured: 0).
- DeepSpeed ZeRO-2 on the same 2 processes: final loss within 1e-4 relative of DDP's, and
  the same perplexities within 1e-4 relative (measured: identical on CPU/fp32).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import tiny_suite, write_suite

from bench.distributed import batch_plan
from bench.errors import UserError
from bench.launch import run_suite
from bench.suite import load_suite

STEPS = 12


def _suite(tmp_path: Path, name: str, launch: dict, baseline="ar", **train) -> tuple:
    s = tiny_suite(name=name, launch=launch, baseline=baseline,
                   train={"steps": STEPS, "batch_size": 8, "lr": 3e-3, "warmup": 2, "ckpt_every": 6, **train})
    return load_suite(write_suite(tmp_path / f"{name}.yaml", s))


def _records(out: Path) -> dict[str, dict]:
    recs = {}
    for p in sorted((out / "runs").glob("*/result.json")):
        r = json.loads(p.read_text())
        assert r["status"] == "complete", f"{p}: {r.get('error')}\n{r.get('log_tail', '')}"
        recs[r["method"]] = r
    return recs


def _weights(out: Path, method: str) -> dict:
    from safetensors.torch import load_file

    ck = sorted((out / "runs").glob(f"{method}-*/ckpt/step_*"))[-1]
    return load_file(ck / "model.safetensors")


def _close(a: float, b: float, rel: float) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """(2-process DDP out dir, 1-process micro-batch-4 out dir)."""
    tmp = tmp_path_factory.mktemp("ddp")
    suite2, specs2 = _suite(tmp, "ddp2", {"executor": "local", "threads": 1, "tasks_per_node": 2})
    st = run_suite(suite2, specs2, tmp / "ddp2", "local")
    assert set(st.values()) == {"complete"}, st
    suite1, specs1 = _suite(tmp, "one", {"executor": "debug", "threads": 1, "micro_batch": 4})
    assert [s.run_id for s in specs1] == [s.run_id for s in specs2]  # where it runs is not in the run id
    st = run_suite(suite1, specs1, tmp / "one", "debug")
    assert set(st.values()) == {"complete"}, st
    return tmp / "ddp2", tmp / "one"


def test_ddp_two_processes_equal_replicas_and_equal_one_process(ddp_runs):
    out2, out1 = ddp_runs
    two, one = _records(out2), _records(out1)
    assert set(two) == set(one) == {"mdlm", "ar"}
    for m in two:
        t2, t1 = two[m]["train"], one[m]["train"]
        assert two[m]["env"]["world_size"] == 2 and t2["engine"] == "ddp"
        assert (t2["world_size"], t2["micro_batch"], t2["grad_accum"]) == (2, 4, 1)
        assert (t1["world_size"], t1["micro_batch"], t1["grad_accum"]) == (1, 4, 2)
        c = t2["param_checksums"]
        assert len(c) == 2 and c[0] == c[1], f"{m}: ranks diverged: {c}"
        assert len(t2["loss_curve"]) == len(t1["loss_curve"]) == STEPS
        for a, b in zip(t2["loss_curve"], t1["loss_curve"]):
            assert _close(a, b, 1e-6), (m, t2["loss_curve"], t1["loss_curve"])
        assert t2["tokens"] == t1["tokens"]
        for a, b in zip(two[m]["metrics"], one[m]["metrics"]):
            assert a["dataset"] == b["dataset"] and _close(a["value"], b["value"], 1e-6), (a, b)
        w2, w1 = _weights(out2, m), _weights(out1, m)
        assert max(float((w2[k] - w1[k]).abs().max()) for k in w1) <= 1e-6


def test_deepspeed_zero2_two_processes_matches_ddp(ddp_runs, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed not installed (pip install 'tdbench[deepspeed]')")
    out2, _ = ddp_runs
    suite, specs = _suite(tmp_path, "zero2", {"executor": "local", "threads": 1, "tasks_per_node": 2},
                          baseline=None, engine="deepspeed", zero_stage=2)
    st = run_suite(suite, specs, tmp_path / "zero2", "local")
    assert set(st.values()) == {"complete"}, st
    ds, ddp = _records(tmp_path / "zero2"), _records(out2)
    assert set(ds) == {"mdlm"}
    for m in ds:
        t = ds[m]["train"]
        assert t["engine"] == "deepspeed" and t["world_size"] == 2
        assert t["param_checksums"][0] == t["param_checksums"][1]
        newest = sorted((tmp_path / "zero2" / "runs").glob(f"{m}-*/ckpt/step_*"))[-1]   # (the last two are kept)
        shards = list(newest.glob("deepspeed/*/*optim_states.pt"))
        assert len(shards) == 2, "ZeRO-2 writes one optimizer shard per rank"
        assert _close(t["final_loss"], ddp[m]["train"]["final_loss"], 1e-4), (t["final_loss"], ddp[m]["train"])
        for a, b in zip(ds[m]["metrics"], ddp[m]["metrics"]):
            assert _close(a["value"], b["value"], 1e-4), (a, b)


def test_batch_plan_derives_accumulation_and_names_keys():
    assert batch_plan(16, 2).__dict__ == {"world": 2, "per_rank": 8, "micro": 8, "accum": 1}
    assert batch_plan(16, 2, 2).accum == 4
    assert batch_plan(16, 1, 4).accum == 4
    assert batch_plan(16, 4, 64).micro == 4  # a micro-batch larger than the share is the share
    with pytest.raises(UserError, match=r"train\.batch_size: 16 is not divisible by the world size 3"):
        batch_plan(16, 3)
    with pytest.raises(UserError, match=r"launch\.micro_batch: 3 does not divide"):
        batch_plan(16, 2, 3)


@pytest.mark.parametrize("train,launch,key", [
    ({"zero_stage": 2}, {}, "train.zero_stage"),
    ({"batch_size": 6}, {"tasks_per_node": 4}, "train.batch_size"),
    ({}, {"micro_batch": 3}, "launch.micro_batch"),
])
def test_bad_launch_settings_exit_2_before_anything_runs(tmp_path, capsys, train, launch, key):
    from bench.cli import main

    s = tiny_suite(train={"steps": 2, "batch_size": 8, **train}, launch={"executor": "local", **launch})
    path = write_suite(tmp_path / "bad.yaml", s)
    rc = main(["run", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and key in err, err
    assert not (tmp_path / "out").exists()


def test_deepspeed_run_with_a_0dim_parameter_fails_naming_it(tmp_path):
    """A plugin with a 0-dim parameter under DeepSpeed: the run is recorded as failed with one line
    naming the parameter, instead of DeepSpeed's "cannot view Float as Byte" from inside its
    start-up broadcast."""
    pytest.importorskip("deepspeed", reason="DeepSpeed not installed (pip install 'tdbench[deepspeed]')")
    import torch

    from bench import registry
    from bench.registry import get_method

    mdlm = get_method("mdlm")

    class ScalarToy(mdlm):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.temperature = torch.nn.Parameter(torch.tensor(1.0))

        def loss(self, x0, counted, u):
            return super().loss(x0, counted, u) * self.temperature

    registry.register("scalar-toy")(ScalarToy)
    try:
        s = tiny_suite(name="scalar", methods=[{"method": "scalar-toy"}], baseline=None,
                       launch={"executor": "debug", "threads": 1},
                       train={"steps": 2, "batch_size": 8, "lr": 3e-3, "warmup": 1, "ckpt_every": 2,
                              "engine": "deepspeed", "zero_stage": 2})
        suite, specs = load_suite(write_suite(tmp_path / "scalar.yaml", s))
        st = run_suite(suite, specs, tmp_path / "out", "debug")
        assert set(st.values()) == {"failed"}, st
        rec = json.loads(next((tmp_path / "out" / "runs").glob("*/result.json")).read_text())
        assert "deepspeed cannot broadcast 0-dim parameters" in rec["error"] and "temperature" in rec["error"], rec
    finally:
        registry._METHODS.pop("scalar-toy", None)
