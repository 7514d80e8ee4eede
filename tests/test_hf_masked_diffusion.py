"""hf-masked-diffusion: a pretrained masked LM's NELBO under the protocol equals the brute-force
enumeration over every masking order; the confidence sampler reveals the most confident first;
a checkpoint that ships its own modelling code runs only with trust_remote_code: true, and takes
t under the keyword its row names; a suite of such rows runs end to end.

Every model here is a tiny random one saved with save_pretrained under tmp_path (offline).
"""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from bench.cli import main
from bench.config import BackboneConfig, Protocol
from bench.errors import UserError
from bench.evaluate import per_sequence_nll, summarize
from bench.method import Context
from bench.registry import get_method
from methods._masked import confidence_sample
from methods.hf_masked_diffusion import save_tiny_bert
from tests.conftest import write_suite

BB = BackboneConfig(layers=1, hidden=32, heads=2)
MASK_BOOST = 3.0   # the [MASK] column's output bias: a model that puts real mass on [MASK] (as a
                   # trained MLM does at masked rows), so reading p(x_0 | x_t) without SUBS shows


def build(model_dir, tokenizer, L, **params):
    cls = get_method("hf-masked-diffusion")
    return cls(cls.Params(model=str(model_dir), **params), BB, tokenizer.vocab_size, L, Context(tokenizer=tokenizer))


def masked_lm(path, vocab_size=None, mask=4):
    """A tiny BertForMaskedLM with sharpened embeddings (its predictions depend on the context)
    and a boosted [MASK] logit; with ``vocab_size`` (GPT-2's + 1, MDLM's layout) no tokenizer."""
    from transformers import BertConfig, BertForMaskedLM

    if vocab_size is None:
        model = save_tiny_bert(path, sharpen=20.0)
    else:
        torch.manual_seed(0)
        model = BertForMaskedLM(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=64)).eval()
        with torch.no_grad():
            model.bert.embeddings.word_embeddings.weight.mul_(20.0)
    with torch.no_grad():
        model.get_output_embeddings().bias[mask] += MASK_BOOST
    model.save_pretrained(path)
    return model


