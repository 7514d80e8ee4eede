"""Synthetic sources with an exactly known truth (bench.data.synthetic, hmm, dyck) and samples
scored by it (bench.metrics.truth): every exact quantity against brute-force enumeration on a
tiny instance, the metrics' finite-sample floor against true and shuffled samples, the
training stream through a real SIGKILL and resume, and the metrics end to end."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from conftest import (
    complete_record,
    dry_run_error,
    metric_rows,
    run_killed_at,
    source_ar,
    specs_of,
    tiny_suite,
    write_suite,
)

from bench.data.dyck import DyckParams, DyckSource
from bench.data.hmm import HMMParams, HMMSource
from bench.data.synthetic import MarkovParams, MarkovSource
from bench.metrics.truth import Truth, TruthSettings, log_probs, ngram_tv

# Exact quantities are compared at 1e-12 (relative, or absolute on probabilities ≤ 1): both sides
# are float64 sums of a few hundred terms of magnitude ≤ 1, so rounding stays near 1e-15.
EXACT = 1e-12


def tiny_sources():
    return [MarkovSource(MarkovParams(vocab=3, order=2, seed=1)),
            HMMSource(HMMParams(states=3, vocab=3, seed=2)),
            DyckSource(DyckParams(types=2, max_depth=2, seed=3))]


def all_strings(V: int, L: int) -> np.ndarray:
    return np.array(list(itertools.product(range(V), repeat=L)), dtype=np.int64)


def well_formed(x, k: int, D: int) -> bool:
    """An independent recogniser: a balanced bracket string (types matched) of depth ≤ D."""
    stack = []
    for v in x:
        if v < k:
            stack.append(v)
            if len(stack) > D:
                return False
        elif not stack or stack.pop() != v - k:
            return False
    return not stack


# ----------------------------------------------------------------------------- exact likelihoods
def test_hmm_forward_equals_brute_force_over_hidden_paths():
    src = HMMSource(HMMParams(states=2, vocab=3, seed=5, concentration=0.7))
    L, K = 4, 2
    x = all_strings(3, L)
    brute = np.zeros(len(x))
    for z in itertools.product(range(K), repeat=L):   # Σ over the K^L hidden paths
        p = src.mu[z[0]] * src.B[z[0], x[:, 0]]
        for t in range(1, L):
            p = p * src.A[z[t - 1], z[t]] * src.B[z[t], x[:, t]]
        brute += p
    assert np.allclose(src.log_prob(x), np.log(brute), rtol=0, atol=EXACT)
    assert math.isclose(brute.sum(), 1.0, abs_tol=EXACT)
    assert np.allclose(src.mu @ src.A, src.mu, atol=EXACT)   # the start law is stationary


def test_dyck_log_prob_replays_the_generator_and_is_minus_inf_exactly_on_ill_formed():
    src = DyckSource(DyckParams(types=2, max_depth=3, seed=3))
    x, lp = src.draw(2000, 16, np.random.default_rng(0), logp=True)
    assert np.allclose(src.log_prob(x), lp, rtol=0, atol=EXACT)   # the generator's own move log-probabilities
    # every string of 4 symbols and length 8: p > 0 exactly on the well-formed ones of depth ≤ 3
    L, k, D = 8, 2, 3
    xs = all_strings(2 * k, L)
    lps = src.log_prob(xs)
    wf = np.array([well_formed(s, k, D) for s in xs])
    assert np.isfinite(lps[wf]).all() and (lps[~wf] == -np.inf).all()
    assert wf.sum() == 13 * k ** (L // 2)   # Dyck paths of semilength 4 and height ≤ 3: 13 (of Catalan 14)
    assert math.isclose(np.exp(lps[wf]).sum(), 1.0, abs_tol=EXACT)
    bad = [[0, 3, 0, 2, 1, 3, 0, 2],      # "(]": a close of the wrong type
           [2, 0, 2, 0, 2, 0, 2, 0],      # a close at depth 0
           [0, 0, 0, 0, 2, 2, 2, 2],      # depth 4 > max_depth
           [0, 0, 2, 0, 2, 0, 2, 0],      # unclosed at the end: an open where the close was forced
           [0, 2, 0, 2, 0, 2, 0, 4]]      # a symbol outside the alphabet
    assert (src.log_prob(np.array(bad)) == -np.inf).all()
    assert (src.log_prob(np.zeros((3, 7), dtype=np.int64)) == -np.inf).all()   # odd length: no string


@pytest.mark.parametrize("src", tiny_sources(), ids=["markov-order2", "hmm", "dyck"])
def test_entropy_and_ngram_marginals_equal_enumeration(src):
    """Over all V^L strings of a tiny source: Σp = 1; the block entropy −Σ p log p equals the
    exact one (dyck, markov) or lies within 4 standard errors of the estimate (hmm, its stated
    interval is 1.96 of them); the pooled n-gram law Σ_x p(x)·count_g(x)/(L−n+1) equals
    ngram_prob for n = 1, 2, 3."""
    L = 6
    xs = all_strings(src.vocab, L)
    p = np.exp(src.log_prob(xs))
    assert math.isclose(p.sum(), 1.0, abs_tol=EXACT)
    nz = p > 0
    H = -(p[nz] * np.log(p[nz])).sum() / L
    h = src.entropy(L)
    if h["estimate"] == "exact":
        assert math.isclose(h["value"], H, abs_tol=EXACT)
    else:
        se = (h["ci_high"] - h["ci_low"]) / (2 * 1.959964)
        assert abs(h["value"] - H) < 4 * se and h["ci_high"] - h["ci_low"] < 0.05
    for n in (1, 2, 3):
        grams = all_strings(src.vocab, n)
        code = {tuple(g): i for i, g in enumerate(grams)}
        want = np.zeros(len(grams))
        for t in range(L - n + 1):
            np.add.at(want, [code[tuple(w)] for w in xs[:, t:t + n]], p / (L - n + 1))
        assert np.allclose(src.ngram_prob(grams, L), want, rtol=0, atol=EXACT)


def test_ngram_tv_equals_the_full_sum_over_every_ngram():
    """TV from the n-grams seen plus the unseen mass equals ½ Σ over all V^n n-grams."""
    src = DyckSource(DyckParams(types=2, max_depth=3, seed=4))
    L = 12
    x = src.draw(50, L, np.random.default_rng(1)).astype(np.int64)
    x[:5] = np.random.default_rng(2).integers(0, 4, size=(5, L))   # some impossible n-grams too
    got = ngram_tv(src, x, (1, 2, 3))
    for n in (1, 2, 3):
        grams = all_strings(4, n)
        win = np.lib.stride_tricks.sliding_window_view(x, n, axis=1).reshape(-1, n)
        phat = np.array([(win == g).all(1).mean() for g in grams])
        assert math.isclose(got[n], 0.5 * np.abs(phat - src.ngram_prob(grams, L)).sum(), abs_tol=EXACT)


# ----------------------------------------------------------------------------- the truth metrics
@pytest.mark.parametrize("src", [MarkovSource(MarkovParams(vocab=8, order=1, seed=3)),
                                 HMMSource(HMMParams(states=8, vocab=8, seed=3, concentration=0.1)),
                                 DyckSource(DyckParams(types=2, max_depth=4, seed=3))],
                         ids=["markov", "hmm", "dyck"])
def test_true_samples_score_at_the_ceiling_and_shuffled_far_above(src):
    """n = 200 blocks of 32. The ceiling's spread: ngram_tv of 20 independent true sets (mean m,
    sd s). A true sample set (the test split) lies within 4 s of m — it is a draw of the same
    statistic; the same tokens shuffled across positions (unigrams kept, order destroyed) lie
    more than 10 s above (measured: 30–80 s). true_nll of true samples: within 4 standard errors
    of the source's exact entropy (hmm: of its estimate, whose own error is 3× smaller)."""
    L, n = 32, 200
    truth = Truth(src, "src", L, TruthSettings())
    reps = [truth.score(truth.ceiling_set(n, s, str))["ngram_tv"]["value"] for s in range(20)]
    m, s = float(np.mean(reps)), float(np.std(reps, ddof=1))
    assert len(set(reps)) == len(reps)   # independent sets (a repeated set would fake a zero spread)
    x = src.sample(n, L, "test").astype(np.int64)
    assert not np.array_equal(truth.source.ceiling(n, L, 0), x)   # the Source row: fresh blocks, not the test split
    shuffled = np.random.default_rng(0).permutation(x.reshape(-1)).reshape(x.shape)
    true, shuf = (truth.score([{"ids": r.tolist()} for r in a]) for a in (x, shuffled))
    assert abs(true["ngram_tv"]["value"] - m) < 4 * s
    assert shuf["ngram_tv"]["value"] > m + 10 * s
    assert set(true["ngram_tv"]["per_n"]) == {"1", "2", "3"}
    nll = -log_probs(src, x) / L
    assert abs(true["true_nll"]["value"] - src.entropy(L)["value"]) < 4 * nll.std(ddof=1) / math.sqrt(n)
    if src.has_zeros:
        assert true["valid"]["value"] == 1.0 and shuf["valid"]["value"] < 0.5
    else:
        assert "valid" not in true


