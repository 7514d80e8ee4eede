"""Shared fixtures: an isolated data cache per test session, and tiny suites/specs."""
from __future__ import annotations

import os
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


def specs_of(suite: dict, tmp_path: Path):
    from bench.suite import load_suite

    return load_suite(write_suite(tmp_path / "suite.yaml", suite))[1]
