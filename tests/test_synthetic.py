"""Correctness by construction on a source with a known entropy (suites/synthetic.yaml):
the AR perplexity approaches the true one (within 3%), and the MDLM bound stays above it
(the upper end of its CI is ≥ the truth)."""
from __future__ import annotations

import pandas as pd
from conftest import REPO

from bench.cli import main


def test_synthetic_suite(tmp_path):
    out = tmp_path / "out"
    # one seed (the committed table has three): the bound's own Monte-Carlo CI is what is checked
    assert main(["run", str(REPO / "suites" / "synthetic.yaml"), "--out", str(out), "--executor", "debug",
                 "--seeds", "0"]) == 0
    t = pd.read_csv(out / "leaderboard.csv")
    t = t[t.metric == "ppl"].set_index("model")
    true = t.loc["Source (true)", "value"]
    ar = t.loc["GPT-2"]
    mdlm = t.loc["MDLM"]
    assert abs(ar.value / true - 1) < 0.03, (ar.value, true)
    assert bool(mdlm.bound) and mdlm.ci_high >= true, (mdlm.value, mdlm.ci_high, true)
    assert not bool(ar.bound)
