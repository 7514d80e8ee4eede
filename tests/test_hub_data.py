"""The public benchmarks offline: detokenizers on fixture lines shaped like the real data,
`tdbench data prepare NAME --path P` for every registered hub dataset on a small local copy
laid out like the hub's (the real `datasets` loading code, only the files are small), split
rules, textfile, protocol presets (which tokens count), the shared block cache (lock, one
builder), streamed packing = in-memory packing, and bad input (one line, exit 2)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from bench.cli import main
from bench.config import DataConfig, DatasetRef, EvalConfig, Protocol
from bench.data import detokenizers as D
from bench.data import hub, load_blocks
from bench.data.packing import pack, pack_stream
from bench.data.tokenizers import CharTokenizer, gpt2
from tests import hub_fixtures as H
from tests.conftest import REPO, write_suite


# ----------------------------------------------------------------------------- detokenizers
def test_wikitext_detokenizer():
    r = D.wikitext(H.WIKITEXT_ROWS[3])
    assert r.startswith(" Senjō no Valkyria 3: Unrecorded Chronicles (Japanese: 戦場のヴァルキュリア3, "
                        "lit. Valkyria of")
    assert "the Battlefield 3), commonly" in r and "tactical role-playing video game" in r
    assert r.endswith("in the Valkyria series.\n")
    assert D.wikitext(H.WIKITEXT_ROWS[4]) == " == Gameplay ==\n"
    assert D.wikitext(H.WIKITEXT_ROWS[5]) == (" The game's battle system, the BliTZ system, is carried over directly "
                                              "from Valkyria Chronicles. It sold 1,000 copies at $ 3.5 each.\n")
    assert D.wikitext(" = = = Reception = = = \n") == " === Reception ===\n"


def test_ptb_detokenizer():
    assert D.ptb(H.PTB_ROWS[1]) == " pierre ? 1 years old will join the board as a nonexecutive director nov. N"
    assert D.ptb(H.PTB_ROWS[3]) == " it's a 1 1 / 1 share of the company's stock and they don't expect $1 million"
    assert D.ptb(" the N N N rise") == " the 1 1 1 rise"  # overlapping placeholders


def test_lm1b_detokenizer():
    assert D.lm1b(H.LM1B_ROWS[1]) == 'Visit http://www.example.com for the "full story" (in English) .'
    assert D.lm1b(H.LM1B_ROWS[2]) == "I'm not sure it's worth $5, he said."
    assert D.lm1b(H.LM1B_ROWS[3]) == "Why not?"
    assert D.lm1b(H.LM1B_ROWS[0]).endswith("did best: dominate the field of professional golf and rake in "
                                           "endorsements.")


def test_lambada_detokenizer():
    out = D.lambada(H.LAMBADA_ROWS[0] + "  ")
    assert out.startswith('\nIn my palm') and '"Figured if you\u2019re going' in out and "backup.\"\n" in out
    assert "\u201c" not in out and "\u201d" not in out and out.endswith("I don\u2019t care about signs")


# ----------------------------------------------------------------------------- prepare, offline
EXPECT = {  # a string each dataset's decoded test blocks must contain (detokenized), and one they must not
    "wikitext2": ("tactical role-playing video game", " @-@ "),
    "wikitext103": ("sold 1,000 copies", " @,@ "),
    "ptb": ("they don't expect $1 million", "<unk>"),
    "lm1b": ("http://www.example.com", "http : / /"),
    "1bw": ("I'm not sure it's worth $5, he said.", " 'm"),
    "lambada": ('"Figured if you', "\u201c"),
    "openwebtext": ("Document 27 of the web crawl", "Document 3 of"),
    "wikipedia": ("Article 24 is an encyclopedia entry", "Article 3 is"),
    "rocstories": ("Tom wanted a dog", "\ufffd"),
    "text8": ("the french revolution", "\ufffd"),
    "ag_news": ("Short-sellers, story 0, are seeing green again.", "\ufffd"),
    "pubmed": ("was 45.2 years (range 20-70).", "hub test row"),   # MDLM's split: validation
    "arxiv": ("infection, as reported, was low", " @.@ "),
}


@pytest.mark.parametrize("name", sorted(hub.SOURCES))
def test_prepare_every_dataset_offline(name, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TDBENCH_CACHE", str(tmp_path / "cache"))
    path = H.make(name, tmp_path / "hub")
    assert main(["data", "prepare", name, "--path", str(path), "--seq-len", "32"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == len(hub.SOURCES[name].splits) and all("built in" in x for x in out)
    ref = DatasetRef(name=name, path=str(path))
    tok = CharTokenizer() if name == "text8" else gpt2()
    data = DataConfig(train=ref, eval=[ref], tokenizer="char" if name == "text8" else "gpt2", seq_len=32)
    ev = EvalConfig(packing="none") if name == "text8" else EvalConfig(protocol="sedd")
    b = load_blocks(ref, "test", data, ev.packing, ev.counting)
    assert isinstance(b.tokens, np.memmap) and len(b) >= 1
    text = tok.decode(np.asarray(b.tokens)[np.asarray(b.counted)].tolist())
    want, unwanted = EXPECT[name]
    assert want in text and unwanted not in text
    meta = json.loads(next((tmp_path / "cache" / "blocks").glob(f"{name}-test-*/meta.json")).read_text())
    assert meta["n_counted"] == meta["n_tokens"] + (0 if name == "text8" else meta["n_docs"])  # SEDD: + EOS per doc
    # second prepare: cached, nothing rebuilt
    assert main(["data", "prepare", name, "--path", str(path), "--seq-len", "32", "--split", "test"]) == 0
    assert "already cached" in capsys.readouterr().out
    assert main(["data", "list"]) == 0
    listing = capsys.readouterr().out
    assert any(line.strip().startswith("cached test") and f"{meta['n_tokens']:,} tokens" in line
               for line in listing.splitlines())


def test_split_rules(tmp_path):
    owt = H.make("openwebtext", tmp_path)
    p = hub.HubParams(path=str(owt))
    train, test = (hub.split_documents("openwebtext", p, s)["text"] for s in ("train", "test"))
    assert len(train) == 27 and len(test) == 3 and test == H.OWT_ROWS[27:]  # last min(100k, n/10)
    t8 = H.make("text8", tmp_path)
    parts = [hub.split_documents("text8", hub.HubParams(path=str(t8)), s)["text"][0] for s in hub.SPLITS]
    n = len(H.TEXT8)
    assert "".join(parts) == H.TEXT8 and len(parts[0]) == int(0.9 * n) and len(parts[2]) == n - int(0.95 * n)
    wt = H.make("wikitext103", tmp_path)
    rows = hub.split_documents("wikitext103", hub.HubParams(path=str(wt)), "test")["text"]
    assert rows == H.WIKITEXT_ROWS  # SEDD/MDLM: one document per hub row
    arts = hub.split_documents("wikitext103", hub.HubParams(path=str(wt), documents="articles"), "test")["text"]
    assert len(arts) == 2 and arts[0].startswith("\n = Valkyria") is False and "Gameplay" in arts[0]
    assert arts[1].startswith(" = Tower Building")


def test_textfile_documents(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("First doc,\nline two.\n\n  \nSecond doc.\n\n\nThird.")
    assert hub.textfile_documents(str(f)) == ["First doc,\nline two.", "Second doc.", "Third."]
    f.write_text("One document\nwithout a blank line.\n")
    assert hub.textfile_documents(str(f)) == ["One document\nwithout a blank line."]
    assert DatasetRef(name="textfile", path=str(f)).key == "textfile(mine.txt)"
    assert DatasetRef(name="ptb", path="/data/mirror/ptb").key == "ptb"  # a local copy is the same dataset


# ----------------------------------------------------------------------------- protocols
def test_protocol_presets_count_the_documented_tokens(tmp_path):
    f = tmp_path / "two.txt"
    f.write_text("The first document is short.\n\nThe second one is a little longer than the first.\n")
    ref = DatasetRef(name="textfile", path=str(f))
    data = DataConfig(train=ref, eval=[ref], tokenizer="gpt2", seq_len=8)
    n_tok = sum(len(x) for x in gpt2().encode_batch(hub.textfile_documents(str(f))))
    got = {}
    for preset in ("sedd", "mdlm", "no-specials"):
        ev = EvalConfig(protocol=preset)
        b = load_blocks(ref, "test", data, ev.packing, ev.counting)
        got[preset] = (len(b), int(np.asarray(b.counted).sum()), np.asarray(b.tokens), np.asarray(b.counted))
    assert got["sedd"][1] == n_tok + 2                      # + one EOS per document
    assert got["no-specials"][1] == n_tok                   # EOS is context only
    assert (got["no-specials"][2] == got["sedd"][2]).all()  # same input, different counting
    n_mdlm = got["mdlm"][0]
    assert n_mdlm == -(-n_tok // 6) and got["mdlm"][1] == n_tok + 2 * n_mdlm  # [BOS] 6 tokens [EOS], all counted
    assert got["mdlm"][3][:, 0].all() and (got["mdlm"][2][:, 0] == 50256).all()


def test_presets_keep_old_run_ids_and_reject_contradictions():
    assert "protocol" not in EvalConfig().model_dump()  # no preset: the spec hashes as before
    p = dict(tokenizer="gpt2", seq_len=8, packing="eos_per_doc", counted="x", t_samples=1, t_sampling="iid",
             t_min=0.0, confidence=0.95, max_blocks=None)
    from bench.config import short_hash
    # as before presets and the bound's estimator settings existed: neither is hashed at its default
    assert Protocol(**p).id == short_hash(Protocol(**p).model_dump(exclude={"preset", "bound_steps", "t_proposal"}))[:8]
    assert Protocol(**p, preset="sedd").id != Protocol(**p).id
    with pytest.raises(Exception, match="contradicts protocol mdlm"):
        EvalConfig(protocol="mdlm", packing="eos_per_doc")


def test_small_test_set_gives_one_block(tmp_path):
    """DUO#9: PTB at block 1024 must not become empty — the remainder block is padded."""
    ptb = H.make("ptb", tmp_path)
    ref = DatasetRef(name="ptb", path=str(ptb))
    b = load_blocks(ref, "test", DataConfig(train=ref, eval=[ref], seq_len=1024), "eos_per_doc")
    assert len(b) == 1 and 0 < np.asarray(b.counted).sum() < 1024


