"""The latent-space family's math against closed forms, without training (methods/_latent.py,
planner.py, ld4lg.py): fast enough to guard every mutant of those modules
(tests/mutation/run.py); tests/test_encoder_latent.py trains the same code end to end.

- LatentDiffusion with the Bayes denoiser of standard-normal data. After the normaliser,
  x̄ ~ N(0, I) per dimension, z_t = α_t x̄ + σ_t ε (α² + σ² = 1), so E[x̄ | z_t] = α z_t,
  E[ε | z_t] = σ z_t and E[v | z_t] = 0 (v = α ε − σ x̄): each parameterisation's optimal output,
  all with x̂0 = α z_t. Its simple loss has a closed-form expectation given x̄, and its DDIM
  chain is an exact linear map of z_1; DDPM's output variance follows an exact recursion.
- PLANNER: the loss is reconstruction + β·KL(q_φ(z | w) ‖ N(0, I)), the latent fed to the
  decoder is a draw from q_φ(z | w), the decoder is causal in w and reads the latent.
- PLANNER and LD4LG: an uncounted token contributes nothing to the autoencoder's loss.
"""
from __future__ import annotations

import math

import pytest
import torch

from bench.config import BackboneConfig
from bench.method import Context
from methods._gaussian import bcast
from methods._latent import LatentDiffusion, LatentDiffusionParams
from methods.ld4lg import LD4LG, LD4LGParams
from methods.planner import Planner, PlannerParams

BB = BackboneConfig(layers=1, hidden=32, heads=2, cond_dim=16)
V, L = 16, 8


class NumberTokenizer:
    """A suite tokenizer stand-in with an EOS (what LD4LG's constructor asks of its context)."""

    vocab_size, eos_id = V, 0


def bayes_net(diff: LatentDiffusion):
    """The optimal output for x̄ ~ N(0, I) in ``diff``'s parameterisation (module docstring)."""
    def net(t, embeds, self_cond=None):
        a, s = (bcast(v, embeds) for v in diff.schedule.alpha_sigma(t))
        return {"x0": a * embeds, "eps": s * embeds, "v": 0 * embeds}[diff.p.parameterisation]
    return net


def fitted(parameterisation, sampler="ddim", seed=0):
    """A LatentDiffusion whose normaliser has seen one batch of x = 3 + 2·N(0, 1) (B=64, n=8, d=6)."""
    diff = LatentDiffusion(6, LatentDiffusionParams(parameterisation=parameterisation, sampler=sampler), 1)
    x = 3 + 2 * torch.randn(64, 8, 6, generator=torch.Generator().manual_seed(seed))
    diff.norm.observe(x)
    return diff, x


@pytest.mark.parametrize("parameterisation", ["x0", "eps", "v"])
def test_simple_loss_of_the_bayes_denoiser_is_its_mmse(parameterisation):
    """With the optimal output the error is a·ε + b (x0: a = −ασ, b = σ²x̄; ε: a = α², b = −ασx̄;
    v: a = α, b = −σx̄), so given x̄ the loss (a mean over 3072 elements, one t per row) has
    expectation mean(a² + b²) and variance Σ(2a⁴ + 4a²b²)/n²: it must agree to 5 s.e."""
    diff, x = fitted(parameterisation)
    t = torch.linspace(0.02, 0.98, 64)
    torch.manual_seed(1)
    loss = float(diff.loss(bayes_net(diff), x, t))
    xbar = diff.norm(x).double()
    a_, s_ = (bcast(v.double(), xbar) for v in diff.schedule.alpha_sigma(t))
    a, b = {"x0": (-a_ * s_, s_ ** 2 * xbar), "eps": (a_ ** 2, -a_ * s_ * xbar),
            "v": (a_ + 0 * xbar, -s_ * xbar)}[parameterisation]
    a = a.expand_as(xbar)
    mean = float((a ** 2 + b ** 2).mean())
    se = math.sqrt(float((2 * a ** 4 + 4 * a ** 2 * b ** 2).sum())) / xbar.numel()
    assert abs(loss - mean) <= 5 * se, (loss, mean, se)


