"""Data: offline GPT-2 ids, chapter splits, packing rules, cache reuse, trained BPE
determinism, and the Markov source's analytic entropy."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bench.config import DataConfig, DatasetRef
from bench.data import corpora, load_blocks, synthetic
from bench.data.packing import pack
from bench.data.tokenizers import gpt2


def test_gpt2_ids_match_openai():
    tok = gpt2()
    assert tok.encode_batch(["Hello world!"]) == [[15496, 995, 0]]
    assert tok.eos_id == 50256 and tok.vocab_size == 50257
    text = "It is a truth universally acknowledged, that a single man"
    assert tok.decode(tok.encode_batch([text])[0]) == text


@pytest.mark.parametrize("name", corpora.CORPORA)
def test_splits_are_whole_chapters_and_disjoint(name):
    docs = corpora.all_documents(name)
    parts = {s: corpora.documents(name, s) for s in corpora.SPLITS}
    assert sum(len(v) for v in parts.values()) == len(docs)
    assert len(parts["test"]) >= 10 and len(parts["valid"]) >= 10
    # every document is a chapter/scene: it starts at a heading (except the front matter)
    heads = sum(bool(corpora._HEADINGS[name].match(d.split("\n", 1)[0])) for d in docs)
    assert heads >= len(docs) - 50
    assert not set(parts["train"]) & set(parts["test"])
    assert corpora.documents(name, "test") == parts["test"]  # deterministic


def test_packing_eos_per_doc_pads_and_never_drops():
    docs = [np.array([1, 2, 3]), np.array([4, 5])]
    toks, counted = pack(docs, 4, "eos_per_doc", eos_id=9)
    assert toks.tolist() == [[1, 2, 3, 9], [4, 5, 9, 9]]
    assert counted.tolist() == [[True] * 4, [True, True, True, False]]
    toks, counted = pack(docs, 4, "bos_eos_per_block", eos_id=9)
    assert toks.tolist() == [[9, 1, 2, 9], [9, 3, 4, 9], [9, 5, 9, 9]]
    assert counted[:, 0].sum() == 0 and counted[2].tolist() == [False, True, False, True]


def test_block_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("TDBENCH_CACHE", str(tmp_path))
    from bench.data import _text_tokenizer
    _text_tokenizer.cache_clear()
    data = DataConfig(train="austen", eval=["kjv"], tokenizer={"name": "bpe", "vocab_size": 400}, seq_len=64)
    a = load_blocks(DatasetRef(name="kjv"), "test", data, "eos_per_doc")
    files = sorted((tmp_path / "blocks").rglob("*.npy"))
    assert len(files) == 2 and isinstance(a.tokens, np.memmap)
    stamp = [f.stat().st_mtime_ns for f in files]
    import bench.data as D
    monkeypatch.setattr(D.blockcache, "build", lambda *a, **k: pytest.fail("re-tokenized"))
    b = load_blocks(DatasetRef(name="kjv"), "test", data, "eos_per_doc")
    assert np.array_equal(a.tokens, b.tokens) and [f.stat().st_mtime_ns for f in files] == stamp
    assert a.counted.sum() == sum(len(x) + 1 for x in gpt2_free_count(data))
    _text_tokenizer.cache_clear()


def gpt2_free_count(data):
    from bench.data import get_tokenizer
    return get_tokenizer(data).encode_batch(corpora.documents("kjv", "test"))


def test_trained_bpe_is_deterministic(tmp_path):
    from bench.data.tokenizers import train_bpe
    docs = corpora.documents("austen", "train")[:40]
    a = train_bpe(docs, 500, tmp_path / "a.json", "bpe-500")
    b = train_bpe(docs, 500, tmp_path / "b.json", "bpe-500")
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert a.encode_batch(["Mr. Darcy"]) == b.encode_batch(["Mr. Darcy"])


@pytest.mark.parametrize("order,vocab", [(1, 8), (2, 4)])
def test_markov_entropy_is_exact(order, vocab):
    """Analytic block entropy vs the empirical mean of −log p over 4000 sampled blocks
    (tolerance: 4 standard errors of that mean)."""
    src = synthetic.markov(synthetic.MarkovParams(vocab=vocab, order=order, seed=3))
    L = 20
    x = src.sample(4000, L, "test")
    nll = -src.log_prob(x)
    se = nll.std() / math.sqrt(len(nll))
    assert abs(nll.mean() - src.block_entropy(L)) < 4 * se
    assert 0 < src.entropy_rate < math.log(vocab)
    assert np.allclose(src.pi @ np.ones_like(src.pi), 1.0)


def test_char_tokenizer_follows_text8_preprocessing():
    from bench.data.tokenizers import CharTokenizer

    tok = CharTokenizer()
    assert tok.vocab_size == 27 and tok.eos_id == -1
    assert tok.normalize("Mr. Darcy's 2 horses\n— Café!") == "mr darcy s two horses caf"
    assert tok.normalize("1984") == "one nine eight four"
    ids = tok.encode("It is a truth.")
    assert tok.decode(ids) == "it is a truth " and max(ids) == 26 and min(ids) == 0
    assert tok.encode_batch(["A", "", "  b  "]) == [[0, 26], [], [1, 26]]


def test_char_suite_packs_documents_like_text8(tmp_path):
    """packing none: documents back to back, one space between them, every character counted."""
    from bench.config import DataConfig
    from bench.data import corpora, load_blocks
    from bench.data.tokenizers import CharTokenizer

    data = DataConfig(train={"name": "austen"}, eval=[{"name": "kjv"}], tokenizer="char", seq_len=64)
    b = load_blocks(data.eval[0], "test", data, "none")
    text = CharTokenizer().decode(np.asarray(b.tokens)[np.asarray(b.counted)])
    docs = corpora.documents("kjv", "test")
    want = "".join(CharTokenizer.normalize(d) + " " for d in docs)
    assert text == want and "  " not in text


def test_char_tokenizer_needs_packing_none(tmp_path):
    from conftest import tiny_suite, write_suite

    from bench.cli import main

    s = tiny_suite(data={"train": {"name": "austen"}, "eval": [{"name": "kjv"}], "tokenizer": "char", "seq_len": 32})
    rc = main(["run", str(write_suite(tmp_path / "s.yaml", s)), "--out", str(tmp_path / "o")])
    assert rc == 2 and not (tmp_path / "o").exists()
