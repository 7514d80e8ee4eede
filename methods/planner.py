"""PLANNER (Zhang et al. 2023, "PLANNER: Generating Diversified Paragraph via Latent Language
Diffusion Model"): a variational paragraph autoencoder to a fixed-size latent, and Gaussian
diffusion over that latent.

    methods: [{method: planner, beta: 0.01, latents: 16, latent_dim: 32}]

Both halves are trained here from scratch on the shared Backbone (the reference fine-tunes a
pretrained BERT-large encoder and GPT-2 medium decoder): the row is labelled "PLANNER (from
scratch)", and the rest of what differs is recorded in ``info()["reference"]``.

β is per counted token: loss = (Σ_i −log p_θ(w_i | w_<i, z) + β·Σ_batch KL) / N, N the
batch's counted tokens. The reference (text_autoencoder/autoencoder/autoencoder.py, VAE.forward)
adds β_ref·Σ_batch KL to the per-token MEAN reconstruction loss, so the two agree when
β = β_ref·N, N the counted tokens of the reference's per-process batch (its script's β_ref =
1e-5 at 2 × 256 tokens is β ≈ 5.1e-3 here).

Stage ``autoencoder``: encoder q_φ(z | w) (a bidirectional Backbone over the block and k query
tokens → (μ, log σ²) ∈ R^{k×d_z}), causal decoder p_θ(w | z) with the latents as a prefix,
loss −log p_θ(w | z) + β·KL(q_φ(z | w) ‖ N(0, I)) (β-VAE, Higgins et al. 2017). Stage
``diffusion``: methods/_latent.LatentDiffusion over μ (x0, self-conditioning, DDIM; NFE =
steps); sampling decodes ẑ with the KV-cached decoder. No likelihood (ppl "—"): the β-VAE's
ELBO bounds the autoencoder, not the sampled model.

Description: docs/methods.md#planner.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, PositiveInt

from bench.backbone import Backbone, KVCache
from bench.condition import condition
from bench.method import Method, gumbel_argmax
from bench.registry import register
from methods._latent import LatentAutoencoderParams, LatentDiffusion, reference_differences


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, diag σ²) ‖ N(0, I)) = ½ Σ_j (μ_j² + σ_j² − 1 − log σ_j²), summed over the last
    axis (Kingma & Welling 2014, App. B). ≥ 0, and 0 exactly when μ = 0 and log σ² = 0."""
    return 0.5 * (mu * mu + logvar.exp() - 1.0 - logvar).sum(-1)


REFERENCE_CODE = "github.com/apple/ml-planner (text_autoencoder, bash/ae/run_ae.sh)"
REFERENCE = {"latents": 16, "latent_dim": 1024}   # --num_feature 16; --latent_size 1024 (BERT-large's width)
DIFFERS = ["encoder and decoder: Backbones trained here from scratch over the suite's ids (reference: pretrained "
           "BERT-large encoder and GPT-2 medium decoder, fine-tuned)",
           "posterior mean: as the head gives it (reference: --h_tanh, μ = tanh(·))"]


class PlannerParams(LatentAutoencoderParams):
    latents: PositiveInt = Field(16, description="k: latent vectors per block")
    latent_dim: PositiveInt = Field(32, description="d_z: width of each latent vector")
    beta: float = Field(0.01, ge=0.0, description="β: weight of KL(q(z|w) ‖ N(0, I)) per counted token (the "
                                                  "reference's β_ref, on the batch's summed KL, is β/N, N the "
                                                  "counted tokens of its batch)")
    float64_sampling: bool = True