def _chain(diff, steps, sampler):
    """(k, v): x̂0 = k·z_1 for DDIM (deterministic), or Var(x̂0) = v for DDPM (z_1 ~ N(0, I)),
    by the sampler's own grid t_i = i/steps with x̂0 = α_t z_t at every step."""
    gam = lambda t: float(diff.schedule.gamma(torch.tensor([t]))[0])  # noqa: E731
    coef, var = 1.0, 1.0
    for i in range(steps, 1, -1):
        gt, gs = gam(i / steps), gam((i - 1) / steps)
        at, st = math.sqrt(1 / (1 + math.exp(gt))), math.sqrt(1 / (1 + math.exp(-gt)))
        as_, ss = math.sqrt(1 / (1 + math.exp(gs))), math.sqrt(1 / (1 + math.exp(-gs)))
        if sampler == "ddim":            # z_s = α_s x̂0 + σ_s (z_t − α_t x̂0)/σ_t
            coef *= as_ * at + ss * st
        else:                            # z_s ~ q(z_s | z_t, x̂0): mean coefficient, posterior variance
            c = -math.expm1(gs - gt)
            k = as_ / at * (1 - c) + as_ * c * at
            var = k * k * var + ss ** 2 * c
    a1 = math.sqrt(1 / (1 + math.exp(gam(1 / steps))))
    return a1 * coef, a1 * a1 * var


@pytest.mark.parametrize("parameterisation", ["x0", "eps", "v"])
def test_ddim_sample_of_the_bayes_denoiser_is_its_exact_linear_map(parameterisation):
    """DDIM with x̂0 = α_t z_t maps z_t to (α_s α_t + σ_s σ_t) z_t, and the last x̂0 is α_{1/N} z; the
    returned sample is that, un-normalised: μ̂ + ŝ·k·z_1, z_1 the sampler's first draw from the
    same generator. float32 through 20 steps; ε-prediction's (z − σ ε̂)/α loses digits where α is
    small (1e-3 at t = 1): 1e-4 relative."""
    diff, _ = fitted(parameterisation)
    k, _ = _chain(diff, 20, "ddim")
    out = diff.sample(bayes_net(diff), 16, 8, 20, torch.Generator().manual_seed(5))
    z1 = torch.randn((16, 8, 6), generator=torch.Generator().manual_seed(5))
    mean, std = diff.norm.stats()
    want = mean + std * k * z1
    assert 0.5 < k < 1.0, k                                         # a real map, not ≈ 0 or the identity
    assert torch.allclose(out, want, rtol=1e-4, atol=1e-4 * float(std.max())), (out - want).abs().max()


def test_ddpm_sample_of_the_bayes_denoiser_has_its_exact_variance():
    """DDPM with x̂0 = α_t z_t: z_s = k z_t + √(σ_s² c) ξ, so Var(z) follows v_s = k² v_t + σ_s² c
    from v_1 = 1 and the normalised sample's variance is α_{1/N}² v; mean 0. 4000×8×6 draws
    (pooled over dimensions after un-normalising): 5 s.e. (√(2/n) relative for the variance)."""
    diff, _ = fitted("x0", sampler="ddpm")
    _, var = _chain(diff, 20, "ddpm")
    out = diff.sample(bayes_net(diff), 4000, 8, 20, torch.Generator().manual_seed(6))
    mean, std = diff.norm.stats()
    zn = ((out - mean) / std).double()
    n = zn.numel()
    assert abs(float(zn.mean())) < 5 * math.sqrt(var / n)
    assert abs(float(zn.var()) - var) < 5 * var * math.sqrt(2 / n), (float(zn.var()), var)


# ----------------------------------------------------------------------------- PLANNER
def _planner(beta=0.01):
    """A PLANNER with its zero-initialised parameters (output heads, adaLN) drawn at random, so
    the encoder's (μ, log σ²) and the decoder's logits depend on their inputs from the start."""
    torch.manual_seed(0)
    m = Planner(PlannerParams(latents=4, latent_dim=8, beta=beta), BB, V, L)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.3)
    return m


