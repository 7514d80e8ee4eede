"""The latent rows are what their labels say (issue 22, point 3): TEncDM as its reference code
builds it, and what LD4LG and PLANNER do differently said in the label and the record.

TEncDM (github.com/M0RJIQUE/tencdm, initial commit: model/encoder.py, data/make_statistics.py,
model/train_decoder.py, create_config.py):
- the normaliser's mean/std are those of the encodings of EVERY training block with the special
  tokens' positions left out, checked against a computation of our own here, one block at a
  time in float64; a subset (``norm_blocks``) and two ranks' shards give what they should;
- in normalised units, [PAD] positions are exactly 0 and every other special token's positions
  hold its input embedding scaled to norm √d; the other positions are (x − μ)/s;
- the embedding space's statistics are the embedding table's (without [unused…] rows), and its
  specials are not replaced;
- the decoder: 3 layers, trained at t ~ U(0.001, 0.15), and decoding stops at the first [SEP];
- what the frozen-features cache holds is still the encoder's own output (so its key, which
  names the encoder, the space and the blocks, still says everything it depends on).
LD4LG's default row is labelled "LD4LG (BART from scratch)"; PLANNER's "PLANNER (from scratch)",
and its per-token β is the reference's batch-summed β_ref times the batch's counted tokens.

Encoders are tiny random BertModels saved beside the MiniLM WordPiece tokenizer (as
tests/test_encoder_cache.py makes them), so nothing is downloaded.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import specs_of, tiny_suite

from bench.config import BackboneConfig
from bench.data import Blocks
from bench.data.corpora import documents
from bench.data.tokenizers import gpt2
from bench.method import Context
from methods._latent import resolve_model_path
from methods.ld4lg import LD4LG, LD4LGParams
from methods.planner import Planner, PlannerParams, kl_to_standard_normal
from methods.tencdm import TEncDM, TEncDMParams

L, L_ENC = 32, 48     # 32 GPT-2 tokens of Austen are 35–45 WordPieces: every row ends in [PAD]s
BB = BackboneConfig(layers=1, hidden=32, heads=2, cond_dim=16)
# float32 statistics of float64 sums (rounding ~6e-8 relative): 1e-5 is far below what leaving a
# special token's positions in, or reading a subset of the blocks, changes (each > 1e-2, checked)
REL = 1e-5


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> str:
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("enc") / "bert"
    model = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64, pad_token_id=0))
    with torch.no_grad():   # a pretrained BERT's [PAD] row is a vector like any (a new one starts at 0)
        model.embeddings.word_embeddings.weight[0].normal_(std=0.02)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model_path("minilm")[0], local_files_only=True).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def blocks() -> Blocks:
    """40 GPT-2 blocks of Austen; the last third of every 5th block not counted (shorter text)."""
    ids = gpt2().encode_batch(["\n".join(documents("austen", "train")[:20])[:40_000]])[0]
    toks = np.array([ids[i * L:(i + 1) * L] for i in range(40)], dtype=np.int32)
    counted = np.ones_like(toks, dtype=bool)
    counted[::5, -L // 3:] = False
    return Blocks(toks, counted, "austen-reference-test-blocks")


def _tencdm(path: str, **kw) -> TEncDM:
    tok = gpt2()
    return TEncDM(TEncDMParams(encoder=path, enc_len=L_ENC, **kw), BB, tok.vocab_size, L, Context(tokenizer=tok))


def _rows(b: Blocks, rows) -> tuple[torch.Tensor, torch.Tensor]:
    rows = list(rows)
    return torch.as_tensor(b.tokens[rows], dtype=torch.long), torch.as_tensor(b.counted[rows], dtype=torch.bool)


def _ours(m: TEncDM, b: Blocks, rows, specials: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, sqrt(var + eps)) of the encoder outputs of blocks ``rows``, encoded one block at a
    time, two-pass in float64, the positions of the tokenizer's special ids left out (kept with
    ``specials``)."""
    special = torch.tensor(m.enc_tok.all_special_ids)
    kept = []
    with torch.no_grad():
        for i in rows:
            f = m.frozen_features(*_rows(b, [i]))
            keep = torch.ones_like(f["ids"], dtype=torch.bool) if specials else ~torch.isin(f["ids"], special)
            kept.append(f["x"][keep].double())
    x = torch.cat(kept)
    return x.mean(0), (x.var(0, unbiased=False) + m.diffusion.norm.eps).sqrt()


def _count(m: TEncDM, b: Blocks, rows) -> int:
    """The positions of blocks ``rows`` whose encoder token is not a special one."""
    special = torch.tensor(m.enc_tok.all_special_ids)
    with torch.no_grad():
        return sum(int((~torch.isin(m.frozen_features(*_rows(b, [i]))["ids"], special)).sum()) for i in rows)


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return torch.allclose(got.double(), want.double(), rtol=REL, atol=REL * float(want.abs().max()))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-12)).max())


