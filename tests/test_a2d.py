"""An AR model turned into a diffusion LM (``mdlm`` with ``init_from``, methods/_a2d.py): a tiny
random LlamaForCausalLM with its own small byte-level BPE (trained on Austen here), saved with
save_pretrained under tmp_path (offline), stands in for SmolLM2.

Tolerances: the shifted model and the AR model run the same float32 weights on the same ids; they
differ only in how attention is masked (an explicit boolean mask vs SDPA's causal kernel) and in
the head's reduction order (the fused head's chunked log-sum-exp vs log_softmax), ~1e-7 nats per
token here (measured 5e-7 at most). 1e-5 nats per token is well above that and far below what a
missing or reversed shift, or attention that sees the future, does (> 0.05 nats per token on
these sharpened random models: the mutants in tests/mutation/run.py)."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import complete_record, dry_run_error, metric_rows, run_killed_at, specs_of, tiny_suite

from bench import hf
from bench.data import corpora
from bench.data.tokenizers import PretrainedTokenizer
from bench.runner import execute

ATOL = 1e-5    # nats per token (module doc)
L = 32


def save_tiny_llama(path, seed: int = 0, vocab: int = 300, tied: bool = True):
    """A tiny random Llama and its byte-level BPE (``<|endoftext|>`` its BOS and EOS), saved."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpora.documents("austen", "train")[:200], vocab_size=vocab, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():   # a random init is near uniform: sharpen it so mistakes show in the NLL
        model.model.embed_tokens.weight.mul_(8)
        if not tied:
            model.lm_head.weight.mul_(8)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("a2d") / "tiny-llama"
    model, tok = save_tiny_llama(path)
    return str(path), model, PretrainedTokenizer(tok, str(path))


def a2d(path, tok, anneal_steps: int = 0):
    from methods.mdlm import MDLM, MDLMParams

    return MDLM(MDLMParams(init_from=path, anneal_steps=anneal_steps), None, tok.vocab_size, L)


def blocks(tok, n: int = 4) -> torch.Tensor:
    text = " ".join(corpora.documents("austen", "test")[:20])
    ids = tok.encode_batch([text])[0]
    return torch.tensor(ids[:n * L]).view(n, L)


def clean_nll(method, x) -> torch.Tensor:
    """−log p_θ(x_0^i | x_t = x_0) per token (B, L): the denoiser on clean input, through the
    fused head MDLM's loss uses."""
    h = method.net(x, torch.zeros(len(x)), return_hidden=True)
    return method.net.head(h, x).double()


@pytest.mark.parametrize("anneal_steps", [0, 4])
def test_step0_shifted_loss_equals_the_ar_loss(tiny, anneal_steps):
    """THE step-0 identity: with causal attention (step 0 of the annealing schedule; or, N = 0,
    the causal mask set by hand) the shifted model's loss on clean input is the AR model's
    −log p(x | BOS), token by token."""
    path, ar, tok = tiny
    m = a2d(path, tok, anneal_steps).train()
    m.before_step("train", 0)
    if anneal_steps == 0:
        m.net.ratio = 0.0          # no schedule: the causal mask itself
    x = blocks(tok)
    with torch.no_grad():
        got = clean_nll(m, x)
        want = hf.causal_lm_token_nll(ar, x, tok.eos_id)
    assert torch.allclose(got, want, atol=ATOL, rtol=0), float((got - want).abs().max())
    # ... and the same number through the logits path MDLM's bound reads (denoise: log-softmax)
    with torch.no_grad():
        lp = m.denoise(x, torch.zeros(len(x))).double()
    assert torch.allclose(-lp.gather(-1, x[..., None])[..., 0], want, atol=ATOL, rtol=0)


def test_attention_is_bidirectional_after_annealing(tiny):
    """Perturbation: the output read for position i changes with a later token (j > i) once the
    schedule has reached full attention (and in evaluation), and not at step 0 (causal)."""
    path, _, tok = tiny
    m = a2d(path, tok, anneal_steps=3)
    x = blocks(tok, 1)
    y = x.clone()
    y[0, 20] = (x[0, 20] + 1) % tok.vocab_size
    i = 5

    def out_at_i():
        with torch.no_grad():
            return m.net(x, None)[0, i], m.net(y, None)[0, i]

    m.train()
    m.before_step("train", 0)
    a, b = out_at_i()
    assert torch.equal(a, b), "step 0 must be causal"
    for when in ("step 3 of 3", "eval"):
        if when == "eval":
            m.eval()
        else:
            m.before_step("train", 3)
        a, b = out_at_i()
        assert (a - b).abs().max() > 1e-3, f"{when}: position {i} does not see position 20"


def test_annealing_opens_a_growing_share_of_future_keys():
    """r_k = min(1, k/N): none at step 0, all from step N on, about r of them in between."""
    from methods._a2d import anneal_ratio, attention_allowed

    n = 200
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    assert anneal_ratio(0, 10) == 0.0 and anneal_ratio(10, 10) == anneal_ratio(50, 10) == 1.0
    assert anneal_ratio(5, 0) == 1.0
    torch.manual_seed(0)
    for k, r in ((0, 0.0), (3, 0.3), (10, 1.0)):
        allowed = attention_allowed(n, anneal_ratio(k, 10))
        assert allowed[~future].all(), "the causal keys are always open"
        share = float(allowed[future].float().mean())
        # a binomial share of 19,900 keys: 4 standard deviations is < 0.015
        assert abs(share - r) < 0.015, (k, share)