# ----------------------------------------------------------------------------- block cache
def test_stream_packing_equals_reference_packing():
    rng = np.random.default_rng(0)
    for trial in range(200):
        docs = [rng.integers(0, 50, rng.integers(0, 12)).astype(np.int32) for _ in range(rng.integers(1, 8))]
        L = int(rng.integers(4, 10))
        packing = ("eos_per_doc", "bos_eos_per_block", "none")[trial % 3]
        cb, ce = bool(rng.integers(2)), bool(rng.integers(2))
        want = pack(docs, L, packing, 60, cb, ce)
        cut = sorted(rng.choice(len(docs) + 1, size=2))
        chunks = [(np.concatenate(docs[a:b]) if b > a else np.zeros(0, np.int32), [len(d) for d in docs[a:b]])
                  for a, b in ((0, cut[0]), (cut[0], cut[1]), (cut[1], len(docs)))]
        got = pack_stream(chunks, sum(map(len, docs)), len(docs), L, packing, 60, np.empty, cb, ce)
        assert (got[0] == want[0]).all() and (got[1] == want[1]).all(), (trial, packing)


def test_concurrent_builders_build_once(tmp_path):
    """Two processes preparing the same split at once: one builds, the other waits for the
    lock and maps the finished cache."""
    env = {**__import__("os").environ, "TDBENCH_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "bench.cli", "data", "prepare", "austen", "--split", "train", "--seq-len", "64"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum("built in" in o for o in outs) == 1 and sum("already cached" in o for o in outs) == 1
    assert len(list((tmp_path / "cache" / "blocks").glob("austen-train-*"))) == 1


def test_parallel_tokenisation_equals_serial(tmp_path, monkeypatch):
    monkeypatch.setenv("TDBENCH_CACHE", str(tmp_path))
    data = DataConfig(train="kjv", eval=["kjv"], seq_len=64)
    a = load_blocks(DatasetRef(name="kjv"), "test", data, "eos_per_doc", num_proc=1)
    a = (np.array(a.tokens), np.array(a.counted))
    for d in (tmp_path / "blocks").glob("kjv-test-*"):
        __import__("shutil").rmtree(d)
    b = load_blocks(DatasetRef(name="kjv"), "test", data, "eos_per_doc", num_proc=2)
    meta = json.loads(next((tmp_path / "blocks").glob("kjv-test-*/meta.json")).read_text())
    assert meta["num_proc"] == 2
    assert (a[0] == np.asarray(b.tokens)).all() and (a[1] == np.asarray(b.counted)).all()


# ----------------------------------------------------------------------------- bad input
def _one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    err = [x for x in err if x.startswith("error:") or "Traceback" in x]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:"), err
    for n in needles:
        assert n in err[0], err[0]


def test_bad_inputs_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TDBENCH_CACHE", str(tmp_path / "cache"))
    _one_line_error(capsys, main(["data", "prepare", "wikitext3"]), "did you mean 'wikitext103'")
    _one_line_error(capsys, main(["data", "prepare", "ptb", "--path", str(tmp_path / "nope")]), "ptb.path", "not found")
    ptb = H.make("ptb", tmp_path)
    (ptb / "penn_treebank" / "test-00000-of-00001.parquet").write_bytes(b"this is not parquet at all")
    _one_line_error(capsys, main(["data", "prepare", "ptb", "--path", str(ptb), "--split", "test"]), str(ptb))
    bad = tmp_path / "lambada_test.jsonl"
    bad.write_text(json.dumps({"passage": "no text field here"}) + "\n")
    _one_line_error(capsys, main(["data", "prepare", "lambada", "--path", str(bad)]), "no 'text' column", str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": unterminated\n')
    _one_line_error(capsys, main(["data", "prepare", "lambada", "--path", str(broken)]), str(broken))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    _one_line_error(capsys, main(["data", "prepare", "textfile", "--path", str(latin)]), "not UTF-8", "offset 3")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    _one_line_error(capsys, main(["data", "prepare", "textfile", "--path", str(empty)]), "no text")
    _one_line_error(capsys, main(["data", "prepare", "lambada", "--path", str(bad), "--split", "train"]),
                    "no 'train' split")
    blocks = tmp_path / "cache" / "blocks"
    assert not blocks.exists() or not [d for d in blocks.iterdir() if d.is_dir()]  # nothing half-written


def test_bad_suite_data_is_one_line(tmp_path, capsys):
    from tests.conftest import tiny_suite
    s = tiny_suite(data={"train": {"name": "austen"}, "eval": [{"name": "wikitext2", "path": str(tmp_path / "x")}],
                         "tokenizer": "gpt2", "seq_len": 32})
    _one_line_error(capsys, main(["run", str(write_suite(tmp_path / "a.yaml", s)), "--out", str(tmp_path / "o")]),
                    "data.eval[0].path", "not found")
    s["data"] = {"train": {"name": "lambada"}, "eval": ["austen"], "tokenizer": "gpt2", "seq_len": 32}
    _one_line_error(capsys, main(["run", str(write_suite(tmp_path / "b.yaml", s)), "--out", str(tmp_path / "o")]),
                    "data.train", "no train split")
    s["data"] = {"train": {"name": "austen"}, "eval": [{"name": "ptb", "paht": "/x"}], "tokenizer": "gpt2"}
    _one_line_error(capsys, main(["run", str(write_suite(tmp_path / "c.yaml", s)), "--out", str(tmp_path / "o")]),
                    "data.eval[0].paht", "unknown key")
    assert not (tmp_path / "o").exists()


def test_malformed_file_is_one_line_on_the_real_stderr(tmp_path):
    """As a user sees it (a subprocess, no pytest log capture): datasets' own error logging
    is silenced; the one line names the file and the root cause."""
    import os
    import re

    ptb = H.make("ptb", tmp_path)
    (ptb / "penn_treebank" / "test-00000-of-00001.parquet").write_bytes(b"this is not parquet at all")
    r = subprocess.run([sys.executable, "-m", "bench.cli", "data", "prepare", "ptb", "--path", str(ptb),
                        "--split", "test"], capture_output=True, text=True,
                       env={**os.environ, "TDBENCH_CACHE": str(tmp_path / "c"), "PYTHONPATH": str(REPO)})
    pieces = [re.sub(r"^.*(examples/s|it/s|doc/s)\]", "", x) for x in re.split(r"[\r\n]", r.stderr)]  # drop bars
    lines = [x for x in pieces if x.strip()]
    assert r.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: ptb.path: {ptb}: ArrowInvalid: ") and "Parquet" in lines[0]
