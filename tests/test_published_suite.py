"""suites/published.yaml: it validates; its dry run lists every row offline, costed by the size
each row declares, and writes nothing; it lines up with results/reference/mdlm-owt.csv (every
published cell of its rows has an eval set); and it runs end to end offline on stand-ins — a
tiny remote-code checkpoint of mdlm-owt's interface (forward(input_ids, timesteps), GPT-2 ids,
[MASK] = 50257) for mdlm-owt, tests/bd3_standin.py (BD3-LM's: [x_t, x_0] in, the x_t half's
logits out, its config's block_size) for each bd3lm-owt-block_size checkpoint, and hub-shaped
fixture copies for every dataset — after which `tdbench leaderboard --compare reference/mdlm-owt`
matches every published MDLM and BD3-LM cell and says the BD3-LM cells' protocol is not ours.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from bench.cli import main
from bench.suite import load_suite
from tests import hub_fixtures as H
from tests.conftest import complete_record, write_suite

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "suites" / "published.yaml"


def reference():
    from bench.tables import read_reference, resolve_reference

    return read_reference(resolve_reference("reference/mdlm-owt"))


def test_dry_run_lists_every_row_offline_costed_by_its_declared_size(tmp_path, capsys, monkeypatch):
    """Every run id is listed as evaluation only with GPU-hours = 2·N·(max_blocks·L)·K per eval
    set / (MFU·peak·3600), N the row's n_params and L the ids a pass feeds (2·seq_len for a
    BD3-LM row's [x_t, x_0], seq_len otherwise; no model is loaded, nothing trained), and the
    dry run writes nothing: no output directory, no cache entry."""
    from bench.plan import DEFAULT_MFU, DEFAULT_PEAK_TFLOPS, estimate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TDBENCH_CACHE", str(tmp_path / "cache"))
    suite, specs = load_suite(SUITE)
    out = tmp_path / "out"
    assert main(["run", str(SUITE), "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert not out.exists() and not (tmp_path / "cache").exists()
    assert f"{len(specs)} runs" in text and specs
    for e in estimate(specs, DEFAULT_MFU, DEFAULT_PEAK_TFLOPS):
        s = e.spec
        line = next(x for x in text.splitlines() if x.startswith(s.run_id))
        assert "evaluation only" in line and s.label in line
        n = s.params["n_params"]
        fed = s.data.seq_len * (2 if s.params.get("block_size") else 1)
        tokens = s.eval.max_blocks * fed * s.eval.t_samples * len(s.data.eval)
        want = 2.0 * n * tokens / (DEFAULT_MFU * DEFAULT_PEAK_TFLOPS * 1e12 * 3600)
        assert e.train_flops == 0 and e.gpu_hours == pytest.approx(want, rel=1e-12)  # float arithmetic only
        assert f"{want:,.1f}" in line


def test_suite_lines_up_with_the_published_table():
    """Each row's (size, label) is a model of reference/mdlm-owt, and every dataset that model
    has there is one of the suite's eval sets (so the comparison can match every cell)."""
    ref, source = reference()
    suite, specs = load_suite(SUITE)
    evals = {r.name for r in suite.data.eval}
    for s in specs:
        theirs = set(ref[(ref["size"] == s.size) & (ref["model"] == s.label)]["dataset"])
        assert theirs and theirs <= evals, (s.label, theirs - evals)
    assert {"source", "verified"} <= set(ref.columns) and ref["source"].notna().all()
    assert ref["source"].str.contains(r"arXiv \d{4}\.\d{5}").all()


def test_scientific_papers_as_mdlm_reads_them(tmp_path):
    """pubmed / arxiv: the test split is the hub's validation split (as MDLM scores it), and
    MDLM's detokenizer (WikiText rules, then LM1B's) joins '@.@', '@-@' and spaced punctuation."""
    from bench.data.detokenizers import DETOKENIZERS
    from bench.data.hub import SOURCES, HubParams, split_documents

    for name in ("pubmed", "arxiv"):
        docs = split_documents(name, HubParams(path=str(H.make(name, tmp_path))), "test")["text"]
        assert docs == H.SCI_ROWS
        text = DETOKENIZERS[SOURCES[name].detokenizer](docs[0])
        assert "45.2 years (range 20-70)." in text and "infection, as reported, was low" in text


def standin_suite(tmp_path: Path):
    """The published suite with every hub name replaced by a local stand-in of the same
    interface and every dataset by a hub-shaped fixture copy; tiny blocks and budgets."""
    from tests.bd3_standin import save_standin
    from tests.test_hf_masked_diffusion import remote_code_model

    y = yaml.safe_load(SUITE.read_text())
    y["data"]["seq_len"] = 32
    mods = []
    for i, row in enumerate(y["methods"]):
        if row.get("block_size"):        # a BD3-LM checkpoint: its interface, its block size
            save_standin(tmp_path / f"standin{i}", block_size=row["block_size"], model_length=32)
        else:
            mods.append(remote_code_model(tmp_path / f"standin{i}"))
        row["model"] = str(tmp_path / f"standin{i}")
        row.pop("revision", None)
    data = tmp_path / "hub"
    y["data"]["train"]["path"] = str(H.make(y["data"]["train"]["name"], data))
    for r in y["data"]["eval"]:
        r["path"] = str(H.make(r["name"], data))
    y["eval"].update(max_blocks=1, t_samples=2, batch_size=1, samples=1, sample_steps=[2])
    y["launch"] = {"executor": "debug", "threads": 1}
    return write_suite(tmp_path / "published-standins.yaml", y), mods


def test_runs_end_to_end_on_standins_and_compares_with_the_published_table(tmp_path, monkeypatch):
    from tests import bd3_standin

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, mods = standin_suite(tmp_path)
    out = tmp_path / "out"
    for m in [*mods, bd3_standin]:
        m.SEEN.clear()
    assert main(["run", str(path), "--out", str(out)]) == 0
    suite, specs = load_suite(SUITE)
    ref, _ = reference()
    recs = [complete_record(d) for d in sorted((out / "runs").iterdir())]
    assert sorted(r["label"] for r in recs) == sorted(s.label for s in specs)
    for r in recs:
        assert {m["dataset"] for m in r["metrics"]} == {x.name for x in suite.data.eval}
        assert all(math.isfinite(m["value"]) and m["value"] > 0 for m in r["metrics"])
        info = r["method_info"]
        assert info["time_value"] == "zero" and info["trust_remote_code"] is True and info["n_params"] > 0
        row = next(s.params for s in specs if s.label == r["label"])
        assert info["block_size"] == row.get("block_size") and ("L_BD" in info["estimator"]) == bool(info["block_size"])
    # mdlm-owt and BD3-LM are time-agnostic (trained with σ = 0): the keyword they require always carries 0
    seen = [t for m in [*mods, bd3_standin] for t in m.SEEN]
    assert bd3_standin.SEEN
    assert seen and all((t == 0).all() for t in seen)
    assert main(["leaderboard", str(out), "--compare", "reference/mdlm-owt"]) == 0
    md = (out / "leaderboard.md").read_text()
    mine = sum(len(ref[(ref["size"] == s.size) & (ref["model"] == s.label)]) for s in specs)
    assert re.search(rf"\b{mine} cell\(s\) matched", md), md[-2000:]
    assert "Published protocol: bd3lm, mdlm; ours: mdlm (eval.protocol) — NOT the same protocol" in md