def test_mask_token_grows_the_vocabulary_by_one_and_leaves_old_logits(tiny):
    """[MASK] is the model's vocabulary size V_m, one more input row at the mean of the others;
    the pretrained rows are as loaded, and the logits over the old ids are the AR model's own
    (shifted): the output is V wide, [MASK] never predicted."""
    path, ar, tok = tiny
    m = a2d(path, tok, anneal_steps=4).train()
    m.before_step("train", 0)
    E0 = ar.get_input_embeddings().weight
    E = m.net.body.get_input_embeddings().weight
    assert E.shape == (E0.shape[0] + 1, E0.shape[1]) and m.mask_id == E0.shape[0]
    assert torch.equal(E[:-1], E0)
    assert torch.allclose(E[-1], E0.mean(0))
    x = blocks(tok, 2)
    with torch.no_grad():
        got = m.net(x, None)
        bos = torch.full((2, 1), tok.eos_id)
        want = ar(input_ids=torch.cat([bos, x], 1)).logits[:, :L]
    assert got.shape == (2, L, tok.vocab_size)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), float((got - want).abs().max())


def test_suite_rules(tiny, tmp_path, capsys):
    """One-line errors (exit 2, nothing written): a pretrained start must train in the model's ids,
    takes no time, and the hf tokenizer names its model."""
    path, _, _ = tiny
    for d in "abcd":
        (tmp_path / d).mkdir()
    own = {"name": "hf", "model": path}
    data = {"train": "austen", "eval": ["austen"], "seq_len": L}
    err = dry_run_error(tmp_path / "a", capsys, tiny_suite(data={**data, "tokenizer": {"name": "bpe"}},
                                                           methods=[{"method": "mdlm", "init_from": path}]))
    assert ".init_from" in err and "name: hf" in err
    err = dry_run_error(tmp_path / "b", capsys, tiny_suite(data={**data, "tokenizer": own}, methods=[
        {"method": "mdlm", "init_from": path, "time_conditioning": True}]))
    assert "time_conditioning must be false" in err
    err = dry_run_error(tmp_path / "c", capsys, tiny_suite(data={**data, "tokenizer": {"name": "hf"}}))
    assert "data.tokenizer" in err and "model" in err
    err = dry_run_error(tmp_path / "d", capsys, tiny_suite(methods=[{"method": "mdlm", "anneal_steps": 3}]))
    assert "anneal_steps applies only with init_from" in err


def a2d_suite(path, steps: int = 4) -> dict:
    return tiny_suite(data={"train": "austen", "eval": ["austen"], "tokenizer": {"name": "hf", "model": path},
                            "seq_len": L},
                      methods=[{"method": "mdlm", "init_from": path, "anneal_steps": 3}], baseline=None,
                      train={"steps": steps, "batch_size": 4, "lr": 1e-3, "warmup": 1, "ckpt_every": 2},
                      eval={"t_samples": 2, "max_blocks": 4, "batch_size": 4, "samples": 2, "sample_steps": [4],
                            "per_byte": True})


def test_trains_through_the_harness_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    """4 steps of a tiny suite in the model's own ids through the runner (train, bound, per-byte
    numbers, samples); killed after step 2 and resumed, its numbers equal the uninterrupted run's
    bit for bit — the annealing schedule and its mask draws included. The loop tells the method
    each optimizer step before it is taken (the schedule's clock), from the resumed step on."""
    from methods.mdlm import MDLM

    path, _, tok = tiny
    steps_seen = []
    told = MDLM.before_step
    monkeypatch.setattr(MDLM, "before_step", lambda self, stage, k: (steps_seen.append(k), told(self, stage, k)))
    spec = specs_of(a2d_suite(path), tmp_path)[0]
    spec_json = json.dumps(spec.model_dump(mode="json"))
    ref_dir = tmp_path / "uninterrupted"
    assert execute(json.loads(spec_json), ref_dir, 1) == "complete"
    assert steps_seen == [0, 1, 2, 3]
    rec = complete_record(ref_dir)
    assert rec["method_info"]["a2d"]["mask_id"] == tok.vocab_size
    assert rec["spec"]["data"]["tokenizer"] == {"name": "hf", "vocab_size": None, "model": path}
    assert {m["metric"] for m in rec["metrics"]} >= {"ppl", "bpb"}
    lines = (ref_dir / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(len(json.loads(s)["ids"]) == L for s in lines)

    run_dir = tmp_path / "killed"
    run_killed_at(spec_json, run_dir, 2)
    steps_seen.clear()
    assert execute(json.loads(spec_json), run_dir, 1) == "complete"
    assert steps_seen == [2, 3]
    again = complete_record(run_dir)
    assert again["train"]["resumed_from_step"] == 2
    assert metric_rows(again) == metric_rows(rec)
    assert again["train"]["final_loss"] == rec["train"]["final_loss"]


def test_the_smollm2_suite_validates():
    """suites/a2d-smollm2.yaml expands (no model loaded): the A2D row in SmolLM2's ids, time-agnostic."""
    from conftest import REPO

    from bench.suite import load_suite

    _, specs = load_suite(REPO / "suites" / "a2d-smollm2.yaml")
    a2d_row = next(s for s in specs if s.method == "mdlm")
    assert a2d_row.params["init_from"] == "smollm2" and a2d_row.params["time_conditioning"] is False
    assert a2d_row.data.tokenizer.model == "smollm2" and a2d_row.train.ema == 0.0
