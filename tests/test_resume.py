"""A run SIGKILLed mid-training and restarted resumes from its last checkpoint, and its final
metrics equal an uninterrupted run's exactly (CPU, one thread: the batch and noise of step k
depend only on (seed, k), and weights/optimizer/scheduler are restored bit for bit)."""
from __future__ import annotations

import json

from conftest import complete_record, metric_rows, run_killed_at, specs_of, tiny_suite

from bench.runner import execute


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    suite = tiny_suite(train={"steps": 60, "batch_size": 8, "lr": 3e-3, "warmup": 2, "ckpt_every": 10})
    spec = [s for s in specs_of(suite, tmp_path) if s.method == "mdlm"][0]
    spec_json = json.dumps(spec.model_dump(mode="json"))

    ref_dir = tmp_path / "uninterrupted"
    assert execute(json.loads(spec_json), ref_dir, 1) == "complete"
    ref = metric_rows(complete_record(ref_dir))

    run_dir = tmp_path / "killed"
    run_killed_at(spec_json, run_dir, 20)
    assert json.loads((run_dir / "result.json").read_text())["status"] == "running"

    assert execute(json.loads(spec_json), run_dir, 1) == "complete"
    rec = complete_record(run_dir)
    assert rec["train"]["resumed_from_step"] == 20
    assert "resuming from step_0000020" in (run_dir / "log.txt").read_text()
    assert metric_rows(rec) == ref  # bit-identical


def test_corrupt_checkpoint_fails_the_run_naming_the_file(tmp_path):
    suite = tiny_suite(train={"steps": 8, "batch_size": 8, "lr": 3e-3, "warmup": 2, "ckpt_every": 4})
    spec = specs_of(suite, tmp_path)[0]
    rd = tmp_path / "run"
    ck = rd / "ckpt" / "step_0000004"
    ck.mkdir(parents=True)
    (ck / "model.safetensors").write_bytes(b"not a safetensors file")
    (ck / "state.json").write_text("{}")
    from bench.checkpoint import write_manifest
    write_manifest(ck)  # hashes match (as if written so): the failure is in parsing the weights
    assert execute(spec.model_dump(mode="json"), rd, 1) == "failed"
    rec = json.loads((rd / "result.json").read_text())
    assert rec["status"] == "failed"
    assert "model.safetensors: corrupt checkpoint" in rec["error"]


def test_reload_after_zero3_and_load_final_method_read_the_same_weights(tmp_path):
    """The two ways a run's final weights are read back — the runner's reload after ZeRO-3
    training and `tdbench sample`'s load_final_method — go through one loader and agree."""
    import torch
    from conftest import tiny_suite, write_suite

    from bench.cli import main
    from bench.config import RunSpec
    from bench.data import get_tokenizer
    from bench.records import read_record
    from bench.runner import _reload_final
    from bench.samples import load_final_method

    f = write_suite(tmp_path / "s.yaml", tiny_suite())
    assert main(["run", str(f), "--out", str(tmp_path / "out")]) == 0
    rd = sorted((tmp_path / "out" / "runs").iterdir())[0]
    spec = RunSpec(**read_record(rd / "result.json")["spec"])
    a = _reload_final(spec, get_tokenizer(spec.data), rd)
    b, _ = load_final_method(rd)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(v.abs().sum() > 0 for k, v in sa.items() if "head" in k), "trained weights, not the zero init"