# ----------------------------------------------------------------------------- TEncDM: statistics
def test_tencdm_statistics_are_every_training_block_without_special_positions(bert, blocks):
    m = _tencdm(bert)
    with torch.no_grad():
        note = m.fit_training_set(blocks)
    assert m.diffusion.norm.fitted and "40 training blocks" in note
    mean, std = m.diffusion.norm.stats()
    want_mean, want_std = _ours(m, blocks, range(40))
    assert _close(mean, want_mean) and _close(std, want_std), (_rel(mean, want_mean), _rel(std, want_std))
    # the check can fail: with the specials' positions kept, or from the first 16 blocks only
    # (a batch), the statistics are another matter
    with_specials = _ours(m, blocks, range(40), specials=True)
    first_batch = _ours(m, blocks, range(16))
    assert min(_rel(with_specials[1], want_std), _rel(first_batch[1], want_std)) > 1e-2
    assert int(m.diffusion.norm.count) == _count(m, blocks, range(40)) == m.info()["normaliser"]["vectors"]


def test_tencdm_statistics_of_a_subset_are_evenly_spaced_blocks(bert, blocks):
    """``norm_blocks: 8`` of 40: blocks 0, 5, …, 35 (a packed corpus's first blocks would be one
    stretch of it)."""
    m = _tencdm(bert, norm_blocks=8)
    with torch.no_grad():
        m.fit_training_set(blocks)
    mean, std = m.diffusion.norm.stats()
    want_mean, want_std = _ours(m, blocks, range(0, 40, 5))
    assert _close(mean, want_mean) and _close(std, want_std)
    assert _rel(std, _ours(m, blocks, range(8))[1]) > 1e-2   # not the first 8
    assert m.training_set_encodes(40) == 8 and _tencdm(bert).training_set_encodes(40) == 40


def test_tencdm_statistics_sharded_over_two_ranks_sum_to_the_whole(bert, blocks, monkeypatch):
    """Under torch.distributed (two ranks, stood in for here) each rank reads every other block
    and all-reduces its float64 sums: the two ranks' sums add up to one process's (1e-12
    relative: float64 sums in another order), rank r having read blocks r, r + 2, …"""
    import torch.distributed as dist

    whole = _tencdm(bert)
    with torch.no_grad():
        whole.fit_training_set(blocks)
    shares = []
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    for rank in (0, 1):
        monkeypatch.setattr(dist, "get_rank", lambda r=rank: r)
        seen = []
        monkeypatch.setattr(dist, "all_reduce", lambda buf: seen.append(buf.clone()))   # this rank's share
        m = _tencdm(bert)
        with torch.no_grad():
            m.fit_training_set(blocks)
        shares.append(seen)
    assert all(len(s) == 3 for s in shares)   # sum, sum of squares, count
    norm = whole.diffusion.norm
    for i, buf in enumerate((norm.sum, norm.sumsq, norm.count)):
        assert torch.allclose(shares[0][i] + shares[1][i], buf, rtol=1e-12, atol=0), i
    assert [int(share[2]) for share in shares] == [_count(whole, blocks, range(r, 40, 2)) for r in (0, 1)]


# ----------------------------------------------------------------------------- TEncDM: what is diffused
def test_tencdm_pads_are_zero_and_specials_fixed_normalised_embeddings(bert, blocks):
    """x̄ in normalised units: [PAD] positions 0.0 exactly; [CLS] and [SEP] positions
    e_s·√d/‖e_s‖ (e_s the encoder's input embedding of s, so ‖x̄‖ = √d there; float32: 1e-6);
    every other position (x − μ)/s with this module's own μ, s."""
    m = _tencdm(bert)
    with torch.no_grad():
        m.fit_training_set(blocks)
        x0, c = _rows(blocks, range(10))
        ids, xbar = m.encode(x0, c)
        raw = m.frozen_features(x0, c)["x"]
    tok, E, d = m.enc_tok, m.encoder.get_input_embeddings().weight.detach(), raw.shape[-1]
    pad, cls, sep = (ids == tok.pad_token_id), (ids == tok.cls_token_id), (ids == tok.sep_token_id)
    assert pad.any() and int(cls.sum()) == 10 and int(sep.sum()) == 10   # every row: [CLS] … [SEP] [PAD]…
    assert bool((xbar[pad] == 0).all()) and bool((raw[pad] != 0).any()) and float(E[tok.pad_token_id].norm()) > 0
    for mask, s in ((cls, tok.cls_token_id), (sep, tok.sep_token_id)):
        want = E[s] * math.sqrt(d) / E[s].norm()
        assert torch.allclose(xbar[mask], want.expand_as(xbar[mask]), rtol=1e-6, atol=1e-6), s
        assert math.isclose(float(xbar[mask][0].norm()), math.sqrt(d), rel_tol=1e-5)
    mean, std = _ours(m, blocks, range(40))
    plain = ~(pad | cls | sep)
    assert torch.allclose(xbar[plain].double(), (raw[plain].double() - mean) / std, rtol=1e-4, atol=1e-4)