@register("planner")
class Planner(Method):
    Params = PlannerParams
    likelihood = "none"
    time = "continuous"
    stages = ("autoencoder", "diffusion")
    display = "PLANNER (from scratch)"

    def __init__(self, params, backbone, vocab_size, seq_len, context=None):
        super().__init__(params, backbone, vocab_size, seq_len, context)
        k, dz = params.latents, params.latent_dim
        self.encoder = Backbone(backbone, vocab_in=vocab_size + k, vocab_out=2 * dz, seq_len=seq_len + k)
        self.decoder = Backbone(backbone, vocab_in=vocab_size + 1, vocab_out=vocab_size, seq_len=k + seq_len,
                                causal=True)
        self.latent_in = nn.Linear(dz, backbone.hidden)       # W: z_j → a prefix input vector
        self.diffusion = LatentDiffusion(dz, params, params.norm_batches)

    def build_network(self, cfg):
        return Backbone(cfg, vocab_in=None, vocab_out=self.p.latent_dim, seq_len=self.p.latents,
                        in_dim=self.p.latent_dim, self_condition=self.p.self_condition)

    def info(self) -> dict:
        return {**super().info(), "latents": self.p.latents, "latent_dim": self.p.latent_dim, "beta": self.p.beta,
                "beta_per": ("counted token: loss = (Σ CE + β·Σ_batch KL)/N; the reference's β_ref (Σ_batch KL "
                             "added to the per-token mean CE) is β/N, N the counted tokens of its per-process batch"),
                "reference": {"code": REFERENCE_CODE, "params": reference_differences(self.p, REFERENCE),
                              "differs": DIFFERS},
                "text_crossing": "none: encoder and decoder read and write the suite's token ids"}

    # --- the autoencoder --------------------------------------------------------------------
    def posterior(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²), each (B, k, d_z), of q_φ(z | w)."""
        k = self.p.latents
        queries = torch.arange(self.V, self.V + k, device=w.device).expand(w.shape[0], k)
        out = self.encoder(torch.cat([w, queries], 1))[:, -k:].float()
        mu, logvar = out.chunk(2, dim=-1)
        return mu, logvar

    def decoder_logits(self, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """logits of p_θ(w_i | w_<i, z) for i = 1..L, (B, L, V)."""
        bos = torch.full_like(w[:, :1], self.V)
        tokens = self.decoder.tok(torch.cat([bos, w[:, :-1]], 1))
        h = torch.cat([self.latent_in(z.to(tokens.dtype)), tokens], 1)
        return self.decoder(embeds=h)[:, self.p.latents:]

    def autoencoder_loss(self, w, counted):
        mu, logvar = self.posterior(w)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        nll = F.cross_entropy(self.decoder_logits(z, w).float().flatten(0, 1), w.flatten(),
                              reduction="none").view(w.shape)
        kl = kl_to_standard_normal(mu.flatten(1), logvar.flatten(1))
        return ((nll * counted).sum() + self.p.beta * kl.sum()) / counted.sum().clamp(min=1)

    # --- stages -----------------------------------------------------------------------------
    def stage_parameters(self, stage):
        if stage == "autoencoder":
            return [*self.encoder.parameters(), *self.decoder.parameters(), *self.latent_in.parameters()]
        return list(self.net.parameters())

    def stage_loss(self, stage, x0, counted, u):
        if stage == "autoencoder":
            return self.autoencoder_loss(x0, counted)
        with torch.no_grad():
            mu, _ = self.posterior(x0)
        return self.diffusion.loss(self.net, mu, u)

    # --- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, z: torch.Tensor, generator=None) -> torch.Tensor:
        """Ancestral sampling of w ~ p_θ(w | z), one token per decoder call (KV cache)."""
        n = z.shape[0]
        kv = KVCache(len(self.decoder.blocks))
        bos = self.decoder.tok(torch.full((n, 1), self.V, dtype=torch.long, device=z.device))
        logits = self.decoder(embeds=torch.cat([self.latent_in(z.to(bos.dtype)), bos], 1), cache=kv)[:, -1]
        out = []
        for i in range(self.L):
            w = gumbel_argmax(logits, generator, self.p.float64_sampling)
            out.append(w)
            if i + 1 < self.L:
                logits = self.decoder(w[:, None], cache=kv)[:, -1]
        return torch.stack(out, 1)

    @torch.no_grad()
    def sample(self, n, steps=64, generator=None, *, given=None, keep=None):
        """A whole block from a latent; no conditioning (``conditioning = "none"``): a kept
        position is refused by bench.condition with one line, and tables show "—"."""
        condition(self, n, given, keep)
        z = self.diffusion.sample(self.net, n, self.p.latents, steps, generator, device=self.device)
        return self.decode(z, generator)
