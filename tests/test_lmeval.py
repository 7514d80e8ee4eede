"""lm-evaluation-harness (issue 25 point 4): the registered ``tdbench`` model, ``tdbench lm-eval``
and the bundled tiny tasks (bench/lmeval_tasks), end to end through ``lm_eval.simple_evaluate``.

- The exact row equals lm-eval's own ``hf`` model on the same tiny GPT-2 checkpoint (an
  hf-causal-lm run): every request's log-likelihood and every task metric, on the
  multiple-choice task (``hf`` with ``add_bos_token=True``: tdbench conditions every request on
  the model's BOS, as the protocol conditions a block's first token) and on the rolling task
  (``hf`` as it comes: it conditions the text on the same BOS). Tolerance |Δ| ≤ 1e-6·|ll| +
  1e-5 nats: both run the same float32 model on the same ids; ``hf`` sums the token
  log-probabilities in float32 (≲ 1e-7 relative on ~100 tokens, measured 3e-5 on 416 nats), the
  harness in float64; a wrong context, target or an extra token moves a request by ≳ 0.1 nats.
- Exact rows (tdbench's AR), exactly: the chain rule ll(c, a+b) = ll(c, a) + ll(c+a, b); the
  rolling log-likelihood of a text is the sum over its blocks of seq_len tokens of each block's
  log-likelihood with an empty context; the empty context conditions on the method's own start
  (ll("", x) = rolling(x) for x within a block). Tolerance 1e-3 nats on ~100–4000 nats: float32
  logits summed in float32 per block (measured ≤ 1.2e-5 on the chain rule, 1e-6 on the blocks); a
  token dropped, duplicated or mis-assigned to context moves it by ≳ 1 nat.
- A diffusion row (MDLM) reports accuracy with both standard errors, and the Monte-Carlo one is
  right: the reported ``acc_mc_stderr`` equals √Σ_d p_d(1−p_d)/N, p_d the probability that the
  gold choice stays the argmax when each choice's log-likelihood is redrawn as ll + se·z (an
  independent numpy computation from the logged answers and the model's per-request se, 200,000
  draws per document); ``bits_per_byte_mc_stderr`` equals the delta method's √Σse²/(ln 2·bytes)
  (bits per byte is linear in the log-likelihoods). Tolerance 25% relative: the bootstrap's
  standard deviation over B = 400 redraws has relative error 1/√(2B) = 3.5%, so 25% is 7 of its
  standard errors; dropping the se of every choice but the first, or scaling se by 2, moves it by
  ≥ 40%.
- Each request's Monte-Carlo standard error is the spread of its estimate over seeds: over 16
  seeds, Σ_i Var_seeds(ll_i) / Σ_i mean(se_i²) is 1 in expectation (se² is an unbiased estimate
  of the K-draw mean's variance). 44 loglikelihood requests: measured 0.88–1.08 over six sets of
  16 seeds (sd ≈ 0.08), accepted [0.65, 1.5]; 22 rolling texts of 2–3 blocks: measured 0.79–1.07
  (sd ≈ 0.12, 11 texts), accepted [0.55, 1.6]. A se off by √2 either way gives 0.5 or 2; the
  blocks' se added instead of in quadrature, ≈ 0.4.
- The logged answers and standard errors are the model's for those very requests: the same
  requests, in lm-eval's order, to a fresh model give them again exactly (the draws are seeded).
- generate_until: the answer stops at the first stop string (property-based), the sampler keeps
  the end of a long context as its prefix, a pretrained row without a sampler is refused in one
  line; bad input is one line, exit 2, nothing written.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("lm_eval")

from bench.cli import main  # noqa: E402
from bench.errors import UserError  # noqa: E402
from bench.lmeval import LMEvalArgs, Scorer, layout, stop_at  # noqa: E402
from tests.conftest import REPO, subprocess_env, tiny_suite, write_suite  # noqa: E402

TASKS = REPO / "bench" / "lmeval_tasks"


def hf_close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * abs(b) + 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny MDLM and a tiny AR run (BPE 512, seq_len 32, 12 steps)."""
    tmp = tmp_path_factory.mktemp("lmeval-runs")
    suite = tiny_suite()
    suite["data"]["eval"] = [{"name": "austen"}]
    assert main(["run", str(write_suite(tmp / "s.yaml", suite)), "--out", str(tmp / "out")]) == 0
    return {p.name.split("-")[0]: p for p in (tmp / "out" / "runs").iterdir()}


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory) -> tuple[Path, Path]:
    """(an hf-causal-lm run, its checkpoint): a tiny GPT-2 saved with GPT-2's tokenizer, seq_len 128."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from bench.data.tokenizers import gpt2

    tmp = tmp_path_factory.mktemp("lmeval-hf")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=128, n_embd=32, n_layer=2, n_head=2)).eval()
    with torch.no_grad():   # random init is near uniform; sharpen it so mistakes show in the numbers
        model.transformer.wte.weight.mul_(4)
    model.save_pretrained(tmp / "tiny-gpt2")
    PreTrainedTokenizerFast(tokenizer_object=gpt2()._tok, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(tmp / "tiny-gpt2")
    (tmp / "doc.txt").write_text("A short text that stands for the data.\n")
    suite = {"name": "hf", "data": {"train": {"name": "textfile", "path": str(tmp / "doc.txt")},
                                    "eval": [{"name": "textfile", "path": str(tmp / "doc.txt")}],
                                    "tokenizer": "gpt2", "seq_len": 128},
             "sizes": {"tiny": {"layers": 1, "hidden": 32, "heads": 2}},
             "methods": [{"method": "hf-causal-lm", "model": str(tmp / "tiny-gpt2")}], "baseline": None,
             "eval": {"max_blocks": 2}, "launch": {"executor": "debug", "threads": 1}}
    assert main(["run", str(write_suite(tmp / "s.yaml", suite)), "--out", str(tmp / "out")]) == 0
    return next((tmp / "out" / "runs").iterdir()), tmp / "tiny-gpt2"


def answers(samples: list[dict]) -> list[float]:
    """Every request's log-likelihood of a task's logged samples, in order."""
    return [float(r[0]) if isinstance(r, (list, tuple)) else float(r) for s in samples for r in s["filtered_resps"]]


def read_output(out: Path) -> tuple[dict, dict]:
    """(results, {task: samples}) as lm-eval's EvaluationTracker wrote them under ``out``."""
    (res,) = out.glob("*/results_*.json")
    samples = {f.name.split("_2")[0].removeprefix("samples_"): [json.loads(x) for x in f.read_text().splitlines()]
               for f in out.glob("*/samples_*.jsonl")}
    return json.loads(res.read_text()), samples


