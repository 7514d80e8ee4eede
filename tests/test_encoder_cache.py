"""The frozen-features cache (bench/data/frozencache.py, Method.features): a frozen encoder's
outputs of every training block computed once, memory-mapped, and read back instead of
recomputed.

Tolerance. The cache stores what the method's ``frozen_features`` returned (fp32 stays fp32),
so a cached row differs from a recomputed one only if the encoder's arithmetic for a block
depends on the other blocks of its batch (the cache is built in batches of 16 in another composition, training
encodes batches of 8). On CPU it does not (one thread or two, the rows are bit-identical here);
a BLAS that blocks its GEMMs by batch size would leave a few ulps (~1e-7 relative), so every
comparison allows rel 1e-6 — two orders below what storing fp16 changes (~1e-4..1e-3).

Encoders are tiny random BertModels saved with save_pretrained beside the MiniLM WordPiece
tokenizer (as tests/test_encoder_latent.py makes them), so nothing is downloaded.
"""
from __future__ import annotations

import fcntl
import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import complete_record, specs_of, tiny_suite

from bench.config import BackboneConfig
from bench.data import Blocks
from bench.data import frozencache as fc
from bench.data.corpora import documents
from bench.data.tokenizers import gpt2
from bench.errors import UserError
from bench.method import Context, Method
from bench.registry import all_methods
from bench.runner import execute
from methods._latent import resolve_model_path
from methods.ld4lg import LD4LG, LD4LGParams
from methods.tencdm import TEncDM, TEncDMParams

L = 32
BB = BackboneConfig(layers=1, hidden=32, heads=2, cond_dim=16)
REL = 1e-6   # see the module docstring


# ----------------------------------------------------------------------------- fixtures
def _save_with_minilm_tokenizer(model, path: Path) -> str:
    from transformers import AutoTokenizer

    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model_path("minilm")[0], local_files_only=True).save_pretrained(path)
    return str(path)


def _bert(path: Path, seed: int = 0) -> str:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return _save_with_minilm_tokenizer(BertModel(BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0)), path)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> str:
    return _bert(tmp_path_factory.mktemp("enc") / "bert")


@pytest.fixture(scope="module")
def blocks() -> Blocks:
    """40 GPT-2 blocks of Austen; a few positions not counted (block_texts drops them)."""
    ids = gpt2().encode_batch(["\n".join(documents("austen", "train")[:20])[:40_000]])[0]
    toks = np.array([ids[i * L:(i + 1) * L] for i in range(40)], dtype=np.int32)
    counted = np.ones_like(toks, dtype=bool)
    counted[::7, -3:] = False
    return Blocks(toks, counted, "austen-test-blocks")


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TDBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(fc.ENV_GB, raising=False)
    monkeypatch.setattr(fc, "CHUNK", 16)   # 40 blocks: chunks of 16, 16, 8
    return tmp_path / "cache"


def _tencdm(path: str, space: str = "encoder", **kw) -> TEncDM:
    tok = gpt2()
    return TEncDM(TEncDMParams(encoder=path, space=space, **kw), BB, tok.vocab_size, L, Context(tokenizer=tok))


def _batch(b: Blocks, rows) -> tuple[torch.Tensor, torch.Tensor]:
    rows = list(rows)
    return (torch.as_tensor(b.tokens[rows], dtype=torch.long), torch.as_tensor(b.counted[rows], dtype=torch.bool))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=REL, atol=0)


def _attach(m, b: Blocks, log=None):
    return fc.attach(m, b, torch.device("cpu"), log=log or (lambda s: None))


# ----------------------------------------------------------------------------- a whole run
def _text_file(tmp_path: Path) -> Path:
    """~100 GPT-2 blocks of 32: a run of 10 steps × 8 encodes over half of them, so it builds."""
    p = tmp_path / "austen.txt"
    p.write_text("\n\n".join(documents("austen", "train")[:3])[:14_000])
    return p


