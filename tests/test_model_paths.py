"""A pretrained model named by a local path never reaches the Hugging Face hub (issue 24, point 4).

A path-like name (absolute, starting with ``.`` or ``~``, holding ``\\`` or more than one ``/``,
or ``org/name`` whose ``org`` is a local directory) must exist as a local directory; otherwise
every loader (the hf-causal-lm method, the gen-ppl scorer, the MAUVE featurizer, the frozen
encoders of the latent family) stops with one line naming the key, and nothing is asked of the
hub. Tested with the hub client disabled: every download function and name lookup records the
attempt and fails. A hub model is recorded with the commit it resolved to and the sha256 of its
weights (a fake hub cache, offline)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO, write_suite

from bench.errors import UserError


@pytest.fixture()
def hub_calls(monkeypatch):
    """Every way to the hub fails and is recorded: huggingface_hub's download functions (where
    transformers imported them too) and name resolution / connections at the socket."""
    import huggingface_hub
    import huggingface_hub.file_download as fd
    import transformers.utils.hub as th

    calls = []

    def fake(what, real=None):
        def f(*a, **k):
            if real is not None and k.get("local_files_only"):
                return real(*a, **k)   # a look-up in the local hub cache, not a hub call
            calls.append((what, a[:1], {k2: v for k2, v in k.items() if k2 in ("repo_id", "filename")}))
            raise OSError(f"hub disabled in this test ({what})")
        return f

    for mod in (huggingface_hub, fd, th):
        for name in ("hf_hub_download", "snapshot_download", "get_hf_file_metadata", "model_info"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, fake(name, getattr(mod, name)))
    monkeypatch.setattr(socket, "getaddrinfo", fake("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", fake("create_connection"))
    return calls


def _loaders():
    from bench import hf
    from bench.metrics.mauve import Featurizer
    from bench.metrics.scorers import make_scorer
    from methods._latent import load_encoder
    from methods.ld4lg import load_seq2seq

    return {
        "hf-causal-lm": lambda n: hf.load_causal_lm(n),
        "scorer": lambda n: make_scorer(n),
        "mauve": lambda n: Featurizer(n, 16),
        "encoder": lambda n: load_encoder(n, "methods[tencdm].encoder"),
        "seq2seq": lambda n: load_seq2seq(n, "methods[ld4lg].lm"),
    }


NAMES = ["./ckpts/gpt2-ft", "../nope/gpt2-ft", "~/no-such-tdbench-dir/gpt2-ft", "ABS", "ckpts/gpt2-ft",
         "a/b/c", "ckpts\\gpt2-ft"]


@pytest.mark.parametrize("loader", ["hf-causal-lm", "scorer", "mauve", "encoder", "seq2seq"])
@pytest.mark.parametrize("name", NAMES)
def test_missing_local_path_is_one_line_and_never_reaches_the_hub(tmp_path, monkeypatch, hub_calls, loader, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpts").mkdir()          # mounted, but the model directory is mistyped
    if name == "ABS":
        name = str(tmp_path / "ckpts" / "gpt2-ft")
    with pytest.raises(UserError) as e:
        _loaders()[loader](name)
    msg = str(e.value)
    assert "no such local directory" in msg and name in msg, msg
    assert "\n" not in msg
    assert hub_calls == [], f"the hub was asked for a local path: {hub_calls}"


@pytest.mark.parametrize("name,local", [("gpt2", False), ("openai-community/gpt2", False), ("ckpts/m", True),
                                        ("./m", True), ("~/m", True), ("/abs/m", True), ("a/b/c", True)])
def test_the_rule_that_tells_a_hub_name_from_a_local_path(tmp_path, monkeypatch, name, local):
    from bench import hf

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpts").mkdir()
    assert hf.is_local_name(name) is local


def test_an_existing_local_directory_loads_without_the_hub(tmp_path, monkeypatch, hub_calls):
    from transformers import GPT2Config, GPT2LMHeadModel

    from bench import hf

    monkeypatch.chdir(tmp_path)
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=16, vocab_size=64)).save_pretrained(
        tmp_path / "ckpts" / "m")
    assert hf.load_causal_lm("ckpts/m").config.n_embd == 16
    assert hub_calls == []


def test_offline_hub_name_not_cached_is_one_line(tmp_path, monkeypatch, hub_calls):
    """HF_HUB_OFFLINE=1: a hub name is looked up in the local hub cache only."""
    from bench import hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        hf.load_causal_lm("tdbench-test/not-cached")
    assert hub_calls == []


# A hub cache laid out as huggingface_hub lays it out, read offline by a fresh process (the hub
# client reads HF_HUB_CACHE / HF_HUB_OFFLINE when it is imported).
_HUB_CHILD = """
import json, sys
from bench.config import BackboneConfig
from bench.data.tokenizers import gpt2
from bench.method import Context, weights_sha256
from bench.registry import get_method
cls = get_method("hf-causal-lm")
m = cls(cls.Params(model="tdbench-test/tiny-gpt2"), BackboneConfig(layers=1, hidden=32, heads=2, cond_dim=16),
        50257, 16, Context(tokenizer=gpt2()))
