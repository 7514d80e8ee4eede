"""hf-causal-lm: a tiny GPT-2 saved with save_pretrained is scored under the suite's protocol
exactly as transformers scores the same tokens by hand; windows beyond the model's context;
a suite with only evaluated methods (baseline: null, no train:) trains nothing."""
from __future__ import annotations

import json
import math

import pytest
import torch

from bench.cli import main
from tests.conftest import write_suite

# Tolerance: the harness and the by-hand computation run the same float32 model on the same
# ids; they differ only in batch/sequence shapes (padding after the document changes the
# matmul shapes, hence float32 summation order), i.e. ~1e-6 relative in the logits. 1e-5
# nats per token is well above that and far below any real difference (a wrong context or an
# off-by-one target moves the per-token NLL by > 0.1 nats on a random-init model).
TOL = 1e-5

DOC = "The quick brown fox jumps over the lazy dog. It was not amused, and said so at length."


def tiny_gpt2(path, n_positions=64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50257, n_positions=n_positions, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random init is near uniform; sharpen it so mistakes show in the NLL
        model.transformer.wte.weight.mul_(4)
    model.save_pretrained(path)
    return model


def by_hand_nll(model, ids: list[int], bos: int) -> torch.Tensor:
    x = torch.tensor([[bos] + ids[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits.double(), -1)[0]
    return -logp[torch.arange(len(ids)), torch.tensor(ids)]


def test_token_nll_matches_transformers_and_windows(tmp_path):
    from bench import hf

    model = tiny_gpt2(tmp_path / "m", n_positions=16)
    loaded = hf.load_causal_lm(str(tmp_path / "m"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50257, (2, 40), generator=g)
    # within the context: one forward, equal to the hand computation
    short = hf.causal_lm_token_nll(loaded, ids[:, :16], 50256)
    for b in range(2):
        assert torch.allclose(short[b], by_hand_nll(model, ids[b, :16].tolist(), 50256), atol=TOL, rtol=0)
    # beyond the context with stride 1: every token sees exactly its last n_ctx positions
    full = hf.causal_lm_token_nll(loaded, ids, 50256, stride=1)
    seq = torch.cat([torch.full((2, 1), 50256), ids], 1)
    for j in (0, 15, 16, 39):
        ctx = seq[:, max(0, j + 1 - 16): j + 1]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ctx).logits[:, -1].double(), -1)
        assert torch.allclose(full[:, j], -lp.gather(1, ids[:, j:j + 1])[:, 0], atol=TOL, rtol=0)
    # default stride (= context): disjoint windows; the first window equals the short case
    dflt = hf.causal_lm_token_nll(loaded, ids, 50256)
    assert torch.allclose(dflt[:, :16], short, atol=TOL, rtol=0)
    assert torch.isfinite(dflt).all() and dflt.dtype == torch.float64


def test_suite_of_one_pretrained_row_is_exact(tmp_path):
    """A textfile of one short document (smaller than one block: one padded block, finite
    ppl), baseline: null, no train: — the ppl is exactly the hand-computed one."""
    from bench.data.tokenizers import gpt2

    model = tiny_gpt2(tmp_path / "tiny-gpt2")
    (tmp_path / "doc.txt").write_text(DOC + "\n")
    suite = {"name": "hf", "data": {"train": {"name": "textfile", "path": str(tmp_path / "doc.txt")},
                                    "eval": [{"name": "textfile", "path": str(tmp_path / "doc.txt")}],
                                    "tokenizer": "gpt2", "seq_len": 48},
             "sizes": {"tiny": {"layers": 1, "hidden": 32, "heads": 2}},
             "methods": [{"method": "hf-causal-lm", "model": str(tmp_path / "tiny-gpt2")}],
             "baseline": None, "eval": {"protocol": "sedd", "max_blocks": 4},
             "launch": {"executor": "debug", "threads": 1}}
    out = tmp_path / "out"
    assert main(["run", str(write_suite(tmp_path / "s.yaml", suite)), "--out", str(out)]) == 0
    rec = json.loads(next((out / "runs").glob("*/result.json")).read_text())
    assert rec["train"]["steps"] == 0 and rec["train"]["trained"] is False
    assert not list((out / "runs").glob("*/ckpt"))  # nothing trained, nothing checkpointed
    assert rec["protocol"]["preset"] == "sedd" and rec["method_info"]["retokenized"] is False
    ids = gpt2().encode_batch([DOC])[0] + [50256]    # SEDD: the document's EOS is counted
    assert len(ids) < 48
    m = rec["metrics"][0]
    assert m["n_tokens"] == len(ids) and m["n_seqs"] == 1
    want = by_hand_nll(model, ids, 50256).mean().item()
    assert abs(m["nll_per_token"] - want) < TOL and math.isfinite(m["value"])
    assert abs(math.log(m["value"]) - want) < TOL
    # eval.per_byte: the same NLL over the UTF-8 bytes of the counted tokens (≠ the token count)
    suite["eval"]["per_byte"] = True
    assert main(["run", str(write_suite(tmp_path / "s2.yaml", suite)), "--out", str(tmp_path / "out2")]) == 0
    rec2 = json.loads(next((tmp_path / "out2" / "runs").glob("*/result.json")).read_text())
    bpb = next(x for x in rec2["metrics"] if x["metric"] == "bpb")
    n_bytes = len(gpt2().decode(ids[:-1]).encode("utf-8"))  # the document's bytes; its EOS is no text
    assert bpb["n_bytes"] == n_bytes != len(ids)
    assert abs(bpb["value"] - want * len(ids) / (math.log(2) * n_bytes)) < TOL


def test_unloadable_model_is_one_line(tmp_path, capsys):
    (tmp_path / "notamodel").mkdir()
    from bench import hf
    from bench.errors import UserError
    with pytest.raises(UserError, match="notamodel: cannot load a causal LM from this local directory"):
        hf.load_causal_lm(str(tmp_path / "notamodel"))


def test_other_tokenizer_is_retokenized(tmp_path):
    """Suite tokenizer ≠ model tokenizer: the block's text is retokenized with the model's own
    tokenizer (saved beside it) and its NLL is the hand-computed NLL of that text; with the
    same tokenizer saved, the suite's ids are used as they are."""
    from transformers import PreTrainedTokenizerFast

    from bench.config import BackboneConfig
    from bench.data.tokenizers import gpt2
    from bench.method import Context
    from bench.registry import get_method

    model = tiny_gpt2(tmp_path / "m", n_positions=128)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=gpt2()._tok, bos_token="<|endoftext|>",
                                     eos_token="<|endoftext|>")  # GPT-2's BPE, saved as a HF tokenizer
    hf_tok.save_pretrained(tmp_path / "m")
    cls = get_method("hf-causal-lm")
    m = cls(cls.Params(model=str(tmp_path / "m")), BackboneConfig(layers=1, hidden=32, heads=2), 50257, 64,
            Context(tokenizer=gpt2()))
    assert m.info()["retokenized"] is False and m.info()["first_context_id"] == 50256

    from bench.data.tokenizers import CharTokenizer
    char = CharTokenizer()
    m2 = cls(cls.Params(model=str(tmp_path / "m")), BackboneConfig(layers=1, hidden=32, heads=2), char.vocab_size, 64,
             Context(tokenizer=char))
    assert m2.info()["retokenized"] is True
    x = torch.tensor(char.encode_batch(["the quick brown fox jumps over the lazy dog"]))
    c = torch.ones_like(x, dtype=torch.bool)
    c[0, -5:] = False  # padding / uncounted tail is not part of the text
    got = m2.nll(x, c).item()
    text = char.decode(x[0, :-5].tolist())
    want = by_hand_nll(model, hf_tok(text)["input_ids"], 50256).sum().item()
    assert abs(got - want) < TOL * len(text)


def test_retokenized_row_counts_per_byte(tmp_path):
    """eval.per_byte: a character-level suite scores a model with its own (GPT-2) tokenizer; the
    row's ``bpb`` is the hand-computed NLL of the retokenised text over its UTF-8 bytes (in
    bits), and its ``ppl`` is the same NLL over the suite's counted character tokens."""
    from transformers import PreTrainedTokenizerFast

    from bench.data.tokenizers import CharTokenizer, gpt2

    model = tiny_gpt2(tmp_path / "m", n_positions=128)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=gpt2()._tok, bos_token="<|endoftext|>",
                                     eos_token="<|endoftext|>")
    hf_tok.save_pretrained(tmp_path / "m")
    (tmp_path / "doc.txt").write_text(DOC + "\n")
    suite = {"name": "bytes", "data": {"train": {"name": "textfile", "path": str(tmp_path / "doc.txt")},
                                       "eval": [{"name": "textfile", "path": str(tmp_path / "doc.txt")}],
                                       "tokenizer": "char", "seq_len": 128},
             "sizes": {"tiny": {"layers": 1, "hidden": 32, "heads": 2}},
             "methods": [{"method": "hf-causal-lm", "model": str(tmp_path / "m")}],
             "baseline": None, "eval": {"packing": "none", "per_byte": True, "max_blocks": 4},
             "launch": {"executor": "debug", "threads": 1}}
    out = tmp_path / "out"
    assert main(["run", str(write_suite(tmp_path / "s.yaml", suite)), "--out", str(out)]) == 0
    rec = json.loads(next((out / "runs").glob("*/result.json")).read_text())
    assert rec["method_info"]["retokenized"] is True
    by = {m["metric"]: m for m in rec["metrics"]}
    char = CharTokenizer()
    text = char.decode(char.encode_batch([DOC])[0])       # the text the suite's blocks hold
    want = by_hand_nll(model, hf_tok(text)["input_ids"], 50256).sum().item()
    n_bytes = len(text.encode("utf-8"))
    assert by["ppl"]["n_tokens"] == len(text) and by["bpb"]["n_bytes"] == n_bytes
    assert abs(math.log(by["ppl"]["value"]) - want / len(text)) < TOL
    assert abs(by["bpb"]["value"] - want / (math.log(2) * n_bytes)) < TOL
    md = (out / "leaderboard.md").read_text()
    assert "bits per UTF-8 byte" in md