# ----------------------------------------------------------------------------- the training stream
STREAM = {"name": "markov", "vocab": 8, "order": 1, "seed": 3, "train_blocks": "stream", "test_blocks": 32}


def test_stream_draws_fresh_blocks_from_seed_and_step():
    from bench.config import DataConfig, DatasetRef
    from bench.data import StreamBlocks, load_blocks

    ref = DatasetRef(**STREAM)
    data = DataConfig(train=ref, eval=[ref], seq_len=16)
    s = load_blocks(ref, "train", data, "none")
    assert isinstance(s, StreamBlocks)
    b3 = s.batch(3, 8, seed=0).tokens
    for k in range(6):
        s.batch(k, 8, seed=0)
    assert np.array_equal(s.batch(3, 8, seed=0).tokens, b3)          # a function of (seed, step) only
    assert not np.array_equal(s.batch(4, 8, seed=0).tokens, b3)      # fresh every step
    assert not np.array_equal(s.batch(3, 8, seed=1).tokens, b3)      # and per run seed
    test = load_blocks(ref, "test", data, "none").tokens
    assert not (b3[:, None, :] == test[None]).all(2).any()          # never the test blocks


def test_stream_gives_the_same_blocks_after_a_resume(tmp_path):
    """A streaming run SIGKILLed after checkpoint 8 and resumed ends bit-identical to an
    uninterrupted one: the blocks of steps 8..15 are drawn again from (seed, step)."""
    suite = tiny_suite(baseline=None, data={"train": STREAM, "eval": [STREAM], "seq_len": 16},
                       train={"steps": 16, "batch_size": 8, "lr": 3e-3, "warmup": 2, "ckpt_every": 4},
                       eval={"t_samples": 2, "max_blocks": 32, "batch_size": 16, "packing": "none"})
    spec = specs_of(suite, tmp_path)[0]
    spec_json = json.dumps(spec.model_dump(mode="json"))
    from bench.runner import execute

    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    assert execute(json.loads(spec_json), ref_dir, 1) == "complete"
    run_killed_at(spec_json, run_dir, 8)
    assert execute(json.loads(spec_json), run_dir, 1) == "complete"
    rec, ref = complete_record(run_dir), complete_record(ref_dir)
    assert rec["train"]["resumed_from_step"] == 8
    assert "a stream of fresh training blocks" in (run_dir / "log.txt").read_text()
    assert metric_rows(rec) == metric_rows(ref)
    assert rec["train"]["param_checksums"] == ref["train"]["param_checksums"]


