"""The infilling benchmark (eval.infill, issue 25 point 2): the source's infill truth against brute
force, the hiding patterns, what a left-to-right model is given, the scores, the table, the
ROCStories setting offline, the config, and a tiny suite end to end.

Tolerances: the exact passes (markov forward–backward, both forward algorithms) are compared with
enumeration of every fill of a tiny chain (3 symbols, ≤ 5 hidden positions: ≤ 243 terms of
float64) at 1e-10 nats — summation order alone moves them by ~1e-15; any wrong term (a transition,
an emission, a start weight) moves them by ≥ 1e-3. The HMM's conditional entropy is a Monte-Carlo
estimate: it must lie within 4 standard errors (its own, over the blocks' draws) of enumeration —
deterministic with its fixed seed, and a 4-sigma miss has probability 6e-5 for a correct estimator.
"""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from bench.config import BackboneConfig, EvalConfig, InfillConfig
from bench.data.hmm import HMMParams, HMMSource
from bench.data.posterior import cond_entropy, log_marginal
from bench.data.synthetic import MarkovParams, MarkovSource
from bench.errors import UserError
from bench.infill import Task, fill, keep_of, random_hidden, span_hidden, story_blocks
from bench.metrics.infill import matches, rouge, truth_scores
from tests.conftest import complete_record, tiny_suite, write_suite

TOL = 1e-10


def _patterns(L: int) -> np.ndarray:
    """keep masks of a block of L: a middle span, scattered positions, the first one, the last two."""
    k = np.ones((4, L), dtype=bool)
    k[0, 2:5] = False
    k[1, [0, 3, L - 1]] = False
    k[2, 0] = False
    k[3, L - 2:] = False
    return k


