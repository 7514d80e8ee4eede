"""Scoring from samples alone: an HF scorer by local path against a by-hand computation,
``tdbench score`` on files no run produced (and malformed ones), and the sample → score round
trip of a suite output directory reproducing the stored metrics exactly."""
from __future__ import annotations

import json
import math

import pytest
import torch

from bench.cli import main
from tests.conftest import tiny_suite, write_suite

TEXTS = ["It is a truth universally acknowledged, that a single man in possession of a good fortune",
         "She was the youngest of the two daughters of a most affectionate, indulgent father;<|endoftext|>and more",
         "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition"]


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A 2-layer GPT-2 with random weights and the real GPT-2 tokenizer, saved locally."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from bench.data.tokenizers import EOT, gpt2

    d = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=16, n_layer=2, n_head=2))
    model.save_pretrained(d)
    PreTrainedTokenizerFast(tokenizer_object=gpt2()._tok, bos_token=EOT, eos_token=EOT).save_pretrained(d)
    return d


def _by_hand(path, texts, eos_cut=True):
    """exp(Σ NLL / Σ tokens) with transformers directly, first token after <|endoftext|>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tot, n = 0.0, 0
    for t in texts:
        ids = tok(t)["input_ids"]
        if eos_cut and tok.eos_token_id in ids:
            ids = ids[: ids.index(tok.eos_token_id) + 1]
        x = torch.tensor([[tok.eos_token_id] + ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(x).logits.double(), -1)[0, :-1]
        tot += -logp[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
        n += len(ids)
    return math.exp(tot / n)


def test_hf_scorer_by_local_path_matches_transformers_by_hand(tiny_gpt2):
    from bench.metrics.genppl import GenPPLSettings, gen_ppl, scorer_tokens
    from bench.metrics.scorers import make_scorer

    sc = make_scorer(str(tiny_gpt2))
    st = GenPPLSettings(scorer=str(tiny_gpt2), batch_size=2)   # 2 per batch: padding is exercised
    seqs = scorer_tokens([{"text": t} for t in TEXTS], sc.tokenizer_key, sc.encode, sc.eos_id, st, None)
    assert seqs[1][-1] == 50256 and len(seqs[1]) < len(sc.encode([TEXTS[1]])[0])   # cut at the first EOS
    got = gen_ppl(seqs, sc, st)["value"]
    want = _by_hand(tiny_gpt2, TEXTS)
    assert got == pytest.approx(want, rel=1e-9)   # float64 log-softmax in both; only summation order differs
    assert got != pytest.approx(_by_hand(tiny_gpt2, TEXTS, eos_cut=False), rel=1e-6)


def test_sliding_windows_beyond_the_context(tiny_gpt2):
    """Beyond the context each token is scored with the window that ends at it (stride 8 of 64)."""
    from transformers import AutoModelForCausalLM

    from bench.hf import causal_lm_token_nll, load_causal_lm

    model = load_causal_lm(str(tiny_gpt2))
    ids = torch.randint(0, 50257, (2, 150), generator=torch.Generator().manual_seed(0))
    nll = causal_lm_token_nll(model, ids, 50256, stride=8)
    x = torch.cat([torch.full((2, 1), 50256), ids], 1)
    ref = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    with torch.no_grad():   # the first 64 targets: one pass from the start token
        lp = torch.log_softmax(ref(x[:, :64]).logits.double(), -1)
        assert torch.allclose(nll[:, :64], -lp.gather(-1, x[:, 1:65, None])[..., 0], atol=1e-9)
        # target 100 lies in the window of targets 96..103 whose input is x[40:104]
        lp = torch.log_softmax(ref(x[:, 40:104]).logits.double(), -1)
        assert torch.allclose(nll[:, 100], -lp[:, 60].gather(-1, x[:, 101, None])[:, 0], atol=1e-9)
    with pytest.raises(Exception, match="cannot load"):
        load_causal_lm(str(tiny_gpt2 / "nope"))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_a_file_no_run_produced(tmp_path, tiny_gpt2, capsys):
    f = _jsonl(tmp_path / "mine.jsonl", [{"text": t} for t in TEXTS * 4])
    assert main(["score", str(f), "--format", "json", "--scorer", str(tiny_gpt2)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gen_ppl"] == pytest.approx(_by_hand(tiny_gpt2, TEXTS * 4), rel=1e-9)
    assert out["n"] == 12 and out["entropy"] > 0 and 0 < out["div"] < 1
    assert out["mem"] is None and out["mauve"] is None and "reference" in out["notes"]["mauve"]
    assert out["settings"]["gen_ppl"]["aggregation"] == "token" and out["settings"]["gen_ppl"]["id"]
    # against a dataset: memorization on its train split, MAUVE + Source text from its test split
    # (12 texts: below MAUVE's floor of 100 per set, so no MAUVE, with the reason)
    assert main(["score", str(f), "--reference", "austen", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0 <= out["mem"] <= 1 and out["gen_ppl"] is None and "scorer" in out["notes"]["gen_ppl"]
    assert out["mauve"] is None and "fewer than 100 samples per set" in out["notes"]["mauve"]
    assert out["source_text"]["mauve"] is None and out["source_text"]["n"] == 12
    assert out["source_text"]["entropy"] > 0 and out["settings"]["mauve"]["min_samples"] == 100
    assert out["reference"]["dataset"] == "austen" and out["reference"]["tokenizer"] == "gpt2"
    assert out["settings"]["mem"]["corpus"] == "austen:train"
    assert main(["score", str(f)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["samples", "gen_ppl", "entropy"]


@pytest.mark.parametrize("content,msg", [
    ('{"text": "ok"}\n{"txt": "no"}\n', "mine.jsonl:2: missing 'text'"),
    ('{"text": "ok"}\nnot json\n', "mine.jsonl:2: not JSON"),
    ("", "mine.jsonl: empty"),
    ('["text"]\n', "mine.jsonl:1: expected a JSON object"),
    ('{"text": 3}\n', "mine.jsonl:1: 'text' must be a string"),
])
def test_score_malformed_file_one_line_exit_2(tmp_path, capsys, content, msg):
    f = tmp_path / "mine.jsonl"
    f.write_text(content)
    assert main(["score", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err and err.startswith("error: ")


def test_score_bad_paths(tmp_path, capsys):
    assert main(["score", str(tmp_path / "missing.jsonl")]) == 2
    assert "not a JSONL sample file" in capsys.readouterr().err
    f = _jsonl(tmp_path / "x.jsonl", [{"text": "a b c d"}])
    assert main(["score", str(f), "--reference", "austn"]) == 2
    assert "did you mean 'austen'" in capsys.readouterr().err


def test_suite_samples_score_round_trip(tmp_path, capsys):
    """run → samples.jsonl + scores.json; `tdbench score DIR` reproduces them exactly; `tdbench
    sample DIR --n` extends the samples from the final weights without retraining."""
    suite = tiny_suite(eval={"t_samples": 2, "max_blocks": 4, "batch_size": 8, "samples": 10,
                             "sample_steps": [4, 8]},
                       metrics={"mauve": {"min_samples": 10}})   # MAUVE at 10 (noise), to test that it reproduces
    out = tmp_path / "out"
    assert main(["run", str(write_suite(tmp_path / "s.yaml", suite)), "--out", str(out)]) == 0
    capsys.readouterr()
    runs = {json.loads((p / "result.json").read_text())["method"]: p for p in (out / "runs").iterdir()}
    stored = json.loads((runs["mdlm"] / "scores.json").read_text())
    assert [b["steps"] for b in stored["budgets"]] == [4, 8] and stored["budgets"][0]["nfe"] == 4
    assert stored["scorer"].startswith("tdbench-ar:") and stored["scorer"].endswith(runs["ar"].name)
    m = stored["budgets"][0]["metrics"]
    assert all(m[k]["value"] is not None for k in ("gen_ppl", "entropy", "div", "mem", "mauve"))
    assert "self-scored" in (
        json.loads((runs["ar"] / "scores.json").read_text())["budgets"][0]["metrics"]["gen_ppl"]["note"])
    lb = (out / "leaderboard.md").read_text()
    assert "| Source text |" in lb and "gen_ppl ↓" in lb and "mauve ↑" in lb and (out / "frontier.png").is_file()
    csv = (out / "leaderboard.csv").read_text()
    assert ",gen_ppl," in csv and ",nfe," in csv and ",ppl," in csv

    assert main(["score", str(out), "--format", "json"]) == 0
    res = json.loads(capsys.readouterr().out)
    mine = next(r for r in res if r.get("run_id") == stored["run_id"])
    for b, sb in zip(mine["budgets"], stored["budgets"]):
        for k, v in sb["metrics"].items():
            assert b[k] == v["value"]                           # exactly, not approximately
            assert b["settings"][k]["id"] == v["id"]
    assert json.loads((runs["mdlm"] / "scores.json").read_text())["budgets"] == stored["budgets"]

    ckpt = sorted((runs["mdlm"] / "ckpt").iterdir())[-1]
    before = (ckpt / "model.safetensors").stat().st_mtime_ns, (runs["mdlm"] / "result.json").read_text()
    assert main(["sample", str(runs["mdlm"]), "--n", "12"]) == 0
    lines = (runs["mdlm"] / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 24 and lines[:10] == (lines[:10])
    assert (ckpt / "model.safetensors").stat().st_mtime_ns == before[0]
    assert (runs["mdlm"] / "result.json").read_text() == before[1]     # no retraining, same record
    new = json.loads((runs["mdlm"] / "scores.json").read_text())
    assert [b["n"] for b in new["budgets"]] == [12, 12]


@pytest.mark.parametrize("metrics,key", [
    ({"gen_ppl": {"aggregation": "median"}}, "metrics.gen_ppl.aggregation"),
    ({"mauve": {"seeds": [1, 2]}}, "metrics.mauve.seeds"),
    ({"mauve": {"min_samples": 0}}, "metrics.mauve.min_samples"),
    ({"ngrams": {"tokenisation": "whitespace"}}, "metrics.ngrams.tokenisation: unknown key"),
])
def test_bad_metric_settings_name_the_key(tmp_path, capsys, metrics, key):
    suite = tiny_suite(eval={"samples": 2}, metrics=metrics)
    assert main(["run", str(write_suite(tmp_path / "s.yaml", suite)), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert key in err and len(err.splitlines()) == 1 and not (tmp_path / "o").exists()


def test_sample_needs_a_run_or_output_dir(tmp_path, capsys):
    assert main(["sample", str(tmp_path)]) == 2
    assert "not a run directory or a tdbench output directory" in capsys.readouterr().err
    assert main(["sample", str(tmp_path), "--steps", "4,x"]) == 2


def _fake_scores(seed, label, gen, mauve, size="tiny"):
    m = lambda v, i="x1", **k: {"value": v, "id": i, **k}  # noqa: E731
    return {"size": size, "seed": seed, "label": label, "reference": {"dataset": "austen"},
            "budgets": [{"steps": 16, "n": 100, "nfe": 16.0, "samples_per_s": 5.0,
                         "metrics": {"gen_ppl": m(gen, "g1"), "entropy": m(4.0, "e1"), "mem": m(0.1, "m1"),
                                     "div": m(0.5, "d1"), "mauve": m(mauve, "v1", std=0.01)}}],
            "source_text": {"n": 100, "metrics": {"gen_ppl": m(30.0 + seed, "g1"), "mauve": m(0.9, "v1", std=0.02)}}}


def test_sample_table_mean_and_std_over_seeds_and_dash_without_a_bound():
    import pandas as pd

    from bench.leaderboard import COLUMNS, SOURCE_TEXT, sample_markdown, sample_tidy

    st = sample_tidy([_fake_scores(0, "SSD-LM", 100.0, 0.5), _fake_scores(1, "SSD-LM", 120.0, 0.7),
                      _fake_scores(0, "MDLM", 80.0, 0.6)])
    g = st[(st["model"] == "SSD-LM") & (st["metric"] == "gen_ppl")].iloc[0]
    assert g["value"] == pytest.approx(110.0) and g["std"] == pytest.approx(math.sqrt(200)) and g["n_seeds"] == 2
    one = st[(st["model"] == "MDLM") & (st["metric"] == "mauve")].iloc[0]
    assert one["std"] == pytest.approx(0.01) and one["n_seeds"] == 1     # one seed: MAUVE's own std
    src = st[(st["model"] == SOURCE_TEXT) & (st["metric"] == "gen_ppl")].iloc[0]
    assert src["value"] == pytest.approx(30.5) and src["n_seeds"] == 2    # one Source row per (size, seed)
    lik = pd.DataFrame([{"size": "tiny", "model": "SSD-LM", "dataset": "austen", "metric": "ppl", "value": None,
                         "ci_low": None, "ci_high": None, "bound": None, "n_seeds": 2, "std": None,
                         "protocol": "p", "params": 1},
                        {"size": "tiny", "model": "MDLM", "dataset": "austen", "metric": "ppl", "value": 300.0,
                         "ci_low": 290.0, "ci_high": 310.0, "bound": True, "n_seeds": 1, "std": None,
                         "protocol": "p", "params": 1}], columns=COLUMNS)
    md = sample_markdown(st, lik)
    row = next(x for x in md.splitlines() if "| SSD-LM |" in x).split("|")
    assert row[4].strip() == "—" and row[5].strip() == "110.0 ±14.1"   # no bound: "—"; gen_ppl mean ±std
    mdlm = next(x for x in md.splitlines() if "| MDLM |" in x)
    assert "≤ 300.00 ±10.00" in mdlm and "**80.0**" in mdlm             # lowest gen_ppl in bold
    assert "gen_ppl ↓" in md and "mauve ↑" in md and "div ↑" in md and "mem ↓" in md


def test_different_settings_never_share_a_column():
    from bench.leaderboard import sample_markdown, sample_tidy

    a, b = _fake_scores(0, "A", 100.0, 0.5), _fake_scores(0, "B", 90.0, 0.6)
    b["budgets"][0]["metrics"]["gen_ppl"]["id"] = "g2"            # e.g. another aggregation
    st = sample_tidy([a, b])
    md = sample_markdown(st, st.iloc[:0])
    assert "gen_ppl ↓ [g1]" in md and "gen_ppl ↓ [g2]" in md


def test_hf_featurizer_by_local_path(tiny_gpt2):
    from bench.metrics.mauve import Featurizer

    f = Featurizer(str(tiny_gpt2), 32)
    x = f(TEXTS)
    assert x.shape == (3, 16) and x.dtype.name == "float32" and f(TEXTS) is x    # memoised


def test_settings_ids_follow_the_settings():
    from bench.metrics import MetricsConfig
    from bench.metrics.genppl import GenPPLSettings
    from bench.metrics.score import ScoringSetup, resolved_settings

    base = resolved_settings(ScoringSetup(cfg=MetricsConfig()), 100)
    trimmed = resolved_settings(ScoringSetup(cfg=MetricsConfig(gen_ppl=GenPPLSettings(aggregation="trimmed"))), 100)
    assert base["gen_ppl"]["id"] != trimmed["gen_ppl"]["id"] and base["div"]["id"] == trimmed["div"]["id"]
    assert base["mauve"]["id"] != resolved_settings(ScoringSetup(cfg=MetricsConfig()), 50)["mauve"]["id"]  # n matters
    other = ScoringSetup(cfg=MetricsConfig(), scorer_desc="hf:gpt2-large")
    assert resolved_settings(other, 100)["gen_ppl"]["id"] != base["gen_ppl"]["id"]