def test_registered_beside_lm_evals_own_models():
    """Importing the model registers ``tdbench`` and keeps lm-eval's own models resolvable (its
    get_model fills an *empty* registry only); the package's ``lm_eval.models`` entry point
    (pyproject.toml) names the registered class. In a fresh interpreter: nothing imported before."""
    code = ("import importlib.metadata as md, tomllib\n"
            "import bench.lmeval_model as m\n"
            "from lm_eval.api.registry import get_model\n"
            "assert get_model('tdbench') is m.TdbenchLM\n"
            "assert get_model('hf').__name__ == 'HFLM'\n"
            f"ep = tomllib.load(open({str(REPO / 'pyproject.toml')!r}, 'rb'))['project']['entry-points']\n"
            "ep = ep['lm_eval.models']\n"
            "assert md.EntryPoint('tdbench', ep['tdbench'], 'lm_eval.models').load() is m.TdbenchLM\n")
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


@given(ctx=st.integers(0, 40), cont=st.integers(0, 12), L=st.integers(12, 24), bos=st.integers(0, 1),
       fill=st.booleans())
@settings(max_examples=200, deadline=None)
def test_layout_keeps_the_end_of_the_context_and_scores_the_continuation(ctx, cont, L, bos, fill):
    """The continuation is exactly the unkept positions, in order; before it, kept, the BOS and
    the longest suffix of the context that fits; after it (``fill``) kept padding to L; a
    continuation that cannot fit is one line."""
    c, x, pad = list(range(100, 100 + ctx)), list(range(200, 200 + cont)), 7
    if cont > L - bos:
        with pytest.raises(UserError, match="does not fit"):
            layout(c, x, L, bos, pad, fill)
        return
    ids, keep = layout(c, x, L, bos, pad, fill)
    ids, keep = np.array(ids), np.array(keep, dtype=bool)
    fits = min(ctx, L - bos - cont)
    n = bos + fits + cont
    assert len(ids) == len(keep) == (L if fill else n)
    assert ids[~keep].tolist() == x == ids[bos + fits:n].tolist()
    assert ids[:bos + fits].tolist() == [pad] * bos + c[ctx - fits:] and keep[:bos + fits].all()
    assert (ids[n:] == pad).all() and keep[n:].all()


