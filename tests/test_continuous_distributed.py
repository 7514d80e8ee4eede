"""Distributed training and resume for the continuous methods, as tests/test_distributed.py and
tests/test_resume.py check them for the discrete ones:

- a 2-process DDP run (gloo, local executor) of Diffusion-LM +SC, PLAID and SSD-LM +SC equals
  the 1-process run with the same global batch (micro-batch 4, 2 accumulation steps): every loss
  of the curve and every perplexity within 1e-6 relative, every weight within 1e-6 absolute.
  The self-conditioning coin and the Gaussian noise of a micro-batch depend on its offset in the
  global batch, not on the rank; DDP runs with find_unused_parameters=False, so this also proves
  no parameter is left out of a step (the backbone builds no token embedding for them).
- SIGKILL mid-training and restart gives bit-identical metrics.
"""
from __future__ import annotations

import json
import math

import pytest
from conftest import complete_record, metric_rows, run_killed_at, specs_of, tiny_suite, write_suite

from bench.launch import run_suite
from bench.runner import execute
from bench.suite import load_suite

STEPS = 12
METHODS = [{"method": "diffusion-lm", "self_condition": True}, {"method": "plaid"},
           {"method": "ssd-lm", "self_condition": True}]


def _records(out):
    recs = {}
    for p in sorted((out / "runs").glob("*/result.json")):
        r = json.loads(p.read_text())
        assert r["status"] == "complete", f"{p}: {r.get('error')}\n{r.get('log_tail', '')}"
        recs[r["method"]] = r
    return recs


def _weights(out, method):
    from safetensors.torch import load_file

    ck = sorted((out / "runs").glob(f"{method}-*/ckpt/step_*"))[-1]
    return load_file(ck / "model.safetensors")


def _close(a, b, rel):
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def _suite(tmp_path, name, launch, **train):
    s = tiny_suite(name=name, methods=METHODS, baseline=None, launch=launch,
                   train={"steps": STEPS, "batch_size": 8, "lr": 3e-3, "warmup": 2, "ckpt_every": 6, **train})
    return load_suite(write_suite(tmp_path / f"{name}.yaml", s))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The 1-process reference: micro-batch 4, 2 accumulation steps, the same global batch."""
    tmp = tmp_path_factory.mktemp("one")
    s1, sp1 = _suite(tmp, "one", {"executor": "debug", "threads": 1, "micro_batch": 4})
    assert set(run_suite(s1, sp1, tmp / "one", "debug").values()) == {"complete"}
    return tmp / "one"


def test_ddp_two_processes_equal_one_process(tmp_path, one_process):
    s2, sp2 = _suite(tmp_path, "ddp2", {"executor": "local", "threads": 1, "tasks_per_node": 2})
    assert set(run_suite(s2, sp2, tmp_path / "ddp2", "local").values()) == {"complete"}
    two, one = _records(tmp_path / "ddp2"), _records(one_process)
    assert set(two) == set(one) == {"diffusion-lm", "plaid", "ssd-lm"}
    for m in two:
        t2, t1 = two[m]["train"], one[m]["train"]
        assert t2["world_size"] == 2 and t2["engine"] == "ddp" and t1["grad_accum"] == 2
        c = t2["param_checksums"]
        assert c[0] == c[1], f"{m}: ranks diverged"
        for a, b in zip(t2["loss_curve"], t1["loss_curve"]):
            assert _close(a, b, 1e-6), (m, t2["loss_curve"], t1["loss_curve"])
        for a, b in zip(two[m]["metrics"], one[m]["metrics"]):
            assert _close(a["value"], b["value"], 1e-6), (m, a, b)
        w2, w1 = _weights(tmp_path / "ddp2", m), _weights(one_process, m)
        assert max(float((w2[k] - w1[k]).abs().max()) for k in w1) <= 1e-6, m


def test_deepspeed_zero2_two_processes_match_one_process(tmp_path, one_process):
    """ZeRO-2 on 2 processes trains each continuous method (none has a token embedding in its
    backbone) to the 1-process result: the same tolerance as the discrete methods' ZeRO-2 test
    (1e-4 relative: DeepSpeed reduces gradients in its own buckets and order)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed not installed (pip install 'tdbench[deepspeed]')")
    s, sp = _suite(tmp_path, "zero2", {"executor": "local", "threads": 1, "tasks_per_node": 2},
                   engine="deepspeed", zero_stage=2)
    st = run_suite(s, sp, tmp_path / "zero2", "local")
    assert set(st.values()) == {"complete"}, st
    ds, one = _records(tmp_path / "zero2"), _records(one_process)
    assert set(ds) == {"diffusion-lm", "plaid", "ssd-lm"}
    for m in ds:
        t = ds[m]["train"]
        assert t["engine"] == "deepspeed" and t["world_size"] == 2
        assert t["param_checksums"][0] == t["param_checksums"][1], f"{m}: ranks diverged"
        assert _close(t["final_loss"], one[m]["train"]["final_loss"], 1e-4), (m, t["final_loss"], one[m]["train"])
        for a, b in zip(ds[m]["metrics"], one[m]["metrics"]):
            assert _close(a["value"], b["value"], 1e-4), (m, a, b)


@pytest.mark.parametrize("entry", METHODS, ids=[m["method"] for m in METHODS])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, entry):
    suite = tiny_suite(methods=[entry], baseline=None,
                       train={"steps": 40, "batch_size": 8, "lr": 3e-3, "warmup": 2, "ckpt_every": 10})
    spec = specs_of(suite, tmp_path)[0]
    spec_json = json.dumps(spec.model_dump(mode="json"))

    ref_dir = tmp_path / "uninterrupted"
    assert execute(json.loads(spec_json), ref_dir, 1) == "complete"
    ref = complete_record(ref_dir)
    run_dir = tmp_path / "killed"
    run_killed_at(spec_json, run_dir, 20)
    assert execute(json.loads(spec_json), run_dir, 1) == "complete"
    rec = complete_record(run_dir)
    assert rec["train"]["resumed_from_step"] == 20
    assert metric_rows(rec) == metric_rows(ref)
    assert rec["train"]["loss_curve"] == ref["train"]["loss_curve"]
