"""Checkpoints survive a crash of the node (issue 24, point 3).

- files, manifest and directories are fsynced before a checkpoint is published, the checkpoint
  root after the rename, and the one before is pruned only then; the last two are kept;
- a torn newest checkpoint (power loss) is skipped with a line in the log: the run resumes from
  the one before and ends exactly as an uninterrupted run;
- with no intact checkpoint left the error says so, and what it tells to delete is true;
- staging directories left by a process killed mid-save are removed when a run starts.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import complete_record, metric_rows, run_killed_at, specs_of, tiny_suite

from bench.errors import UserError
from bench.runner import execute


def _spec(tmp_path, steps=60, every=10):
    suite = tiny_suite(train={"steps": steps, "batch_size": 8, "lr": 3e-3, "warmup": 2, "ckpt_every": every})
    return [s for s in specs_of(suite, tmp_path) if s.method == "mdlm"][0]


def _tear(path):
    with open(path, "r+b") as f:   # what a power loss leaves of a file never fsynced
        f.truncate(os.path.getsize(path) // 3)


def test_torn_newest_checkpoint_falls_back_to_the_older(tmp_path):
    spec = _spec(tmp_path)
    spec_json = json.dumps(spec.model_dump(mode="json"))
    ref_dir = tmp_path / "uninterrupted"
    assert execute(json.loads(spec_json), ref_dir, 1) == "complete"
    ref = complete_record(ref_dir)

    rd = tmp_path / "out" / "runs" / spec.run_id
    run_killed_at(spec_json, rd, 20)
    _tear(rd / "ckpt" / "step_0000020" / "model.safetensors")
    from bench.rundir import check_run_dirs

    check_run_dirs(tmp_path / "out", [spec])   # the pre-flight passes: the one before is intact
    assert execute(json.loads(spec_json), rd, 1) == "complete", json.loads((rd / "result.json").read_text())
    rec = complete_record(rd)
    log = (rd / "log.txt").read_text()
    assert "step_0000020 failed verification" in log and "falling back to step_0000010" in log, log
    assert rec["train"]["resumed_from_step"] == 10
    assert metric_rows(rec) == metric_rows(ref)
    assert rec["train"]["param_checksums"] == ref["train"]["param_checksums"]


def test_no_intact_checkpoint_left_is_said_truthfully(tmp_path):
    spec = _spec(tmp_path)
    spec_json = json.dumps(spec.model_dump(mode="json"))
    rd = tmp_path / "out" / "runs" / spec.run_id
    run_killed_at(spec_json, rd, 10)   # the first checkpoint: nothing before it
    _tear(rd / "ckpt" / "step_0000010" / "model.safetensors")
    from bench.rundir import check_run_dirs

    with pytest.raises(UserError) as e:
        check_run_dirs(tmp_path / "out", [spec])
    msg = str(e.value)
    assert "previous state" not in msg
    assert f"no intact checkpoint left: delete {rd / 'ckpt'} to restart the run from the beginning" in msg, msg
    assert execute(json.loads(spec_json), rd, 1) == "failed"
    assert "no intact checkpoint left" in json.loads((rd / "result.json").read_text())["error"]
    shutil.rmtree(rd / "ckpt")   # as told
    assert execute(json.loads(spec_json), rd, 1) == "complete"


def test_files_and_directories_are_fsynced_and_two_checkpoints_kept(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rmtree = os.fsync, shutil.rmtree

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rmtree(path, *a, **k):
        events.append(("rmtree", str(path)))
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    spec = _spec(tmp_path, steps=12, every=4)
    rd = tmp_path / "run"
    assert execute(spec.model_dump(mode="json"), rd, 1) == "complete"
    root = rd / "ckpt"
    assert sorted(c.name for c in root.glob("step_*")) == ["step_0000008", "step_0000012"], "the last two are kept"
    synced = [p for k, p in events if k == "fsync"]
    for step in (4, 8, 12):
        stage = [p for p in synced if f"/.tmp_step_{step:07d}" in p]
        for name in ("model.safetensors", "optim.pt", "state.json", "manifest.json"):
            assert any(p.endswith("/" + name) for p in stage), (step, name, stage)
        assert any(os.path.basename(p).startswith(f".tmp_step_{step:07d}") for p in stage), "the staging dir"
    root_syncs = [i for i, (k, p) in enumerate(events) if k == "fsync" and p == str(root)]
    assert len(root_syncs) >= 3, "the checkpoint root is fsynced after each rename"
    gone = [i for i, (k, p) in enumerate(events) if k == "rmtree" and p == str(root / "step_0000004")]
    assert gone and gone[0] > root_syncs[2], "step 4 went before step 12 was durable"


def test_stale_staging_directories_are_removed_at_start(tmp_path):
    spec = _spec(tmp_path, steps=12, every=4)
    rd = tmp_path / "run"
    for name in (".tmp_step_0000005", ".tmp_step_0000006.deadbeef"):   # a save killed mid-write
        (rd / "ckpt" / name).mkdir(parents=True)
        (rd / "ckpt" / name / "model.safetensors").write_bytes(b"half")
    assert execute(spec.model_dump(mode="json"), rd, 1) == "complete"
    assert not list((rd / "ckpt").glob(".tmp_step_*"))