info = m.info()
print(json.dumps({"revision": info.get("revision"), "weights_sha256": info.get("weights_sha256"),
                  "computed": weights_sha256(m.net)}))
"""


def _fake_hub_cache(root, commit: str, seed: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    repo = root / "models--tdbench-test--tiny-gpt2"
    snap = repo / "snapshots" / commit
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def _hub_info(tmp_path) -> dict:
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", _HUB_CHILD], env=env, capture_output=True, text=True, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_hub_model_is_recorded_with_its_commit_and_weights_sha256(tmp_path):
    """A hub name resolves to a commit; the record shows it and the weights' sha256, so a
    changed hub model (refs/main moved to a new commit) shows in the record."""
    first, second = "a" * 40, "b" * 40
    _fake_hub_cache(tmp_path / "hub", first, seed=0)
    one = _hub_info(tmp_path)
    assert one["revision"] == first and one["weights_sha256"] == one["computed"]
    _fake_hub_cache(tmp_path / "hub", second, seed=1)   # the hub model changed
    two = _hub_info(tmp_path)
    assert two["revision"] == second and two["weights_sha256"] != one["weights_sha256"]


def _suite(tmp_path, **method) -> dict:
    (tmp_path / "doc.txt").write_text("The quick brown fox jumps over the lazy dog.\n")
    text = {"name": "textfile", "path": str(tmp_path / "doc.txt")}
    return {"name": "hf", "data": {"train": text, "eval": [text], "tokenizer": "gpt2", "seq_len": 32},
            "sizes": {"tiny": {"layers": 1, "hidden": 32, "heads": 2}},
            "methods": [{"method": "hf-causal-lm", **method}], "baseline": None,
            "eval": {"protocol": "sedd", "max_blocks": 2}, "launch": {"executor": "debug", "threads": 1}}


def test_pinned_revision_changes_the_run_id(tmp_path):
    """``revision:`` pins the hub commit: it is part of the spec, hence of the run id."""
    from conftest import specs_of

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    base = specs_of(_suite(tmp_path, model="gpt2"), tmp_path / "a")[0]
    pinned = specs_of(_suite(tmp_path, model="gpt2", revision="a" * 40), tmp_path / "b")[0]
    assert base.run_id != pinned.run_id


def test_local_model_row_records_its_weights_sha256(tmp_path):
    """The record of a local directory's row carries the weights' sha256 (and no revision)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from bench.cli import main
    from bench.method import weights_sha256

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64))
    model.save_pretrained(tmp_path / "m")
    write_suite(tmp_path / "s.yaml", _suite(tmp_path, model=str(tmp_path / "m")))
    assert main(["run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out")]) == 0
    rec = json.loads(next((tmp_path / "out" / "runs").glob("*/result.json")).read_text())
    info = rec["method_info"]
    assert info["weights_sha256"] == weights_sha256(model) and info["revision"] is None