def _run_spec(tmp_path: Path, encoder: str):
    text = {"name": "textfile", "path": str(_text_file(tmp_path))}
    suite = tiny_suite(
        data={"train": text, "eval": [text], "tokenizer": {"name": "gpt2"}, "seq_len": L},
        methods=[{"method": "tencdm", "variant": "encoder", "encoder": encoder}], baseline=None,
        train={"steps": 6, "batch_size": 8, "lr": 3e-3, "warmup": 2, "ckpt_every": 100,
               "stages": {"decoder": {"steps": 4}, "diffusion": {"steps": 6}}},
        eval={"t_samples": 2, "max_blocks": 8, "batch_size": 8, "samples": 4, "sample_steps": [2, 4]})
    return specs_of(suite, tmp_path)[0]


def _stage_losses(rd: Path) -> dict[str, list[float]]:
    return {d.name: json.loads((sorted(d.glob("step_*"))[-1] / "state.json").read_text())["losses"]
            for d in sorted((rd / "ckpt").iterdir())}


def _weights(rd: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(sorted((rd / "ckpt" / "2-diffusion").glob("step_*"))[-1] / "model.safetensors")


def test_a_run_reading_the_cache_trains_and_samples_as_a_run_that_recomputes(tmp_path, cache_root, monkeypatch,
                                                                               encoder):
    spec = _run_spec(tmp_path, encoder)
    runs = {}
    for mode in ("recompute", "cache"):
        if mode == "recompute":
            monkeypatch.setenv(fc.ENV_GB, "0")
        else:
            monkeypatch.delenv(fc.ENV_GB)
        rd = tmp_path / mode / spec.run_id
        assert execute(spec.model_dump(mode="json"), rd, 1) == "complete"
        runs[mode] = (rd, complete_record(rd))
    (off, rec_off), (on, rec_on) = runs["recompute"], runs["cache"]
    assert "frozen_features" not in rec_off["train"]
    assert "cache off" in (off / "log.txt").read_text()
    # every batch of the statistics pass over the training blocks (16 blocks each) and every training
    # batch (4 decoder + 6 diffusion steps, one micro-batch each) read from the cache
    ff = rec_on["train"]["frozen_features"]
    assert (ff["hits"], ff["misses"]) == (math.ceil(ff["blocks"] / 16) + 10, 0), ff
    assert Path(ff["cache"]).parent == cache_root / "features"
    assert all("normaliser: mean/std of" in (rd / "log.txt").read_text() for rd in (off, on))
    # the same trajectory: every step's loss of both stages, the trained weights, the samples
    la, lb = _stage_losses(off), _stage_losses(on)
    assert list(la) == ["1-decoder", "2-diffusion"] and [len(v) for v in la.values()] == [4, 6]
    for stage in la:
        assert all(math.isclose(a, b, rel_tol=REL, abs_tol=0) for a, b in zip(la[stage], lb[stage])), stage
    wa, wb = _weights(off), _weights(on)
    assert wa.keys() == wb.keys() and all(_close(wa[k], wb[k]) for k in wa)
    for k in ("final_loss",):
        assert all(math.isclose(rec_off["train"]["stages"][s][k], rec_on["train"]["stages"][s][k], rel_tol=REL)
                   for s in ("decoder", "diffusion"))
    sa, sb = ([json.loads(x) for x in (rd / "samples.jsonl").read_text().splitlines()] for rd in (off, on))
    assert len(sa) == 8 and [(r["ids"], r["steps"]) for r in sa] == [(r["ids"], r["steps"]) for r in sb]
    assert [m["value"] for m in rec_off["metrics"]] == [m["value"] for m in rec_on["metrics"]]


# ----------------------------------------------------------------------------- reading
def test_cached_rows_are_the_computed_rows_in_any_batch_order_and_unknown_blocks_are_computed(
        cache_root, encoder, blocks):
    m = _tencdm(encoder)
    cache = _attach(m, blocks)
    assert cache is not None and len(cache.chunks) == 3
    rng = np.random.default_rng(0)
    for rows in (rng.permutation(40)[:8], [39, 0, 16, 15, 17, 31, 32, 8], [5]):
        x0, c = _batch(blocks, rows)
        want = m.frozen_features(x0, c)
        got = cache.lookup(x0, c)
        assert got is not None and got.keys() == want.keys() and all(_close(got[k], want[k]) for k in want)
    assert cache.hits == 3 and cache.misses == 0
    # one block the cache does not hold (another count mask): the whole batch is computed
    x0, c = _batch(blocks, [1, 2, 3])
    c[1, :4] = False
    assert cache.lookup(x0, c) is None and cache.misses == 1
    got, want = m.features(x0, c), m.frozen_features(x0, c)
    assert all(_close(got[k], want[k]) for k in want)
    # the stage losses read through the cache are the recomputed ones
    m.fit_training_set(blocks)
    x0, c = _batch(blocks, range(8, 16))
    u = torch.rand(8, generator=torch.Generator().manual_seed(1))
    losses = []
    for use in (cache, None):
        m.use_frozen_cache(use)
        for stage in ("decoder", "diffusion"):
            torch.manual_seed(3)
            losses.append(float(m.stage_loss(stage, x0, c, u).detach()))
    assert all(math.isclose(a, b, rel_tol=REL) for a, b in zip(losses[:2], losses[2:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_rows_travel_to_disk_and_back_with_their_dtype_and_bits(dtype):
    t = (torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)) * 50).to(dtype)
    back = fc.from_numpy(np.array(fc.to_numpy(t)), str(t.dtype))
    assert back.dtype == dtype and torch.equal(back, t)


def test_row_digest_sees_tokens_and_count_mask(blocks):
    x, c = blocks.tokens[:2].copy(), blocks.counted[:2].copy()
    d = fc.row_digests(x, c)
    x[1, 5] += 1
    c[0, 0] = False
    d2 = fc.row_digests(x, c)
    assert d[0] != d2[0] and d[1] != d2[1] and len(set(fc.row_digests(blocks.tokens, blocks.counted))) == 40


# ----------------------------------------------------------------------------- damage
def _flip_byte(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[-5] ^= 0x40   # in the data, past the .npy header
    p.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["flipped byte", "truncated file", "no meta.json", "foreign meta.json"])
def test_a_damaged_chunk_is_detected_and_rebuilt_never_read(cache_root, encoder, blocks, capfd, damage):
    m = _tencdm(encoder)
    cache = _attach(m, blocks)
    chunk = cache.path / "c00001"
    x = chunk / "x.npy"
    if damage == "flipped byte":
        _flip_byte(x)
    elif damage == "truncated file":
        x.write_bytes(x.read_bytes()[:-1000])
    elif damage == "no meta.json":   # a torn chunk: files without the record of what they hold
        (chunk / "meta.json").unlink()
    else:
        (chunk / "meta.json").write_text(json.dumps({"fields": {"x": {"bytes": x.stat().st_size,
                                                                       "sha256": "0" * 64}}}))
    assert fc.open_chunk(chunk, 16)[0] is None
    capfd.readouterr()
    again = _attach(_tencdm(encoder), blocks)
    assert f"{chunk}: damaged frozen-features chunk" in capfd.readouterr().err
    assert fc.open_chunk(chunk, 16)[0] is not None
    x0, c = _batch(blocks, range(16, 32))   # exactly the rebuilt chunk
    got, want = again.lookup(x0, c), m.frozen_features(x0, c)
    assert got is not None and all(_close(got[k], want[k]) for k in want)
    assert not [p for p in cache.path.iterdir() if ".tmp" in p.name]


def test_a_missing_chunk_is_built_without_a_warning(cache_root, encoder, blocks, capfd):
    import shutil

    cache = _attach(_tencdm(encoder), blocks)
    shutil.rmtree(cache.path / "c00002")
    capfd.readouterr()
    logs = []
    _attach(_tencdm(encoder), blocks, logs.append)
    assert "damaged" not in capfd.readouterr().err and "built 1 of 3 chunks" in logs[-1]


# ----------------------------------------------------------------------------- the key
def test_key_changes_with_the_encoder_sha256_and_the_blocks_and_nothing_else(tmp_path, cache_root, encoder, blocks):
    cpu = torch.device("cpu")
    m = _tencdm(encoder)
    key = fc.cache_key(m, blocks, cpu, "no")
    x0, c = _batch(blocks, range(4))
    m.frozen_features(x0, c)   # a tokenizer call leaves padding/truncation set on it: not part of the key
    assert fc.cache_key(m, blocks, cpu, "no") == key == fc.cache_key(_tencdm(encoder), blocks, cpu, "no")
    json.dumps(key)

    from transformers import BertModel
    changed = BertModel.from_pretrained(encoder)
    with torch.no_grad():
        changed.encoder.layer[0].output.dense.bias[0] += 1e-3
    other = _save_with_minilm_tokenizer(changed, tmp_path / "changed")
    m2 = _tencdm(other)
    assert m2.frozen_info()["encoder"]["sha256"] != m.frozen_info()["encoder"]["sha256"]
    k2 = fc.cache_key(m2, blocks, cpu, "no")
    assert k2["frozen"] != key["frozen"] and fc.cache_path(k2) != fc.cache_path(key)

    one_token = Blocks(blocks.tokens.copy(), blocks.counted, blocks.source)
    one_token.tokens[7, 3] += 1
    other_cache = Blocks(blocks.tokens, blocks.counted, "another-block-cache")
    for b in (one_token, other_cache, blocks.head(39)):
        assert fc.cache_path(fc.cache_key(m, b, cpu, "no")) != fc.cache_path(key)
    assert fc.cache_path(fc.cache_key(m, blocks, cpu, "bf16")) != fc.cache_path(key)


def test_size_limit_and_switch(cache_root, encoder, blocks, monkeypatch):
    logs = []
    monkeypatch.setenv(fc.ENV_GB, "0")
    assert _attach(_tencdm(encoder), blocks, logs.append) is None and "cache off" in logs[-1]
    monkeypatch.setenv(fc.ENV_GB, str(39 * 32 * 32 * 4 / 2 ** 30))   # under 40 blocks of x alone
    assert _attach(_tencdm(encoder), blocks, logs.append) is None and "would take" in logs[-1]
    monkeypatch.setenv(fc.ENV_GB, "lots")
    with pytest.raises(UserError, match=f"^{fc.ENV_GB}: 'lots' is not a number"):
        _attach(_tencdm(encoder), blocks)
    monkeypatch.delenv(fc.ENV_GB)
    # the run's encodings: its training steps' plus its statistics pass (here 1 block of the 40)
    m = _tencdm(encoder, norm_blocks=1)
    assert fc.attach(m, blocks, torch.device("cpu"), log=logs.append, encodes=18) is None
    assert "under half" in logs[-1] and not (cache_root / "features").exists()
    assert fc.attach(m, blocks, torch.device("cpu"), log=logs.append, encodes=19) is not None
    assert fc.attach(m, blocks, torch.device("cpu"), log=logs.append, encodes=1) is not None   # complete: read
    assert "mapped 3 chunks" in logs[-1]


def test_a_statistics_pass_over_every_block_counts_toward_building(cache_root, encoder, blocks):
    """TEncDM's default statistics read all 40 blocks' encodings: a run that trains on none
    of them still encodes every block once, so the cache is built (it costs that pass, no more)."""
    logs = []
    assert _tencdm(encoder).training_set_encodes(len(blocks)) == len(blocks)
    assert fc.attach(_tencdm(encoder), blocks, torch.device("cpu"), log=logs.append, encodes=0) is not None
    assert "built 3 of 3 chunks" in logs[-1]


# ----------------------------------------------------------------------------- two builders
def test_a_chunk_another_process_builds_is_waited_for_not_built_twice(cache_root, encoder, blocks):
    """This thread holds chunk 0's lock (another builder at work): the builder under test builds
    chunks 1 and 2, waits on chunk 0, then maps the one built here — it builds none twice."""
    m = _tencdm(encoder)
    key = fc.cache_key(m, blocks, torch.device("cpu"), "no")
    path = fc.cache_path(key)
    path.mkdir(parents=True)
    compute = torch.no_grad()(m.frozen_features)
    out = {}
    with open(path / ".c00000.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        worker = threading.Thread(target=lambda: out.update(r=fc.open_or_build(path, blocks, compute, "cpu")))
        worker.start()
        deadline = time.monotonic() + 30
        while not all((path / f"c{c:05d}").is_dir() for c in (1, 2)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all((path / f"c{c:05d}").is_dir() for c in (1, 2)), "chunks 1 and 2 not built past the held lock"
        time.sleep(0.2)
        assert worker.is_alive() and not (path / "c00000").exists()   # waiting on chunk 0, not building it
        fc.build_chunk(path / "c00000", range(0, 16), blocks, compute, "cpu")
        mine = (path / "c00000" / "meta.json").stat().st_ino
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    worker.join(60)
    chunks, built = out["r"]
    assert built == 2 and (path / "c00000" / "meta.json").stat().st_ino == mine
    x0, c = _batch(blocks, range(16))
    assert _close(torch.from_numpy(np.array(chunks[0]["x"])), m.frozen_features(x0, c)["x"])


# ----------------------------------------------------------------------------- where it applies
def test_what_is_cached_embedding_space_and_trained_lms_are_not(cache_root, encoder, blocks):
    assert _tencdm(encoder, "embedding").frozen_features_key() is None
    assert _attach(_tencdm(encoder, "embedding"), blocks) is None
    tok = gpt2()
    trained_here = LD4LG(LD4LGParams(), BB, tok.vocab_size, L, Context(tokenizer=tok))
    assert trained_here.frozen_features_key() is None and _attach(trained_here, blocks) is None


def test_frozen_ld4lg_reads_its_lm_states_from_the_cache_with_the_same_losses(tmp_path, cache_root, blocks):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    lm = _save_with_minilm_tokenizer(BartForConditionalGeneration(BartConfig(
        vocab_size=30522, pad_token_id=0, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        bos_token_id=101, eos_token_id=102, decoder_start_token_id=102, forced_bos_token_id=None,
        forced_eos_token_id=None)), tmp_path / "bart")
    tok = gpt2()
    m = LD4LG(LD4LGParams(lm=lm, latents=4, latent_dim=8), BB, tok.vocab_size, L, Context(tokenizer=tok))
    cache = _attach(m, blocks)
    assert cache is not None and set(cache.dtypes) == {"ids", "mask", "H"}
    x0, c = _batch(blocks, [3, 30, 12, 21])
    u = torch.rand(4, generator=torch.Generator().manual_seed(2))
    losses = []
    for stage in ("autoencoder", "diffusion"):
        torch.manual_seed(5)
        losses.append(float(m.stage_loss(stage, x0, c, u).detach()))
    # the reference: the LM run on the batch's own LM inputs (teacher forcing over non-padding ids)
    ids, mask, labels = m.lm_inputs(x0, c)
    assert (labels == -100).any() and (labels[mask.bool()] == ids[mask.bool()]).all()
    with torch.no_grad():
        logits = m.lm(encoder_outputs=m.states(m.latents_of(ids, mask)), labels=labels).logits.float()
        ref = [float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100))]
        torch.manual_seed(5)
        ref.append(float(m.diffusion.loss(m.net, m.latents_of(ids, mask), u)))
    assert cache.hits == 2 and all(math.isclose(a, b, rel_tol=REL) for a, b in zip(losses, ref)), (losses, ref)


def _declaring() -> list[tuple[str, str | None]]:
    """Every registered method (and variant) that overrides frozen_features_key."""
    return [(n, v) for n, cls in all_methods().items() if cls.frozen_features_key is not Method.frozen_features_key
            for v in [None, *cls.variants]]


@pytest.mark.parametrize("name,variant", _declaring())
def test_declared_frozen_features_are_per_block_and_keyed_stably(name, variant, tmp_path):
    """The cache's premise, for every method that declares frozen features: row i of a batch's
    features is the features of block i alone, and the key is JSON and unchanged by a call."""
    cls = all_methods()[name]
    params = {**cls.example_params(tmp_path), **(cls.variants[variant] if variant else {})}
    tok = gpt2()
    m = cls(cls.Params(**params), BackboneConfig(layers=1, hidden=32, heads=2, cond_dim=16), tok.vocab_size, 12,
            context=Context(tokenizer=tok))
    key = m.frozen_features_key()
    if key is None:   # (this variant caches nothing: e.g. LD4LG's example trains its LM)
        return
    ids = tok.encode_batch(["It is a truth universally acknowledged, that a single man in possession of a good "
                            "fortune, must be in want of a wife. However little known the feelings or views"])[0]
    x0 = torch.tensor([ids[:12], ids[12:24], ids[6:18]])
    c = torch.ones_like(x0, dtype=torch.bool)
    c[2, 9:] = False
    with torch.no_grad():
        batch = m.frozen_features(x0, c)
        alone = [m.frozen_features(x0[i:i + 1], c[i:i + 1]) for i in range(3)]
    assert json.loads(json.dumps(key)) == key and m.frozen_features_key() == key
    for k, v in batch.items():
        assert k.isidentifier() and all(_close(v[i:i + 1], alone[i][k]) for i in range(3)), k