def log_p_by_hand(model, ids: list[int], mask: int) -> torch.Tensor:
    """(L, V') log p(x_0 | these ids) straight from transformers, the [MASK] column removed."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logits[:, mask] = -math.inf
    return torch.log_softmax(logits, -1)


def any_order_nll(model, ids: list[int], positions: list[int], mask: int) -> tuple[float, float]:
    """The NELBO of a time-agnostic denoiser on ``ids`` (the counted ``positions`` noised, the rest
    clean context), two closed forms by enumeration:
    (a) the mean over all n! masking orders σ of the any-order AR NLL Σ_k −log p(x_σ(k) | x_σ(<k)),
        the positions σ(k..n) [MASK]ed when σ(k) is predicted;
    (b) Σ_{m=1}^{n} (1/m) mean_{|S|=m} Σ_{i∈S} −log p(x_i | x with S masked) — the integral over t
        of MDLM eq. 10, since P(S masked at t) = t^m (1−t)^(n−m) and ∫ t^(m−1) (1−t)^(n−m) dt = 1/(m·C(n,m)).
    """
    n = len(positions)

    def masked_out(S):
        x = list(ids)
        for i in S:
            x[i] = mask
        return x

    cache: dict[frozenset, torch.Tensor] = {}

    def lp(S):
        if S not in cache:
            cache[S] = log_p_by_hand(model, masked_out(S), mask)
        return cache[S]

    orders = list(itertools.permutations(positions))
    a = sum(sum(-lp(frozenset(o[k:]))[o[k], ids[o[k]]].item() for k in range(n)) for o in orders) / len(orders)
    b = 0.0
    for m in range(1, n + 1):
        subsets = list(itertools.combinations(positions, m))
        b += sum(sum(-lp(frozenset(S))[i, ids[i]].item() for i in S) for S in subsets) / len(subsets) / m
    return a, b


def protocol(K: int) -> Protocol:
    return Protocol(tokenizer="-", seq_len=0, packing="-", counted="-", t_samples=K, t_sampling="stratified",
                    t_min=0.0, confidence=0.95, max_blocks=None)


@pytest.mark.parametrize("ids_path", ["retokenized", "suite-ids"])
def test_protocol_nelbo_equals_enumeration_over_masking_orders(tmp_path, ids_path):
    """THE check: the protocol's estimate (bench.evaluate.per_sequence_nll: stratified u, K draws
    per block, MDLM's bounded-weight estimator through the method's SUBS denoiser) of a
    time-agnostic masked LM equals the enumeration above.

    retokenized: a character suite ("hi yo", 5 counted suite tokens) read by a tiny BERT with its
    own WordPiece tokenizer: h ##i y ##o counted, [CLS] … [SEP] uncounted clean context.
    suite-ids: MDLM's layout — GPT-2's ids as they are, [MASK] = 50257 appended to the vocabulary,
    no tokenizer saved; 4 of 6 positions counted, the first and last uncounted context.

    Tolerance: the estimate is unbiased for the enumeration (u stratified, the m-subset uniform,
    the weight n/m exact); its Monte-Carlo standard error comes from the protocol's own two
    replicates per block (summarize). |estimate − exact| ≤ 4·se fails a correct estimator with
    probability ~6e-5 (the seeds are fixed, so the outcome is deterministic), and the test also
    requires 4·se < 2% of the value (16 blocks × 256 draws: ~1% here), so any error above 2% is
    caught — the mutants listed in tests/mutation/run.py (SUBS's [MASK] removal dropped, the
    frame counted, the logits shifted, n/m dropped) move it by more."""
    from bench.data.tokenizers import CharTokenizer, gpt2

    if ids_path == "retokenized":
        model = masked_lm(tmp_path / "bert")
        tok = CharTokenizer()
        x = tok.encode_batch(["hi yo"])[0]
        counted = [True] * len(x)
        m = build(tmp_path / "bert", tok, len(x))
        enc = m.hf_tok("hi yo")["input_ids"]               # [CLS] h ##i y ##o [SEP]
        mask, ids, positions = m.hf_tok.mask_token_id, enc, list(range(1, len(enc) - 1))
        assert m.info()["retokenized"] is True and len(positions) == 4
    else:
        model = masked_lm(tmp_path / "mdlm-like", vocab_size=50258, mask=50257)
        tok = gpt2()
        x = tok.encode_batch(["The cat sat on a mat"])[0][:6]
        counted = [False, True, True, True, True, False]
        m = build(tmp_path / "mdlm-like", tok, len(x), mask_id=50257)
        mask, ids, positions = 50257, x, [1, 2, 3, 4]
        assert m.info()["retokenized"] is False and m.mask_id == 50257
    a, b = any_order_nll(model, ids, positions, mask)
    assert a == pytest.approx(b, abs=1e-9)     # the two closed forms agree (exact arithmetic up to fp64)
    N, K = 16, 256
    tokens = np.array([x] * N)
    cnt = np.array([counted] * N)
    draws, ntok = per_sequence_nll(m, tokens, cnt, protocol(K), batch_size=8, seed=0, device="cpu")
    s = summarize(draws, ntok, 0.95, exact=False, scheme="stratified")
    exact = a / sum(counted)                   # per suite token
    se = s["se_nll_per_token"]
    assert 4 * se < 0.02 * exact, (se, exact)
    assert abs(s["nll_per_token"] - exact) <= 4 * se, (s["nll_per_token"], exact, se)


def test_confidence_sampler_reveals_the_most_confident_first():
    """methods._masked.confidence_sample with a denoiser that ignores x_t: position j draws token 0
    w.p. c_j (confidence c_j) and token 1 w.p. 1 − c_j. With steps = L one position is revealed
    per step; the first is the highest-confidence candidate, so exactly
        P(first = j, token 0) = c_j · Π_{i: c_i > c_j} (1 − c_i),
        P(first = j, token 1) = Π_i (1 − c_i) for the j of the smallest c_j (all candidates 1), else 0
    (1 − c_j < 1/2 < c_i). One-sample χ² of 4000 rows against it at α = 1e-3; and every row
    reveals one token per step and ends with no [MASK]."""
    c = torch.tensor([0.6, 0.9, 0.75, 0.55], dtype=torch.float64)
    L, n, MASK = 4, 4000, 2
    seen = []

    def denoise(x_t, t):
        seen.append(x_t.clone())
        lp = torch.full((*x_t.shape, 3), -math.inf, dtype=torch.float64)
        lp[..., 0], lp[..., 1] = c.log(), (1 - c).log()
        return lp

    x = confidence_sample(denoise, torch.full((n, L), MASK), MASK, L, torch.Generator().manual_seed(0))
    assert (x != MASK).all() and len(seen) == L
    assert all(((s == MASK).sum(1) == L - k).all() for k, s in enumerate(seen))   # one reveal per step
    after = seen[1]                                           # x after the first step
    pos = (after != MASK).float().argmax(1)
    first = pos * 2 + after.gather(1, pos[:, None])[:, 0]     # cell: (position, token)
    probs = torch.zeros(2 * L, dtype=torch.float64)
    for j in range(L):
        probs[2 * j] = c[j] * torch.prod(1 - c[c > c[j]])
    probs[2 * int(c.argmin()) + 1] = torch.prod(1 - c)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-12)
    obs = torch.bincount(first, minlength=2 * L).double()
    exp = probs * n
    keep = exp > 0
    assert obs[~keep].sum() == 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum().item()
    assert stat < chi2.ppf(1 - 1e-3, int(keep.sum()) - 1), (obs, exp)


REMOTE_CONFIG = '''from transformers import PretrainedConfig


class TinyMDMConfig(PretrainedConfig):
    model_type = "tinymdm-test"

    def __init__(self, vocab_size=50258, hidden=16, **kw):
        self.vocab_size, self.hidden = vocab_size, hidden
        super().__init__(**kw)
'''
REMOTE_MODEL = '''import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_tinymdm import TinyMDMConfig

SEEN = []


class TinyMDM(PreTrainedModel):
    """A time-conditioned stand-in for MDLM's released model: forward(input_ids, timesteps)."""
    config_class = TinyMDMConfig

    def __init__(self, config):
        super().__init__(config)
        self.emb = torch.nn.Embedding(config.vocab_size, config.hidden)
        self.time = torch.nn.Linear(1, config.hidden)
        self.out = torch.nn.Linear(config.hidden, config.vocab_size)
        self.post_init()

    def forward(self, input_ids, timesteps=None, **kw):
        if timesteps is None:
            raise TypeError("timesteps is required")
        SEEN.append(timesteps.detach().clone())
        h = self.emb(input_ids) + self.time(timesteps.float()[:, None])[:, None]
        return MaskedLMOutput(logits=self.out(torch.tanh(h)))
