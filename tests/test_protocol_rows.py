"""What a row's number means: truncated estimates (t_min > 0) are never bounds; synthetic
sources get the exact NLL of the very test blocks and each row's paired gap to it; character
tokens get bits per character. Runs the real ``bench.runner.evaluate_all`` and leaderboard."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import source_ar, specs_of, tiny_suite

from bench import leaderboard
from bench.runner import build_method, evaluate_all


def _log(*_):
    pass


def _record(spec, metrics, reference):
    return {"status": "complete", "label": spec.label, "size": spec.size, "seed": spec.seed,
            "metrics": metrics, "reference": reference, "train": {}, "protocol": {"confidence": 0.95}}


def test_truncated_rows_are_not_bounds(tmp_path):
    """t_min > 0: the record says ``estimate: truncated`` and ``bound: false``; the table shows
    "≈ … (t_min)", never "≤", and the truncated rows never share a column with t_min = 0 rows."""
    specs = specs_of(tiny_suite(baseline=None, eval={"t_samples": 2, "max_blocks": 2, "batch_size": 2,
                                                     "t_min": 0.1}), tmp_path)
    spec = specs[0]
    torch.manual_seed(0)
    method = build_method(spec, 512)
    metrics, _ = evaluate_all(method, spec, "cpu", _log)
    row = metrics[0]
    assert row["bound"] is False and row["estimate"] == "truncated", row
    full = specs_of(tiny_suite(baseline=None, eval={"t_samples": 2, "max_blocks": 2, "batch_size": 2}),
                    tmp_path)[0]
    m0, _ = evaluate_all(method, full, "cpu", _log)
    assert m0[0]["bound"] is True and m0[0]["estimate"] == "bound"
    t = leaderboard.tidy([_record(spec, metrics, []), _record(full.model_copy(update={"label": "MDLM full"}), m0, [])])
    md = leaderboard.markdown(t)
    trunc_line = next(x for x in md.splitlines() if "| MDLM |" in x)
    assert "≤" not in trunc_line and "≈" in trunc_line, trunc_line
    assert t[(t.model == "MDLM") & (t.metric == "ppl")].bound.eq(False).all()
    assert t.protocol.nunique() == 2 and "[" in md.splitlines()[0]   # separate columns per protocol


@pytest.mark.parametrize("delta", [0.0, 0.05])
def test_source_nll_of_the_test_blocks_and_paired_gap(tmp_path, delta):
    from bench.data import dataset_params, load_blocks
    from bench.data.synthetic import markov

    src = {"name": "markov", "vocab": 8, "order": 1, "seed": 3, "test_blocks": 64}
    suite = tiny_suite(baseline=None, data={"train": src, "eval": [src], "seq_len": 16},
                       eval={"t_samples": 2, "max_blocks": 64, "batch_size": 16, "packing": "none"})
    spec = specs_of(suite, tmp_path)[0]
    ref = spec.data.eval[0]
    source = markov(dataset_params(ref))
    metrics, reference = evaluate_all(source_ar(source, delta), spec, "cpu", _log)
    blocks = np.asarray(load_blocks(ref, "test", spec.data, "none").tokens, dtype=np.int64)
    # the source's NLL of these blocks, recomputed token by token from the chain's tables
    nll = -np.log(source.pi[blocks[:, 0]]).sum()
    for j in range(1, blocks.shape[1]):
        nll -= np.log(source.P[blocks[:, j - 1], blocks[:, j]]).sum()
    C = blocks.size
    by = {r["label"]: r for r in reference}
    assert by["Source (test blocks)"]["value"] == pytest.approx(math.exp(nll / C), rel=1e-9)
    assert by["Source (true)"]["value"] == pytest.approx(math.exp(source.block_entropy(16) / 16), rel=1e-12)
    assert abs(math.log(by["Source (test blocks)"]["value"] / by["Source (true)"]["value"])) > 1e-3  # they differ
    gap = next(m for m in metrics if m["metric"] == "gap")
    assert gap["value"] == pytest.approx(delta, abs=1e-9)                  # paired: exactly δ
    assert gap["ci_high"] - gap["ci_low"] == pytest.approx(0.0, abs=1e-9)  # no block-to-block noise left
    t = leaderboard.tidy([_record(spec, metrics, reference)])
    assert set(t.model) == {spec.label, "Source (true)", "Source (test blocks)"}
    assert "gap" in set(t.metric)


def test_paired_gap_interval_covers_a_known_gap():
    """The paired interval (blocks as the sample) covers the true mean gap at about the nominal
    rate: d_i = δ·c_i + noise_i, 400 repetitions, coverage in [0.91, 0.985]."""
    from bench.runner import paired_gap

    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(400):
        c = rng.integers(5, 20, size=40).astype(float)
        s = rng.normal(30, 10, size=40)
        n = s + 0.1 * c + rng.normal(0, 0.5, size=40)
        g = paired_gap(n[:, None], c, s, 0.95)
        hits += g["ci_low"] <= 0.1 <= g["ci_high"]
    assert 0.91 <= hits / 400 <= 0.985, hits


def test_char_rows_have_bpc(tmp_path):
    suite = tiny_suite(baseline=None, data={"train": {"name": "austen"}, "eval": [{"name": "kjv"}],
                                            "tokenizer": {"name": "char"}, "seq_len": 32},
                       eval={"t_samples": 2, "max_blocks": 2, "batch_size": 2, "packing": "none"})
    spec = specs_of(suite, tmp_path)[0]
    metrics, _ = evaluate_all(build_method(spec, 27), spec, "cpu", _log)
    ppl = next(m for m in metrics if m["metric"] == "ppl")
    bpc = next(m for m in metrics if m["metric"] == "bpc")
    assert bpc["value"] == pytest.approx(math.log2(ppl["value"]), rel=1e-12)
    assert bpc["ci_high"] == pytest.approx(math.log2(ppl["ci_high"]), rel=1e-12) and bpc["bound"] == ppl["bound"]


def test_learning_curve_points_and_plot(tmp_path):
    """eval.curve_every: points at every N-th step (kept in the record and the index), and
    learning.png next to the leaderboard."""
    import json

    from conftest import write_suite

    from bench.cli import main

    suite = tiny_suite(data={"train": {"name": "austen"}, "eval": [{"name": "kjv"}], "tokenizer": "char",
                             "seq_len": 32},
                       train={"steps": 6, "batch_size": 4, "lr": 3e-3, "warmup": 1, "ckpt_every": 3},
                       eval={"t_samples": 2, "max_blocks": 2, "batch_size": 2, "packing": "none",
                             "curve_every": 2, "curve_blocks": 2, "curve_t_samples": 2})
    out = tmp_path / "out"
    assert main(["run", str(write_suite(tmp_path / "s.yaml", suite)), "--out", str(out)]) == 0
    assert (out / "learning.png").stat().st_size > 0
    for rd in (out / "runs").iterdir():
        curve = json.loads((rd / "result.json").read_text())["train"]["curve"]
        assert [p["step"] for p in curve] == [2, 4, 6]
        assert all(p["char"] and p["blocks"] == 2 and 0 < p["nll_per_token"] < 10 for p in curve)
        assert curve[-1]["tokens"] == 6 * 4 * 32