def test_tencdm_cache_holds_the_encoder_output_not_the_normalised_vectors(bert, blocks):
    """frozen_features (what the cache stores, keyed by encoder, space, enc_len and blocks) is
    the encoder's last hidden state itself, [PAD] positions included, the same before and after
    the statistics are fitted: the fixed vectors and the statistics come after it."""
    m = _tencdm(bert)
    x0, c = _rows(blocks, range(6))
    with torch.no_grad():
        before = m.frozen_features(x0, c)
        key = m.frozen_features_key()
        m.fit_training_set(blocks)
        after = m.frozen_features(x0, c)
        own = m.encoder(input_ids=before["ids"], attention_mask=(before["ids"] != m.enc_tok.pad_token_id).long())
    assert torch.equal(before["x"], after["x"]) and torch.equal(before["ids"], after["ids"])
    assert torch.allclose(before["x"], own.last_hidden_state, rtol=1e-6, atol=1e-6)
    assert m.frozen_features_key() == key


def test_tencdm_embedding_space_statistics_are_the_tables_without_unused_rows(bert, blocks):
    """The embedding space (TEncDM's emb runs): μ, s² of the input embedding table's rows
    without BERT's [unused…] placeholders, known at construction; no special token replaced
    ([CLS] positions are (e_CLS − μ)/s like any token)."""
    m = _tencdm(bert, space="embedding")
    assert m.diffusion.norm.fitted and m.training_set_encodes(40) == 0
    E = m.encoder.get_input_embeddings().weight.detach().double()
    unused = [i for t, i in m.enc_tok.get_vocab().items() if t.startswith("[unused")]
    assert 900 < len(unused) < 1000                       # MiniLM's WordPiece vocabulary has 994
    rows = torch.ones(E.shape[0], dtype=torch.bool)
    rows[unused] = False
    mean, std = E[rows].mean(0), (E[rows].var(0, unbiased=False) + m.diffusion.norm.eps).sqrt()
    got_mean, got_std = m.diffusion.norm.stats()
    assert _close(got_mean, mean) and _close(got_std, std)
    with torch.no_grad():
        ids, xbar = m.encode(*_rows(blocks, range(3)))
    cls = ids == m.enc_tok.cls_token_id
    want = ((E[m.enc_tok.cls_token_id] - mean) / std).float()
    assert torch.allclose(xbar[cls], want.expand_as(xbar[cls]), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- TEncDM: decoder
def test_tencdm_defaults_are_the_reference_decoder(bert):
    """TEncDM's create_config (initial commit): decoder.num_hidden_layers = 3, decoder.eps =
    0.001, decoder.T = 0.15 (the decoder's training t ~ U(eps, T)); statistics from every
    training block. The default label names nothing more than the encoder; a setting that
    leaves the reference is in the label and in ``method_info``."""
    p = TEncDMParams()
    assert (p.decoder_layers, p.decoder_t_min, p.decoder_t_max, p.norm_blocks) == (3, 0.001, 0.15, None)
    m = _tencdm(bert)
    assert len(m.decoder.blocks) == 3 and len(m.net.blocks) == BB.layers
    assert TEncDM.default_label(p) == "TEncDM MiniLM"
    assert m.info()["reference"]["params"] == {}
    ours = TEncDMParams(decoder_t_max=0.05, decoder_layers=2)
    assert TEncDM.default_label(ours) == "TEncDM MiniLM (decoder_layers=2, decoder_t_max=0.05)"
    assert _tencdm(bert, decoder_t_max=0.05).info()["reference"]["params"] == {
        "decoder_t_max": {"here": 0.05, "reference": 0.15}}


def test_tencdm_decoding_stops_at_the_first_sep(bert):
    """TEncDM's generate_text_batch: each row is cut before its first [SEP] (or EOS), whatever
    follows, then decoded without specials."""
    m = _tencdm(bert)
    tok = m.enc_tok
    words = tok.convert_tokens_to_ids(["emma", "was", "handsome", "clever"])
    row = [tok.cls_token_id, words[0], words[1], tok.sep_token_id, words[2], tok.pad_token_id, words[3]]
    assert tok.unk_token_id not in words and m.to_text(torch.tensor([row])) == ["emma was"]


# ----------------------------------------------------------------------------- LD4LG, PLANNER
def test_ld4lg_row_says_its_bart_is_trained_from_scratch(tmp_path):
    """The default LD4LG (lm: null) is labelled so in the suite's rows, and its record lists
    how it differs from the reference recipe (a frozen pretrained BART, 32 × 64 latents)."""
    specs = specs_of(tiny_suite(methods=[{"method": "ld4lg"}, {"method": "planner"}], baseline=None), tmp_path)
    assert [s.label for s in specs] == ["LD4LG (BART from scratch)", "PLANNER (from scratch)"]
    assert LD4LG.default_label(LD4LGParams(lm="facebook/bart-base")) == "LD4LG"
    assert LD4LG.default_label(LD4LGParams(lm="facebook/bart-base", freeze_lm=False)) == "LD4LG (LM fine-tuned)"
    tok = gpt2()
    ref = LD4LG(LD4LGParams(), BB, tok.vocab_size, L, Context(tokenizer=tok)).info()["reference"]
    assert {k: v["reference"] for k, v in ref["params"].items()}.items() >= {
        "lm": "facebook/bart-base", "frozen": True, "latents": 32, "latent_dim": 64}.items()
    assert ref["params"]["lm"]["here"] is None and ref["params"]["latents"]["here"] == 16


def test_planner_beta_is_the_references_batch_summed_beta_times_counted_tokens():
    """The reference's loss is mean CE over the batch's N counted tokens + β_ref·Σ_batch KL; ours
    (Σ CE + β·Σ_batch KL)/N. With β = β_ref·N and the same weights and noise they are equal
    (float32: 1e-5), for two batches of different N; the record says so."""
    torch.manual_seed(0)
    V = 16
    m = Planner(PlannerParams(latents=4, latent_dim=8), BB, V, 8)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.3)
    beta_ref = 3e-3
    for B, uncounted in ((6, 2), (3, 5)):
        w = torch.randint(0, V, (B, 8), generator=torch.Generator().manual_seed(B))
        counted = torch.ones_like(w, dtype=torch.bool)
        counted[:, 8 - uncounted:] = False
        N = int(counted.sum())
        m.p = m.p.model_copy(update={"beta": beta_ref * N})
        torch.manual_seed(1)
        ours = float(m.autoencoder_loss(w, counted).detach())
        torch.manual_seed(1)
        with torch.no_grad():
            mu, logvar = m.posterior(w)
            z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
            ce = torch.nn.functional.cross_entropy(m.decoder_logits(z, w).float().flatten(0, 1), w.flatten(),
                                                   reduction="none").view(w.shape)
            reference = float(ce[counted].mean() + beta_ref * kl_to_standard_normal(mu, logvar).sum())
        assert math.isclose(ours, reference, rel_tol=1e-5), (B, ours, reference)
    info = m.info()
    assert "β/N" in info["beta_per"] and info["reference"]["params"]["latent_dim"] == {"here": 8, "reference": 1024}