def test_per_byte_on_a_synthetic_source_is_refused(tmp_path, capsys):
    src = {"name": "markov", "vocab": 8, "order": 1, "seed": 0}
    suite = {"name": "x", "data": {"train": src, "eval": [src], "seq_len": 16},
             "sizes": {"tiny": {"layers": 1, "hidden": 32, "heads": 2}}, "methods": [{"method": "mdlm"}],
             "eval": {"per_byte": True}, "launch": {"executor": "debug"}}
    assert main(["run", str(write_suite(tmp_path / "s.yaml", suite)), "--out", str(tmp_path / "o")]) == 2
    assert "eval.per_byte" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_bytes_per_block_are_utf8_bytes_of_the_counted_tokens():
    """Non-ASCII text: bytes ≠ characters ≠ tokens; uncounted tokens (padding) add none."""
    import numpy as np

    from bench.data.tokenizers import gpt2
    from bench.runner import utf8_bytes_per_block

    tok = gpt2()
    text = "Café naïve — déjà vu."
    ids = tok.encode_batch([text])[0]
    x = np.array([ids + [50256] * 3])
    c = np.array([[True] * (len(ids) + 1) + [False] * 2])  # a counted EOS: no bytes; padding: none
    n = utf8_bytes_per_block(tok, x, c)
    assert n.tolist() == [len(text.encode("utf-8"))] and len(text.encode("utf-8")) > len(text) > len(ids)
