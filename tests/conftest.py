"""Shared fixtures: an isolated data cache per test session, and tiny suites/specs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    os.environ.setdefault("TDBENCH_CACHE", str(tmp_path_factory.mktemp("tdbench-cache")))
    yield


def tiny_suite(**over) -> dict:
    """A suite small enough to train in seconds on one CPU thread."""
    suite = {
        "name": "tiny",
        "data": {"train": {"name": "austen"}, "eval": [{"name": "austen"}, {"name": "kjv"}],
                 "tokenizer": {"name": "bpe", "vocab_size": 512}, "seq_len": 32},
        "sizes": {"tiny": {"layers": 1, "hidden": 32, "heads": 2, "cond_dim": 16}},
        "methods": [{"method": "mdlm"}],
        "baseline": "ar",
        "train": {"steps": 12, "batch_size": 8, "lr": 3e-3, "warmup": 2, "ckpt_every": 4},
        "eval": {"t_samples": 2, "max_blocks": 8, "batch_size": 8},
        "seeds": [0],
        "launch": {"executor": "debug", "threads": 1},
    }
    for k, v in over.items():
        suite[k] = v
    return suite


def write_suite(path: Path, suite: dict) -> Path:
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def complete_record(run_dir: Path) -> dict:
    """A run's result.json, which must say complete (else the test fails with its error and log tail)."""
    rec = json.loads((Path(run_dir) / "result.json").read_text())
    assert rec["status"] == "complete", f"{rec.get('error')}\n{rec.get('log_tail', '')}"
    return rec


def metric_rows(rec: dict) -> list[tuple]:
    """(dataset, value, ci_low, ci_high) of each metric of a record: what a resumed run must repeat."""
    return [(m["dataset"], m["value"], m["ci_low"], m["ci_high"]) for m in rec["metrics"]]


def dry_run_error(tmp_path: Path, capsys, suite: dict) -> str:
    """`tdbench run SUITE --dry-run` of a bad suite: asserts exit code 2, a one-line message and
    nothing written; returns the message."""
    from bench.cli import main

    f = write_suite(tmp_path / "s.yaml", suite)
    assert main(["run", str(f), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    return err


def specs_of(suite: dict, tmp_path: Path):
    from bench.suite import load_suite

    return load_suite(write_suite(tmp_path / "suite.yaml", suite))[1]


# A child that runs one spec and SIGKILLs itself right after checkpoint K is published: the kill
# lands at a known step whatever the machine's speed. (A watcher polling the run directory raced
# fast runs: step 20 lived only until step 30 replaced it, and on CI a tiny run finished all its
# steps before the watcher saw it.)
_KILL_CHILD = """
import json, os, signal, sys
from pathlib import Path
{prelude}
import bench.checkpoint as C
from bench.runner import execute
publish, K, STAGE = C.publish, int(sys.argv[3]), sys.argv[4] or None
def publish_then_die(root, step, *a, **k):
    publish(root, step, *a, **k)
    if step == K and (STAGE is None or Path(root).name == STAGE):
        os.kill(os.getpid(), signal.SIGKILL)
C.publish = publish_then_die  # the savers look it up at call time
execute(json.loads(sys.argv[1]), sys.argv[2], 1)
"""


def run_killed_at(spec_json: str, run_dir: Path, step: int, *, stage: str | None = None,
                  prelude: str = "", env: dict | None = None) -> None:
    """Run ``spec_json`` into ``run_dir`` in a child process SIGKILLed just after its checkpoint
    ``step`` (of ``stage``'s checkpoint directory, when given) is published; the child must die
    by that signal, not finish or fail, and leave that checkpoint as the newest one (the one
    before it is kept too: bench.checkpoint keeps the last two)."""
    proc = subprocess.run([sys.executable, "-c", _KILL_CHILD.format(prelude=prelude), spec_json,
                           str(run_dir), str(step), stage or ""], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"child exited {proc.returncode}:\n{proc.stderr[-2000:]}"
    left = sorted(c.name for c in (Path(run_dir) / "ckpt" / (stage or "")).glob("step_*"))
    assert left and left[-1] == f"step_{step:07d}" and len(left) <= 2, left


TESTS_DIR = Path(__file__).resolve().parent


def subprocess_env() -> dict:
    """The environment of a child Python that imports this checkout and the tests' helpers."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR.parent), str(TESTS_DIR),
                                                         os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def start_ranks(argv: list[str], n: int = 2) -> list[subprocess.Popen]:
    """``n`` processes of ``argv`` as the ranks of one torch.distributed job on this host (a free
    port each time); stdout discarded, stderr piped for the caller to read."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    return [subprocess.Popen(argv, env={**subprocess_env(), "RANK": str(r), "LOCAL_RANK": str(r),
                                        "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n),
                                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r in range(n)]


def source_ar(source, delta: float):
    """An 'AR model' (a bench Method with an exact likelihood) whose NLL of a block is the
    synthetic source's exact −log p(block) + δ per counted token."""
    import numpy as np
    import torch

    from bench.method import Method

    class SourceAR(Method):
        likelihood, name = "exact", "source-ar"

        def __init__(self):
            torch.nn.Module.__init__(self)
            self.src, self.delta = source, delta
            self.w = torch.nn.Parameter(torch.zeros(1))

        def nll(self, x0, counted, u):
            lp = self.src.log_prob(x0.numpy().astype(np.int64))
            return torch.as_tensor(-lp + self.delta * counted.sum(1).numpy())

    return SourceAR()
