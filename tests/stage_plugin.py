"""A two-stage test method for tests/test_stages.py (registered by the tests, never by the
harness): stage ``autoencoder`` trains a token embedding E and a decoder D to reconstruct the
tokens from a noised latent; stage ``diffusion`` trains a denoiser (the shared backbone) over
E's latents, E and D untouched. With ``encoder`` (a save_pretrained BERT directory) the latent
is a trainable projection of a frozen BERT's output instead of E.

Its ``nll`` (−log p(x | D(denoiser(z))) of the clean latent, exact and independent of u) is a
test quantity that depends on every trained parameter; it is no model of text.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.backbone import Backbone
from bench.method import Method, Params

NAME = "test-two-stage"
DIM = 8


class ToyParams(Params):
    encoder: Optional[str] = None


class TwoStageToy(Method):
    Params = ToyParams
    stages = ("autoencoder", "diffusion")
    stage_defaults = {"autoencoder": {"lr": 1e-2}}
    likelihood = "exact"
    time = "continuous"

    def __init__(self, params, backbone, vocab_size, seq_len, context=None):
        super().__init__(params, backbone, vocab_size, seq_len, context)
        if params.encoder:
            from transformers import BertModel

            self.add_frozen("encoder", BertModel.from_pretrained(params.encoder), source=params.encoder)
            self.E = nn.Linear(self.encoder.config.hidden_size, DIM)   # projection of the frozen encoding
        else:
            self.E = nn.Embedding(vocab_size, DIM)
        self.D = nn.Linear(DIM, vocab_size)

    def info(self) -> dict:
        if not self.p.encoder:
            return super().info()
        return {**super().info(), "text_crossing": "suite ids fed to the encoder as its own ids (test method)"}

    def build_network(self, cfg):
        return Backbone(cfg, vocab_in=None, vocab_out=DIM, seq_len=self.L, in_dim=DIM)

    def latent(self, x0, counted):
        if self.p.encoder:
            h = self.encoder(input_ids=x0, attention_mask=torch.ones_like(x0)).last_hidden_state
            return self.E(h)
        return self.E(x0)

    def stage_parameters(self, stage):
        mods = [self.E, self.D] if stage == "autoencoder" else [self.net]
        return [p for m in mods for p in m.parameters()]

    def stage_loss(self, stage, x0, counted, u):
        """Both stages' losses reach E, D's input and the denoiser, so that only the harness (which
        trains ``stage_parameters(stage)`` and nothing else) keeps the other stage's weights still:
        stage 1 = reconstruction + 0.1 · denoising error, stage 2 = denoising error."""
        z0 = self.latent(x0, counted)
        w = counted.float()
        a = (1 - u).view(-1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * torch.randn_like(z0)
        err = ((self.net(t=u, embeds=zt).float() - z0) ** 2).sum(-1)
        denoise = (err * w).sum() / w.sum().clamp(min=1)
        if stage == "diffusion":
            return denoise
        logits = self.D(z0 + 0.1 * torch.randn_like(z0))
        ce = F.cross_entropy(logits.flatten(0, 1).float(), x0.flatten(), reduction="none").view_as(w)
        return (ce * w).sum() / w.sum().clamp(min=1) + 0.1 * denoise

    def nll(self, x0, counted, u):
        z0 = self.latent(x0, counted)
        zhat = self.net(t=torch.zeros(len(x0), device=x0.device), embeds=z0)
        ce = F.cross_entropy(self.D(zhat).flatten(0, 1).float(), x0.flatten(), reduction="none").view_as(counted)
        return (ce * counted).sum(1).double()