# ----------------------------------------------------------------------------- through the harness
@pytest.mark.slow
def test_a_resumed_tencdm_run_keeps_its_statistics_and_does_not_refit(bert, tmp_path):
    """The harness fits the statistics once, before the first stage of a fresh run; a run
    killed in its diffusion stage and resumed takes them from its checkpoint (no second pass in
    its log) and ends with the normaliser an uninterrupted run has. ~1 min on the shared 2-core
    machine."""
    import json

    from conftest import run_killed_at
    from safetensors.torch import load_file

    from bench.runner import execute

    suite = tiny_suite(methods=[{"method": "tencdm", "encoder": bert, "enc_len": L_ENC}], baseline=None,
                       train={"steps": 4, "batch_size": 4, "lr": 3e-3, "warmup": 1, "ckpt_every": 2,
                              "stages": {"decoder": {"steps": 2}, "diffusion": {"steps": 4}}},
                       eval={"t_samples": 1, "max_blocks": 4, "batch_size": 4})
    spec = json.dumps(specs_of(suite, tmp_path)[0].model_dump(mode="json"))
    runs = {}
    for name in ("straight", "resumed"):
        rd = tmp_path / name
        if name == "resumed":
            run_killed_at(spec, rd, 2, stage="2-diffusion")
        assert execute(json.loads(spec), rd, 1) == "complete"
        last = sorted((rd / "ckpt" / "2-diffusion").glob("step_*"))[-1]
        runs[name] = (load_file(last / "model.safetensors"), (rd / "log.txt").read_text())
    for k in ("diffusion.norm.sum", "diffusion.norm.sumsq", "diffusion.norm.count", "diffusion.norm.seen"):
        assert torch.equal(runs["straight"][0][k], runs["resumed"][0][k]), k
    assert [log.count("normaliser: mean/std of") for _, log in runs.values()] == [1, 1]
    assert "resuming stage diffusion" in runs["resumed"][1]