# ----------------------------------------------------------------------------- end to end
def test_truth_metrics_end_to_end(tmp_path, capsys):
    """A tiny dyck suite (streamed training, MDLM + the AR baseline, two step budgets) through
    `tdbench run`: every run's samples scored by the source (recomputed here from the samples
    and the source alone), the Source row = fresh true blocks at the floor, the table and the
    frontier plot, and `tdbench score` reproducing the stored numbers."""
    import pandas as pd

    from bench.cli import main
    from bench.config import DatasetRef
    from bench.data import synthetic_source

    src = {"name": "dyck", "types": 2, "max_depth": 4, "seed": 1, "train_blocks": "stream"}
    suite = tiny_suite(data={"train": src, "eval": [src], "seq_len": 16},
                       train={"steps": 30, "batch_size": 16, "lr": 3e-3, "warmup": 5, "ckpt_every": 30},
                       eval={"t_samples": 2, "packing": "none", "max_blocks": 64, "batch_size": 32,
                             "samples": 32, "sample_steps": [4, 16]})
    out = tmp_path / "out"
    assert main(["run", str(write_suite(tmp_path / "s.yaml", suite)), "--out", str(out)]) == 0
    source = synthetic_source(DatasetRef(**src))
    h = source.entropy(16)["value"]
    for rd in sorted((out / "runs").iterdir()):
        sc = json.loads((rd / "scores.json").read_text())
        samples = [json.loads(x) for x in (rd / "samples.jsonl").read_text().splitlines()]
        for b in sc["budgets"]:
            m = b["metrics"]
            assert {"true_nll", "valid", "ngram_tv"} <= set(m) and not {"gen_ppl", "mauve"} & set(m)
            ids = np.array([s["ids"] for s in samples if s["steps"] == b["steps"]])
            lp = source.log_prob(ids)
            ok = np.isfinite(lp)
            assert m["valid"]["value"] == ok.mean()
            assert m["true_nll"]["value"] == (pytest.approx(-lp[ok].sum() / (ok.sum() * 16), rel=1e-12)
                                              if ok.any() else None)
            assert m["ngram_tv"]["value"] == pytest.approx(np.mean(list(ngram_tv(source, ids, (1, 2, 3)).values())),
                                                           rel=1e-12)
            assert m["ngram_tv"]["value"] > sc["source_text"]["metrics"]["ngram_tv"]["value"]  # above the floor
        st = sc["source_text"]["metrics"]
        assert st["valid"]["value"] == 1.0 and abs(st["true_nll"]["value"] - h) < 0.1
    md = (out / "leaderboard.md").read_text()
    head = next(x for x in md.splitlines() if x.startswith("| Size | Model | Steps"))
    assert "true_nll" in head and "valid ↑" in head and "ngram_tv ↓" in head and "gen_ppl" not in head
    assert f"h = ln ppl(Source (true)) = {h:.4f} nats/token (exact)" in md
    assert (out / "frontier.png").stat().st_size > 0
    t = pd.read_csv(out / "leaderboard.csv")
    assert set(t[t.model == "Source text"].metric) >= {"true_nll", "valid", "ngram_tv"}
    capsys.readouterr()
    assert main(["score", str(out)]) == 0
    assert "2 run(s) reproduced their stored scores exactly\n" in capsys.readouterr().err