def _enumerate(source, x: np.ndarray, keep: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(log p(x_R), every fill y_S, log p(y_S | x_R)) of one block by listing all V^|S| fills."""
    S = np.nonzero(~keep)[0]
    ys = np.array(list(itertools.product(range(source.vocab), repeat=len(S))), dtype=np.int64)
    blocks = np.repeat(x[None], len(ys), 0)
    blocks[:, S] = ys
    lp = source.log_prob(blocks)
    m = float(np.logaddexp.reduce(lp))
    return m, ys, lp - m


SOURCES = [MarkovSource(MarkovParams(vocab=3, order=1, seed=1)), MarkovSource(MarkovParams(vocab=3, order=2, seed=2))]


@pytest.mark.parametrize("source", SOURCES, ids=["order1", "order2"])
def test_markov_infill_truth_equals_enumeration(source):
    """log p(x_R), H(X_S | x_R) and the truth score of any fill, −log p(y_S | x_R), equal brute
    force on a tiny chain (module doc: 1e-10)."""
    L = 7
    x = source.draw(4, L, np.random.default_rng(0)).astype(np.int64)
    keep = _patterns(L)
    lm = log_marginal(source, x, keep)
    H = cond_entropy(source, x, keep)
    assert H["estimate"] == "exact"
    rng = np.random.default_rng(1)
    for i in range(len(x)):
        m, ys, lc = _enumerate(source, x[i], keep[i])
        assert abs(lm[i] - m) < TOL
        assert abs(H["values"][i] - float(-(np.exp(lc) * lc).sum())) < TOL
        # the truth score of a few fills (as the harness scores them: a line of the infill file)
        S = np.nonzero(~keep[i])[0]
        for j in rng.choice(len(ys), size=3, replace=False):
            y = x[i].copy()
            y[S] = ys[j]
            line = {"ids": y.tolist(), "hidden": S.tolist(), "target": x[i, S].tolist(), "index": i}
            got = truth_scores(source, [line], {"logz": lm})["true_cond_nll"]["value"]
            assert abs(got * len(S) - (-lc[j])) < TOL


def test_hmm_infill_truth_against_enumeration():
    """hmm: log p(x_R) exactly (forward over the hidden states), H(X_S | x_R) within 4 se."""
    source = HMMSource(HMMParams(states=3, vocab=3, seed=0))
    L = 7
    x = source.draw(4, L, np.random.default_rng(0)).astype(np.int64)
    keep = _patterns(L)
    lm = log_marginal(source, x, keep)
    H = cond_entropy(source, x, keep, draws=256, seed=3)
    assert H["estimate"] == "sampled"
    exact = 0.0
    for i in range(len(x)):
        m, _, lc = _enumerate(source, x[i], keep[i])
        assert abs(lm[i] - m) < TOL
        exact += float(-(np.exp(lc) * lc).sum())
    assert abs(H["values"].sum() - exact) < 4 * H["se_total"]


def test_span_and_random_patterns():
    c = InfillConfig(span_fraction=0.25, random_fraction=(0.15, 0.5), seed=3)
    L = 20
    counted = np.ones((40, L), dtype=bool)
    counted[:, 0] = False   # an injected BOS: never hidden
    h = span_hidden(counted, c)
    m = round(0.25 * L)
    assert (h.sum(1) == m).all() and (h == h[0]).all()
    pos = np.nonzero(h[0])[0]
    assert (np.diff(pos) == 1).all() and abs(pos[0] - (L - pos[-1] - 1)) <= 1   # contiguous, centred
    r = random_hidden(counted, c)
    n = counted[0].sum()
    assert not (r & ~counted).any()
    frac = r.sum(1) / n
    assert ((frac >= 0.15 - 0.5 / n) & (frac <= 0.5 + 0.5 / n)).all()
    assert frac.std() > 0.05 and len({tuple(x) for x in r}) == len(r)   # drawn per block
    assert (random_hidden(counted[:7], c) == r[:7]).all()   # block i's pattern never depends on N
    assert not (random_hidden(counted, InfillConfig(seed=4)) == r).all()


def _method(name: str, V: int, L: int):
    from bench.data.tokenizers import IdentityTokenizer
    from bench.method import Context
    from bench.registry import all_methods

    cls = all_methods()[name]
    bb = BackboneConfig(layers=1, hidden=32, heads=2, cond_dim=16)
    torch.manual_seed(0)
    m = cls(cls.Params(), bb, V, L, context=Context(tokenizer=IdentityTokenizer(V)))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def test_ar_fills_from_the_prefix_only():
    """AR is given only what precedes the first hidden position: its fill of the span is the same
    whatever the suffix holds, and changes with the prefix (it does read what it is given); every
    visible position of the filled block is the true one, the target the hidden truth."""
    V, L = 8, 16
    x = torch.randint(0, V, (6, L), generator=torch.Generator().manual_seed(0)).numpy()
    hid = span_hidden(np.ones((6, L), dtype=bool), InfillConfig(span_fraction=0.25))
    right, left = x.copy(), x.copy()
    right[:, 11:] = (right[:, 11:] + 1) % V    # a different right side
    left[:, :5] = (left[:, :5] + 1) % V        # a different left side
    assert (keep_of("prefix", hid) == (np.arange(L) < 6)).all() and (keep_of("any", hid) == ~hid).all()
    assert keep_of("none", hid) is None
    m, c = _method("ar", V, L), InfillConfig(batch_size=4)
    a, b, d = (fill(m, Task("d", "span", t, hid), None, c, 0) for t in (x, right, left))
    for r, x0 in zip(a, x):
        ids = np.asarray(r["ids"])
        assert (ids[~hid[0]] == x0[~hid[0]]).all() and r["target"] == x0[hid[0]].tolist()
    assert all(r["ids"][6:10] == q["ids"][6:10] for r, q in zip(a, b))
    assert any(r["ids"][6:10] != q["ids"][6:10] for r, q in zip(a, d))
    assert a[0]["nfe"] == L - 6   # one call per position after the prefix (the prefix in one prefill)


def test_scores_of_fills():
    """exact and token_acc count hidden tokens right; ROUGE of the hidden text itself is 1."""
    lines = [{"ids": [1, 2, 3, 4], "hidden": [1, 2], "target": [2, 3]},      # both right
             {"ids": [1, 2, 0, 4], "hidden": [1, 2], "target": [2, 3]}]      # one of two
    assert matches(lines) == {"exact": 0.5, "token_acc": 0.75}
    assert rouge(["the cat sat"], ["the cat sat"], False) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    r = rouge(["1 2 3"], ["1 2 4"], True)
    assert r["rouge1"] == pytest.approx(2 / 3) and r["rouge2"] == pytest.approx(1 / 2)


def _scores(label, seed, sets):
    return {"label": label, "size": "tiny", "seed": seed, "budgets": [], "infill": {"sets": sets}}


def test_infill_table():
    """Mean over seeds, the Source row once, a latent method's row of —, best per column in bold."""
    from bench.infilltable import SOURCE, infill_tables, infill_tidy

    def s(steps, nfe, acc, model=None):
        d = {"dataset": "m", "setting": "span", "steps": steps, "nfe": nfe,
             "metrics": {"token_acc": {"value": acc}, "true_cond_nll": {"value": 1.0 + acc},
                         "cond_entropy": {"value": 0.9, "estimate": "exact"}}}
        return {**d, "model": model} if model else d

    src = s(None, None, 1.0, "Source")
    scores = [_scores("MDLM", 0, [src, s(4, 4.0, 0.2), s(8, 8.0, 0.4)]),
              _scores("MDLM", 1, [src, s(4, 4.0, 0.4), s(8, 8.0, 0.6)]),
              _scores("AR", 0, [src, s(None, 12.0, 0.3)]),
              _scores("LD4LG", 0, [{"dataset": "m", "setting": "span", "steps": None, "note": "cannot condition"}])]
    it = infill_tidy(scores)
    (tb,) = infill_tables(it)
    rows = {(r[1], r[2]): r for r in tb.rows}
    acc = tb.columns.index("token_acc ↑")
    assert [r[1] for r in tb.rows].count(SOURCE) == 1
    assert rows[("MDLM", "8")][acc].startswith("0.500 ±0.141") and rows[("MDLM", "4")][acc].startswith("0.300")
    assert rows[("AR", "—")][tb.columns.index("NFE ↓")] == "12.0"
    assert set(rows[("LD4LG", "—")][3:]) == {"—"}
    assert (tb.rows.index(rows[("MDLM", "8")]), acc) in tb.bold
    assert any("H = 0.9000" in n for n in tb.notes)


def test_rocstories_hides_sentence_three_offline(tmp_path):
    """Through `datasets` on a local hub-shaped copy: each block starts with a story whose third
    sentence is hidden, the next stories packed after it."""
    from bench.config import DatasetRef
    from bench.data import documents
    from bench.data.tokenizers import gpt2
    from tests import hub_fixtures as H

    ref = DatasetRef(name="rocstories", path=str(H.make("rocstories", tmp_path)))
    stories = list(documents(ref, "test")["text"])
    tok = gpt2()
    toks, hid = story_blocks(stories, tok, 64, "eos_per_doc", 5)
    assert len(toks) == 5
    for t, h in zip(toks, hid):
        assert tok.decode(t[h].tolist()) == " He went to the shelter."
        assert tok.decode(t[:np.nonzero(h)[0][0]].tolist()).endswith("He saved his money.")
        assert tok.eos_id in t.tolist()
    with pytest.raises(UserError, match="rocstories"):
        story_blocks(stories, tok, 16, "eos_per_doc", 5)


def test_infill_config_and_run_ids():
    assert "infill" not in EvalConfig().model_dump()   # off: every existing run id unchanged
    assert EvalConfig(infill={}).model_dump()["infill"]["settings"] == ["span", "random"]
    with pytest.raises(ValueError, match="random_fraction"):
        InfillConfig(random_fraction=(0.5, 0.2))


def test_bad_infill_settings_are_one_line(tmp_path, capsys):
    from bench.cli import main

    for ev, want in (({"infill": {"span_fraction": 0.99}}, "eval.infill.span_fraction"),
                     ({"infill": {"settings": ["rocstories"]}}, "eval.infill.settings")):
        p = write_suite(tmp_path / "s.yaml", tiny_suite(eval={"t_samples": 2, **ev}))
        assert main(["run", str(p), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
        err = capsys.readouterr().err.strip()
        assert want in err and len(err.splitlines()) == 1


def test_infill_suite_end_to_end(tmp_path):
    """markov with AR, MDLM and a latent method: fills written, scored into scores.json, tabled."""
    from bench.cli import main

    suite = tiny_suite(
        data={"train": {"name": "markov", "vocab": 4, "seed": 1, "train_blocks": 64, "test_blocks": 16},
              "seq_len": 12},
        methods=[{"method": "mdlm"}, {"method": "planner"}],
        train={"steps": 4, "batch_size": 8, "warmup": 1, "ckpt_every": 4},
        eval={"t_samples": 1, "packing": "none", "max_blocks": 4, "batch_size": 8, "sample_steps": [2],
              "infill": {"blocks": 6, "batch_size": 6}})
    out = tmp_path / "out"
    assert main(["run", str(write_suite(tmp_path / "s.yaml", suite)), "--out", str(out)]) == 0
    runs = {complete_record(d)["method"]: d for d in (out / "runs").iterdir()}
    ar = json.loads((runs["ar"] / "scores.json").read_text())["infill"]
    span = [s for s in ar["sets"] if s["setting"] == "span" and s.get("model") != "Source"][0]
    assert span["n"] == 6 and math.isfinite(span["metrics"]["true_cond_nll"]["value"])
    assert "cannot condition" in json.loads((runs["planner"] / "scores.json").read_text())["infill"]["sets"][0]["note"]
    md = (out / "leaderboard.md").read_text()
    assert "Infill: span on" in md and "Infill: random on" in md and (out / "infill.csv").is_file()