@given(text=st.text(alphabet="ab.\n", max_size=30), stops=st.lists(st.sampled_from(["", ".", "\n", "ab", "b."]),
                                                                   max_size=3))
@settings(max_examples=300, deadline=None)
def test_stop_at_is_the_longest_prefix_without_a_stop(text, stops):
    got = stop_at(text, stops)
    assert text.startswith(got)
    assert not any(s and s in got for s in stops)
    rest = text[len(got):]
    assert rest == "" or any(s and rest.startswith(s) for s in stops)


def test_exact_row_equals_lm_evals_hf_model(hf_run, tmp_path):
    """Acceptance: `tdbench lm-eval` on the bundled tiny tasks gives lm-eval's `hf` numbers."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    run, ckpt = hf_run
    out = tmp_path / "res"
    assert main(["lm-eval", str(run), "--tasks", "tdbench_tiny_mc,tdbench_tiny_rolling", "--output_path", str(out),
                 "--log_samples", "--device", "cpu", "--mc-bootstrap", "20"]) == 0
    ours, ours_samples = read_output(out)
    tm = TaskManager(include_path=str(TASKS), include_defaults=False)
    for task, extra in (("tdbench_tiny_mc", {"add_bos_token": True}), ("tdbench_tiny_rolling", {})):
        ref = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(ckpt), **extra}, tasks=[task],
                                      task_manager=tm, device="cpu", log_samples=True)
        a, b = answers(ours_samples[task]), answers(ref["samples"][task])
        assert len(a) == len(b) > 0 and all(hf_close(x, y) for x, y in zip(a, b)), (task, a[:4], b[:4])
        for key, v in ref["results"][task].items():
            if isinstance(v, float) and "," in key:
                assert math.isclose(ours["results"][task][key], v, rel_tol=1e-6, abs_tol=1e-9), (task, key)
                m, f = key.split(",")
                if not m.endswith("_stderr"):   # an exact row: the draws move nothing
                    assert ours["results"][task][f"{m}_mc_stderr,{f}"] == 0.0


def test_exact_row_chain_rule_blocks_and_empty_context(runs):
    from lm_eval.api.instance import Instance

    from bench.lmeval_model import TdbenchLM

    sc = Scorer(LMEvalArgs(run=str(runs["ar"]), device="cpu"))
    texts = [json.loads(x)["text"] for x in (TASKS / "tiny_rolling.jsonl").read_text().splitlines()]
    docs = [d for d in sc.tokenizer.encode_batch(texts) if len(d) >= 2 * sc.L]
    assert len(docs) >= 4 and sc.L == 32
    c, a, b = zip(*[(d[:10], d[10:18], d[18:30]) for d in docs])
    whole, first, second = (sc.loglikelihood(list(p))[0] for p in (zip(c, [x + y for x, y in zip(a, b)]), zip(c, a),
                                                                   zip([x + y for x, y in zip(c, a)], b)))
    assert np.abs(whole - (first + second)).max() < 1e-3
    rolled, se = sc.rolling(docs)
    blocks = [sc.loglikelihood([([], d[s:s + sc.L])])[0][0] for d in docs for s in range(0, len(d), sc.L)]
    assert abs(rolled.sum() - sum(blocks)) < 1e-3 and (se == 0).all()
    lm = TdbenchLM(run=str(runs["ar"]), device="cpu")
    text = sc.tokenizer.decode(docs[0][:20])
    (ll, greedy), = lm.loglikelihood([Instance("loglikelihood", {}, ("", text), 0, ("t", 0, 1))])
    (rolled_one,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0, ("t", 0, 1))])
    assert abs(ll - rolled_one) < 1e-3 and greedy is False


def test_diffusion_row_reports_accuracy_with_both_stderrs(runs, tmp_path):
    """Acceptance: an MDLM row through `tdbench lm-eval`'s evaluation reports acc with lm-eval's
    stderr and the Monte-Carlo one, which match their independent computations (docstring)."""
    from bench.lmeval import ScorerSettings
    from bench.lmeval_run import Options, evaluate

    res = evaluate(str(runs["mdlm"]), ScorerSettings(K=4, device="cpu"),
                   Options(tasks=["tdbench_tiny_mc", "tdbench_tiny_rolling"], mc_bootstrap=400,
                           output_path=str(tmp_path / "res"), log_samples=True))
    mc = res["results"]["tdbench_tiny_mc"]
    assert 0 < mc["acc_stderr,none"] < 1 and 0 <= mc["acc,none"] <= 1
    rng, var = np.random.default_rng(1), 0.0
    for s in res["samples"]["tdbench_tiny_mc"]:
        ll = np.array(answers([s]))   # as lm-eval logs them: texts of the floats, exactly (repr)
        se = np.array(s["mc_se"])
        assert (se > 0).all()
        p = ((ll + se * rng.standard_normal((200_000, len(ll)))).argmax(1) == int(s["target"])).mean()
        var += p * (1 - p)
    want = math.sqrt(var) / len(res["samples"]["tdbench_tiny_mc"])
    assert want > 0 and abs(mc["acc_mc_stderr,none"] / want - 1) < 0.25, (mc["acc_mc_stderr,none"], want)
    ro = res["results"]["tdbench_tiny_rolling"]
    docs = res["samples"]["tdbench_tiny_rolling"]
    se2 = sum(s["mc_se"][0] ** 2 for s in docs)
    nbytes = sum(len(s["target"].encode("utf-8")) for s in docs)
    want = math.sqrt(se2) / (math.log(2) * nbytes)
    assert abs(ro["bits_per_byte_mc_stderr,none"] / want - 1) < 0.25, (ro["bits_per_byte_mc_stderr,none"], want)
    # the logged answers and se are the model's for those very requests: the same requests in
    # lm-eval's order (documents, then choices) to a fresh model give them again, exactly
    from lm_eval.api.instance import Instance

    from bench.lmeval_model import TdbenchLM

    logged_mc = res["samples"]["tdbench_tiny_mc"]
    again = [Instance("loglikelihood", s["doc"], (a["arg_0"], a["arg_1"]), i, ("tdbench_tiny_mc", s["doc_id"], 1))
             for s in logged_mc for i, a in enumerate(s["arguments"].values())]
    lm = TdbenchLM(run=str(runs["mdlm"]), K=4, device="cpu")
    assert [x for x, _ in lm.loglikelihood(again)] == answers(logged_mc)
    assert [lm.mc_se[(r.task_name, r.doc_id, r.idx)] for r in again] == [x for s in logged_mc for x in s["mc_se"]]
    written, logged = read_output(tmp_path / "res")   # lm-eval's usual results JSON carries both
    assert written["results"]["tdbench_tiny_mc"]["acc_mc_stderr,none"] == mc["acc_mc_stderr,none"]
    assert [s["mc_se"] for s in logged["tdbench_tiny_mc"]] == [s["mc_se"] for s in res["samples"]["tdbench_tiny_mc"]]
    assert written["config"]["tdbench"]["K"] == 4 and written["config"]["model"] == "tdbench"


def test_request_se_is_the_spread_over_seeds(runs):
    sc = Scorer(LMEvalArgs(run=str(runs["mdlm"]), K=4, device="cpu"))
    texts = [json.loads(x)["text"] for x in (TASKS / "tiny_rolling.jsonl").read_text().splitlines()]
    docs = sc.tokenizer.encode_batch(texts)
    reqs = [(d[:12], d[12:20]) for d in docs if len(d) >= 20] * 4
    long = [d for d in docs if len(d) > sc.L] * 2          # texts of 2–3 blocks: se √Σ over blocks
    got: dict[str, list] = {"ll": [], "ll_se": [], "rolling": [], "rolling_se": []}
    for seed in range(16):
        sc.args = sc.args.model_copy(update={"seed": seed})
        for k, v in zip(("ll", "ll_se", "rolling", "rolling_se"), (*sc.loglikelihood(reqs), *sc.rolling(long))):
            got[k].append(v)
    ratio = {k: np.var(got[k], 0, ddof=1).sum() / (np.array(got[k + "_se"]) ** 2).mean(0).sum()
             for k in ("ll", "rolling")}
    assert len(reqs) == 44 and len(long) == 22
    assert 0.65 < ratio["ll"] < 1.5 and 0.55 < ratio["rolling"] < 1.6, ratio


def test_generation_keeps_the_end_of_the_context_and_stops(runs):
    sc = Scorer(LMEvalArgs(run=str(runs["mdlm"]), device="cpu", steps=4))
    seen = []
    sample = sc.method.sample

    def spy(n, steps, generator=None, **kw):
        seen.append(kw)
        return sample(n, steps, generator=generator, **kw)
    sc.method.sample = spy
    ctx = list(range(40, 80))                          # 40 tokens: more than the block of 32 holds
    out = sc.generate([ctx, ctx[:5], ctx[:5]], [6, 10, 100])
    given_, keep = seen[0]["given"], seen[0]["keep"]
    # lm-eval's rule: the context cut from the left to leave room for min(max_gen_toks, L − 1) tokens
    assert [given_[i][keep[i]].tolist() for i in range(3)] == [ctx[-(32 - 6):], ctx[:5], ctx[4:5]]
    assert [len(x) for x in out] == [6, 10, 31]       # capped by max_gen_toks, and by the block


def test_generate_until_answers_stop_and_a_row_without_sampler_is_refused(runs, hf_run, tmp_path, capsys):
    assert main(["lm-eval", str(runs["mdlm"]), "--tasks", "tdbench_tiny_gen", "--output-path", str(tmp_path / "g"),
                 "--log-samples", "--device", "cpu", "--steps", "4"]) == 0
    _, samples = read_output(tmp_path / "g")
    got = [s["filtered_resps"][0] for s in samples["tdbench_tiny_gen"]]
    assert len(got) == 12 and not any("\n" in g or "." in g for g in got)
    capsys.readouterr()
    assert main(["lm-eval", str(hf_run[0]), "--tasks", "tdbench_tiny_gen", "--output-path", str(tmp_path / "h"),
                 "--device", "cpu"]) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]   # after the progress bars
    assert len(errors) == 1 and "has no sampler" in errors[0] and not (tmp_path / "h").exists()


@pytest.mark.parametrize("argv, says", [
    (["--tasks", "tdbench_tiny_mcc"], "did you mean 'tdbench_tiny_mc'"),
    (["--tasks", "tdbench_tiny_mc", "--K", "3"], "--K: 3: must be even"),
    (["--tasks", "tdbench_tiny_mc", "--log_samples"], "--log-samples: needs --output-path"),
    (["--tasks", "tdbench_tiny_mc", "--include-path", "/no/such/dir"], "--include-path: /no/such/dir"),
])
def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys, argv, says):
    out = tmp_path / "res"
    rc = main(["lm-eval", str(runs["mdlm"]), *argv] + (["--output-path", str(out)] if "--log_samples" not in argv
                                                        else []))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and says in err, err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal when no GPU is visible")
def test_an_invisible_device_is_refused_by_the_command_and_falls_back_under_lm_eval(runs, capsys):
    from bench.lmeval_model import TdbenchLM

    assert main(["lm-eval", str(runs["ar"]), "--tasks", "tdbench_tiny_mc", "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device is visible" in capsys.readouterr().err
    assert TdbenchLM(run=str(runs["ar"]), device="cuda:0").scorer.device == "cpu"   # lm-eval's default device


def test_not_a_run_directory_is_one_line(tmp_path, capsys):
    assert main(["lm-eval", str(tmp_path), "--tasks", "tdbench_tiny_mc"]) == 2
    assert "not a run directory" in capsys.readouterr().err