def test_hmm_source_true_row_is_an_estimate_with_its_interval(tmp_path):
    """An HMM has no closed-form entropy: Source (true) carries the estimate's interval, "≈" and
    a note in the table; Source (test blocks) and the gap stay exact (the gap of the source
    plus δ is δ with no interval)."""
    from bench import leaderboard
    from bench.data import dataset_params
    from bench.runner import evaluate_all

    hmm = {"name": "hmm", "states": 4, "vocab": 6, "seed": 2, "test_blocks": 64, "entropy_blocks": 2000}
    suite = tiny_suite(baseline=None, data={"train": hmm, "eval": [hmm], "seq_len": 16},
                       eval={"t_samples": 2, "max_blocks": 64, "batch_size": 16, "packing": "none"})
    spec = specs_of(suite, tmp_path)[0]
    source = HMMSource(dataset_params(spec.data.train))
    metrics, reference = evaluate_all(source_ar(source, 0.05), spec, "cpu", lambda m: None)
    by = {r["label"]: r for r in reference}
    est = source.entropy(16)
    assert by["Source (true)"]["estimate"] == "sampled" and by["Source (true)"]["n_blocks"] == 2000
    assert by["Source (true)"]["ci_low"] == pytest.approx(math.exp(est["ci_low"]), rel=1e-12)
    assert by["Source (true)"]["ci_low"] < by["Source (true)"]["value"] < by["Source (true)"]["ci_high"]
    gap = next(m for m in metrics if m["metric"] == "gap")
    assert gap["value"] == pytest.approx(0.05, abs=1e-9) and gap["ci_high"] - gap["ci_low"] < 1e-9
    rec = {"size": spec.size, "label": spec.label, "seed": 0, "run_id": "r", "metrics": metrics,
           "reference": reference, "train": {"params": 1}, "protocol": {"confidence": 0.95}}
    md = leaderboard.markdown(leaderboard.tidy([rec]))
    line = next(x for x in md.splitlines() if "| Source (true) |" in x)
    assert "≈" in line and "±" in line
    assert "≈ Source (true): an estimate, not exact" in md
    exact_line = next(x for x in md.splitlines() if "| Source (test blocks) |" in x)
    assert "≈" not in exact_line and "±" not in exact_line


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("data,msg", [
    ({"train": {"name": "dyck"}, "eval": [{"name": "dyck"}], "seq_len": 15},
     "data.seq_len: dyck blocks are complete bracket strings; an odd length (15) has none"),
    ({"train": {"name": "markov", "train_blocks": "strem"}, "eval": [{"name": "markov", "train_blocks": "strem"}],
      "seq_len": 16}, "data.train.train_blocks"),
    ({"train": {"name": "hmm", "states": 4096, "vocab": 4096}, "eval": [{"name": "hmm", "states": 4096,
                                                                          "vocab": 4096}], "seq_len": 16},
     "states·(states + vocab)"),
])
def test_bad_synthetic_entries_are_one_line_errors(tmp_path, capsys, data, msg):
    err = dry_run_error(tmp_path, capsys, tiny_suite(data=data))
    assert msg in err, err