def test_planner_loss_is_reconstruction_plus_beta_kl():
    """Same weights and noise, β = 0 and β = 0.5: the difference is β·Σ KL(N(μ, σ²) ‖ N(0, I)) per
    counted token, the KL by torch.distributions from the encoder's own (μ, log σ²). float32: 1e-4."""
    m = _planner(beta=0.0)
    w = torch.randint(0, V, (6, L), generator=torch.Generator().manual_seed(1))
    counted = torch.ones_like(w, dtype=torch.bool)
    counted[:, -2:] = False
    losses = []
    for beta in (0.0, 0.5):
        m.p = m.p.model_copy(update={"beta": beta})
        torch.manual_seed(2)
        losses.append(float(m.autoencoder_loss(w, counted).detach()))
    with torch.no_grad():
        mu, logvar = m.posterior(w)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mu, (0.5 * logvar).exp()),
                                           torch.distributions.Normal(0.0, 1.0)).sum()
    want = 0.5 * float(kl) / int(counted.sum())
    assert want > 1e-3 and math.isclose(losses[1] - losses[0], want, rel_tol=1e-4), (losses, want)


def test_planner_decoder_reads_a_draw_from_the_posterior():
    """The latent the decoder reads in training is μ + σ ξ, ξ ~ N(0, I): (z − μ)/σ has mean 0 and
    variance 1 within 5 s.e. over 256 sequences × 4 × 8 values."""
    m = _planner()
    seen = []
    inner = m.decoder_logits
    m.decoder_logits = lambda z, w: seen.append(z) or inner(z, w)
    w = torch.randint(0, V, (256, L), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(4)
    with torch.no_grad():
        m.autoencoder_loss(w, torch.ones_like(w, dtype=torch.bool))
        mu, logvar = m.posterior(w)
    xi = ((seen[0] - mu) / (0.5 * logvar).exp()).double()
    n = xi.numel()
    assert abs(float(xi.mean())) < 5 / math.sqrt(n) and abs(float(xi.var()) - 1) < 5 * math.sqrt(2 / n), xi.var()


def test_planner_decoder_is_causal_in_the_tokens_and_reads_the_latent():
    """p_θ(w_i | w_<i, z): the logits at i do not move when w_≥i changes (float32, 1e-5) and do when
    w_<i or z changes."""
    m = _planner().eval()
    g = torch.Generator().manual_seed(5)
    w = torch.randint(0, V, (4, L), generator=g)
    z = torch.randn(4, 4, 8, generator=g)
    with torch.no_grad():
        base = m.decoder_logits(z, w)
        for i in range(L):
            w2 = w.clone()
            w2[:, i:] = (w[:, i:] + 1 + torch.randint(0, V - 1, w[:, i:].shape, generator=g)) % V   # every one differs
            moved = (m.decoder_logits(z, w2) - base).abs().amax((0, 2))
            assert float(moved[:i + 1].max()) < 1e-5, (i, moved)
            if i + 1 < L:
                assert float(moved[i + 1]) > 1e-3, (i, moved)
        assert float((m.decoder_logits(z + 1, w) - base).abs()[:, 0].max()) > 1e-3


# ----------------------------------------------------------------------------- counted tokens
def _logits_grad(name):
    """(∂loss/∂logits (B, L, ·), counted) for one autoencoder loss with the last 3 tokens uncounted."""
    torch.manual_seed(0)
    ctx = Context(tokenizer=NumberTokenizer())
    if name == "planner":
        m = Planner(PlannerParams(latents=4, latent_dim=8), BB, V, L, ctx)
    else:
        m = LD4LG(LD4LGParams(latents=4, latent_dim=8), BB, V, L, ctx)
    kept = []

    def keep(out):
        out.retain_grad()
        kept.append(out)
        return out
    if name == "planner":
        inner = m.decoder_logits
        m.decoder_logits = lambda z, w: keep(inner(z, w))
    else:
        def hook(mod, args, out):
            keep(out.logits)
        m.lm.register_forward_hook(hook)
    w = torch.randint(0, V, (4, L), generator=torch.Generator().manual_seed(1))
    counted = torch.ones_like(w, dtype=torch.bool)
    counted[:, -3:] = False
    m.autoencoder_loss(w, counted).backward()
    return kept[0].grad, counted


@pytest.mark.parametrize("name", ["planner", "ld4lg"])
def test_uncounted_tokens_contribute_nothing_to_the_autoencoder_loss(name):
    """∂loss/∂logits is exactly 0 at uncounted positions and not at counted ones."""
    grad, counted = _logits_grad(name)
    per_position = grad.abs().sum(-1)
    assert (per_position[~counted] == 0).all() and (per_position[counted] > 0).all(), per_position