'''


def remote_code_model(path):
    """A local checkpoint that ships its own modelling code (config.json's auto_map), as the
    released diffusion LMs do; returns its module (for SEEN)."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    path.mkdir()
    (path / "configuration_tinymdm.py").write_text(REMOTE_CONFIG)
    (path / "modeling_tinymdm.py").write_text(REMOTE_MODEL)
    (path / "config.json").write_text(json.dumps({
        "model_type": "tinymdm-test", "vocab_size": 50258, "hidden": 16,
        "auto_map": {"AutoConfig": "configuration_tinymdm.TinyMDMConfig",
                     "AutoModelForMaskedLM": "modeling_tinymdm.TinyMDM"}}))
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=True)
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(cfg, trust_remote_code=True)
    model.save_pretrained(path)
    return __import__(type(model).__module__, fromlist=["SEEN"])


def test_remote_code_needs_the_rows_consent_and_gets_t_as_named(tmp_path):
    """Without trust_remote_code the row is refused in one line, both before the run
    (check_compatible, from the local config) and at loading; with it, the model's forward gets
    σ(t) = −log(1 − t) under ``timesteps`` (time_value: sigma) or t itself (time_value: t)."""
    from bench.data.tokenizers import gpt2

    d = tmp_path / "mdm"
    mod = remote_code_model(d)
    cls = get_method("hf-masked-diffusion")
    with pytest.raises(UserError, match=r"^methods\[x\]\.trust_remote_code: .* ships its own modelling code") as e:
        cls.check_compatible({"model": str(d), "mask_id": 50257}, None, "methods[x]")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="trust_remote_code: true"):
        build(d, gpt2(), 8, mask_id=50257)
    cls.check_compatible({"model": str(d), "mask_id": 50257, "trust_remote_code": True}, None, "methods[x]")
    t = torch.tensor([0.1, 0.5, 0.9])
    x = torch.randint(0, 50257, (3, 8))
    for value, want in [("sigma", -torch.log1p(-t)), ("t", t)]:
        m = build(d, gpt2(), 8, mask_id=50257, trust_remote_code=True, time_kwarg="timesteps", time_value=value)
        assert m.info()["time_kwarg"] == "timesteps" and m.info()["time_value"] == value
        mod.SEEN.clear()
        m.net(x, t)
        assert len(mod.SEEN) == 1 and torch.allclose(mod.SEEN[0], want.float(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="time_value applies only with time_kwarg"):
        cls.Params(model=str(d), time_value="sigma")


def test_missing_mask_or_vocabulary_is_one_line(tmp_path):
    from bench.data.tokenizers import CharTokenizer, gpt2

    masked_lm(tmp_path / "m", vocab_size=50258, mask=50257)
    with pytest.raises(UserError, match=r"mask_id: .* names no mask token"):
        build(tmp_path / "m", gpt2(), 8)
    with pytest.raises(UserError, match=r"mask_id: 60000 is outside"):
        build(tmp_path / "m", gpt2(), 8, mask_id=60000)
    with pytest.raises(UserError, match="has no tokenizer of its own"):
        build(tmp_path / "m", CharTokenizer(), 8, mask_id=50257)


def test_suite_of_masked_rows_runs_and_records_its_settings(tmp_path):
    """`tdbench run` on a textfile with a BERT row (retokenized, confidence sampler) and a
    remote-code time-conditioned row (GPT-2 ids, ancestral): both complete, record their settings,
    commit and weights sha256 beside finite numbers, and write samples in ≤ steps network calls.
    The same suite without trust_remote_code stops before anything runs (exit 2)."""
    from bench.method import weights_sha256

    bert = masked_lm(tmp_path / "bert")
    remote_code_model(tmp_path / "mdm")
    doc = tmp_path / "doc.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog. It was not amused, and said so.\n")
    row = {"method": "hf-masked-diffusion", "model": str(tmp_path / "mdm"), "mask_id": 50257,
           "time_kwarg": "timesteps", "time_value": "sigma", "label": "mdm"}
    suite = {"name": "hfm", "data": {"train": {"name": "textfile", "path": str(doc)},
                                     "eval": [{"name": "textfile", "path": str(doc)}],
                                     "tokenizer": "gpt2", "seq_len": 32},
             "sizes": {"tiny": {"layers": 1, "hidden": 32, "heads": 2}},
             "methods": [{"method": "hf-masked-diffusion", "model": str(tmp_path / "bert"),
                          "sampler": "confidence", "label": "bert"}, row],
             "baseline": None, "eval": {"max_blocks": 2, "t_samples": 4, "samples": 2, "sample_steps": [4]},
             "launch": {"executor": "debug", "threads": 1}}
    out = tmp_path / "out"
    assert main(["run", str(write_suite(tmp_path / "bad.yaml", suite)), "--out", str(out)]) == 2
    assert not (out / "runs").exists() or not list((out / "runs").iterdir())
    row["trust_remote_code"] = True
    assert main(["run", str(write_suite(tmp_path / "s.yaml", suite)), "--out", str(out)]) == 0
    recs = {r["label"]: r for r in (json.loads(p.read_text()) for p in (out / "runs").glob("*/result.json"))}
    assert set(recs) == {"bert", "mdm"} and all(r["status"] == "complete" for r in recs.values())
    b, r = recs["bert"]["method_info"], recs["mdm"]["method_info"]
    assert b["retokenized"] is True and b["mask_id"] == 4 and b["sampler"] == "confidence"
    assert b["weights_sha256"] == weights_sha256(bert) and b["revision"] is None
    assert r["retokenized"] is False and r["trust_remote_code"] is True and r["time_value"] == "sigma"
    for rec in recs.values():
        assert math.isfinite(rec["metrics"][0]["value"]) and rec["metrics"][0]["ci_low"] < rec["metrics"][0]["ci_high"]
        lines = [json.loads(x) for x in (out / "runs" / rec["run_id"] / "samples.jsonl").read_text().splitlines()]
        assert len(lines) == 2 and all(len(x["ids"]) == 32 and x["nfe"] <= 4 for x in lines)
