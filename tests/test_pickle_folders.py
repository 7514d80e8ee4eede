"""The folders that hold pickles are private (issue 24, point 5).

Three places in a results directory hold files that are unpickled: submitit's job pickles of
the local executor (``.submitit/``) and of Slurm (``.slurm/``), read by the job they start, and
DeepSpeed's ZeRO optimizer shards (``ckpt/…/deepspeed/``), read with ``torch.load`` inside
DeepSpeed on resume. On a group-writable ``--out`` anyone in the group could swap them for code
that runs as the job's owner, so each is created 0700. A local executor's folder is keyed by
host and a random id (not the PID: two hosts or containers sharing ``--out`` reuse PIDs)."""
from __future__ import annotations

import os
import re
import socket
import stat
from pathlib import Path

import pytest
from conftest import tiny_suite, write_suite


class _Stop(Exception):
    pass


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture()
def open_umask():
    old = os.umask(0o002)   # a shared results directory: group-writable by default
    yield
    os.umask(old)


def test_local_executor_folder_is_0700_and_keyed_by_host_and_random_id(tmp_path, monkeypatch, open_umask):
    import submitit

    from bench.launch import run_local
    from bench.suite import load_suite

    suite, specs = load_suite(write_suite(tmp_path / "s.yaml", tiny_suite()))
    seen = []

    class FakeExecutor:
        def __init__(self, folder, **kw):
            seen.append(Path(folder))
            raise _Stop()

    monkeypatch.setattr(submitit, "LocalExecutor", FakeExecutor)
    folders = []
    for _ in range(2):
        with pytest.raises(_Stop):
            run_local(specs, tmp_path / "out", suite, lambda *a: None)
        folders.append(seen[-1])
    for f in folders:
        assert f.parent == tmp_path / "out" / ".submitit", f
        assert re.fullmatch(re.escape(socket.gethostname()) + r"-[0-9a-f]{12}", f.name), f.name
        assert _mode(f) == 0o700, oct(_mode(f))
    assert folders[0] != folders[1]   # a random id per invocation, not the PID


def test_slurm_folder_is_0700(tmp_path, monkeypatch, open_umask):
    import importlib

    import submitit

    from bench.slurm import load_profile
    from bench.suite import load_suite

    sub = importlib.import_module("bench.slurm.submit")

    suite, specs = load_suite(write_suite(tmp_path / "s.yaml", tiny_suite()))
    prof, path = load_profile("dev")
    monkeypatch.setattr(sub, "check_profile", lambda *a, **k: None)
    monkeypatch.setattr(sub, "live_runs", lambda *a, **k: {})
    seen = []

    class FakeExecutor:
        def __init__(self, folder, **kw):
            seen.append((Path(folder), _mode(Path(folder)) if Path(folder).exists() else None))
            raise _Stop()

    monkeypatch.setattr(submitit, "SlurmExecutor", FakeExecutor)
    with pytest.raises(_Stop):
        sub.submit(suite, specs, tmp_path / "out", prof, path)
    folder, mode = seen[0]
    assert folder == (tmp_path / "out" / ".slurm").resolve()
    assert mode == 0o700, f"the Slurm pickle folder is {oct(mode) if mode is not None else 'not created yet'}"

    from bench.slurm.ledger import append_ledger, slurm_dir
    out2 = tmp_path / "out2"
    append_ledger(out2, {"cancelled": [], "at": "now"})   # the ledger creates it 0700 as well
    assert _mode(slurm_dir(out2)) == 0o700


def test_deepspeed_shard_folder_is_0700(tmp_path, open_umask):
    """save_deepspeed with a stand-in engine that writes as DeepSpeed does (makedirs, then a
    pickled ``.pt`` per rank): the published ``deepspeed/`` folder is 0700."""
    import torch

    from bench import checkpoint

    class Acc:
        is_main_process, num_processes = True, 1

        def wait_for_everyone(self):
            pass

        def get_state_dict(self, engine):
            return {"w": torch.zeros(2)}

    class Engine:
        def save_checkpoint(self, path, tag, save_latest):
            os.makedirs(os.path.join(path, tag), exist_ok=True)
            torch.save({"optimizer": {}}, os.path.join(path, tag, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))

    class Sched:
        def state_dict(self):
            return {}

    root = tmp_path / "ckpt"
    checkpoint.save_deepspeed(root, 4, Acc(), Engine(), Sched(), None, {"step": 4})
    ds = root / "step_0000004" / checkpoint.DS_DIR
    assert ds.is_dir() and _mode(ds) == 0o700, oct(_mode(ds))
