"""LD4LG (Lovelace et al. 2023, "Latent Diffusion for Language Generation"): compress an
encoder-decoder's encoder states into a fixed number of latent vectors, diffuse the latents,
and decode them autoregressively with the encoder-decoder's decoder.

    methods: [{method: ld4lg, lm: facebook/bart-base}]            # pretrained, frozen (the paper)
    methods: [{method: ld4lg}]                                   # offline: a BART trained here

Stage ``autoencoder``: H = E(w) ∈ R^{m×D}; Perceiver compression (Jaegle et al. 2021)
x = f_φ(H) ∈ R^{n×d}; reconstruction H̃ = g_φ(x) ∈ R^{n×D}; loss −log p_LM(w | H̃) (teacher
forcing). A pretrained LM is frozen (``freeze_lm``): its encoder states H of every training
block are then computed once and memory-mapped by the harness (``frozen_features``); ``lm:
null`` (the default, offline) trains a BART-shaped encoder-decoder from config: that row is
labelled "LD4LG (BART from scratch)". Stage ``diffusion``: methods/_latent.LatentDiffusion
over x (v-prediction, self-conditioning, DDIM; NFE = steps). Sampling: x̂ → g_φ → greedy
decoding. No likelihood (ppl "—"): ranked by sample metrics. What differs from the reference
recipe (a frozen pretrained BART, 32 × 64 l2-normalised latents, cosine schedule, DDPM) is
recorded in ``info()["reference"]``.

Description: docs/methods.md#ld4lg.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, PositiveInt, model_validator

from bench.backbone import Backbone
from bench.condition import condition
from bench.errors import UserError
from bench.method import Method
from bench.registry import register
from methods._latent import (
    LatentAutoencoderParams,
    LatentDiffusion,
    block_texts,
    check_text_data,
    encoder_fingerprint,
    pad_or_cut,
    reference_differences,
    require_text_tokenizer,
    resolve_model_path,
    texts_to_suite_ids,
)

IGNORE = -100   # label id HF losses skip; we compute our own CE with the same convention
REFERENCE_CODE = ("github.com/justinlovelace/latent-diffusion-for-language (scripts/autoencoder/bart_base_roc.sh, "
                  "scripts/diffusion/bart_latent_v-pred.sh)")
# the reference's settings of what our params choose (lm_mode freeze is its default)
REFERENCE = {"lm": "facebook/bart-base", "frozen": True, "latents": 32, "latent_dim": 64, "compress_layers": 3,
             "schedule": "cosine", "parameterisation": "v", "sampler": "ddpm", "self_condition": True,
             "self_condition_rate": 0.5}
DIFFERS = ["latents: normalised per dimension by mean/std of the first norm_batches diffusion batches (reference: "
           "--l2_normalize_latents, each latent scaled to norm √d, nothing else)",
           "sampler: `steps` equal steps (reference: 250 DDPM steps)"]


class LD4LGParams(LatentAutoencoderParams):
    parameterisation: Literal["x0", "eps", "v"] = Field("v", description="what the denoiser outputs (LD4LG: v)")
    lm: Optional[str] = Field(None, description="HF encoder-decoder (BART, T5) name or dir; null = a BART built "
                                                "from config over the suite's ids, trained in the autoencoder stage")
    freeze_lm: Optional[bool] = Field(None, description="keep the LM frozen (default: true for a pretrained lm, "
                                                        "false for lm: null)")
    latents: PositiveInt = Field(16, description="n: latent vectors (LD4LG: 32)")
    latent_dim: PositiveInt = Field(32, description="d: width of each latent (LD4LG: 64)")
    compress_layers: PositiveInt = Field(1, description="blocks in the compression and in the reconstruction "
                                                        "network (LD4LG: 3)")
    enc_len: Optional[PositiveInt] = Field(None, description="LM tokens per block with a pretrained lm "
                                                             "(default: seq_len)")

    @model_validator(mode="after")
    def _frozen_needs_pretrained(self):
        if self.lm is None and self.freeze_lm:
            raise ValueError("freeze_lm: a BART built from config (lm: null) is untrained; it cannot be frozen")
        return self

    @property
    def frozen(self) -> bool:
        return self.lm is not None if self.freeze_lm is None else self.freeze_lm


# ----------------------------------------------------------------------------- the crossing
def labels_of(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Teacher-forcing targets: the LM's ids, IGNORE where the attention mask is 0 (padding)."""
    return torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE))


class SuiteIds:
    """lm: null — the LM's vocabulary is the suite's plus [BOS] = V (decoder start) and
    [PAD] = V + 1; blocks go in as they are; exactly L tokens come out."""

    crossing = "none: a BART built from config reads and writes the suite's token ids"

    def __init__(self, V: int, L: int):
        self.V, self.L = V, L
        self.bos, self.pad = V, V + 1

    def inputs(self, x0, counted):
        labels = torch.where(counted, x0, torch.full_like(x0, IGNORE))
        return x0, torch.ones_like(x0), labels

    def generation(self) -> dict:
        return dict(max_new_tokens=self.L, min_new_tokens=self.L, eos_token_id=None, pad_token_id=self.pad,
                    decoder_start_token_id=self.bos, suppress_tokens=[self.bos, self.pad])   # suite ids only

    def to_suite(self, generated, tokenizer, L):
        return pad_or_cut(generated[:, 1:].tolist(), L, tokenizer.eos_id)


class LMTokenizer:
    """A pretrained LM: text crosses through its own tokenizer."""

    def __init__(self, tok, config, enc_len: int, name: str):
        self.tok, self.cfg, self.enc_len = tok, config, enc_len
        self.crossing = (f"suite ids → suite tokenizer decode → {name} tokenizer (≤ {enc_len} tokens) → LM; "
                         f"greedy generation → {name} decode → suite tokenizer (EOS-padded / cut to L)")

    def inputs(self, x0, counted, suite_tok):
        enc = self.tok(block_texts(suite_tok, x0, counted), padding="max_length", truncation=True,
                       max_length=self.enc_len, return_tensors="pt")
        ids, mask = enc["input_ids"].to(x0.device), enc["attention_mask"].to(x0.device)
        return ids, mask, labels_of(ids, mask)

    def generation(self) -> dict:
        return dict(max_new_tokens=self.enc_len, eos_token_id=self.cfg.eos_token_id, pad_token_id=self.cfg.pad_token_id,
                    decoder_start_token_id=self.cfg.decoder_start_token_id)

    def to_suite(self, generated, tokenizer, L):
        texts = [t.strip() for t in self.tok.batch_decode(generated, skip_special_tokens=True)]
        return texts_to_suite_ids(tokenizer, texts, L)


# ----------------------------------------------------------------------------- the networks
def _block(D: int, heads: int, cross: bool) -> nn.Module:
    cls = nn.TransformerDecoderLayer if cross else nn.TransformerEncoderLayer
    return cls(D, heads, dim_feedforward=4 * D, dropout=0.0, batch_first=True, norm_first=True)


class Compression(nn.Module):
    """f_φ: (H (B, m, D), mask (B, m)) → x (B, n, d), a Perceiver resampler with n learned queries."""

    def __init__(self, D: int, heads: int, n: int, d: int, layers: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n, D) * D ** -0.5)
        self.blocks = nn.ModuleList(_block(D, heads, cross=True) for _ in range(layers))
        self.norm = nn.LayerNorm(D)
        self.out = nn.Linear(D, d)

    def forward(self, H, mask):
        q = self.queries.expand(H.shape[0], -1, -1)
        for blk in self.blocks:
            q = blk(q, H, memory_key_padding_mask=~mask.bool())
        return self.out(self.norm(q))


class Reconstruction(nn.Module):
    """g_φ: x (B, n, d) → H̃ (B, n, D), the states the decoder cross-attends to."""

    def __init__(self, D: int, heads: int, d: int, layers: int):
        super().__init__()
        self.inp = nn.Linear(d, D)
        self.blocks = nn.ModuleList(_block(D, heads, cross=False) for _ in range(layers))
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h)
        return self.norm(h)


def bart_from_config(backbone, V: int, L: int, eos_id: int):
    """A BART-shaped encoder-decoder with the suite backbone's width/depth/heads over V + 2 ids."""
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(vocab_size=V + 2, d_model=backbone.hidden, encoder_layers=backbone.layers,
                     decoder_layers=backbone.layers, encoder_attention_heads=backbone.heads,
                     decoder_attention_heads=backbone.heads, encoder_ffn_dim=backbone.mlp_ratio * backbone.hidden,
                     decoder_ffn_dim=backbone.mlp_ratio * backbone.hidden, max_position_embeddings=L + 2,
                     pad_token_id=V + 1, bos_token_id=V, eos_token_id=eos_id, decoder_start_token_id=V,
                     forced_bos_token_id=None, forced_eos_token_id=None, dropout=0.0, attention_dropout=0.0,
                     tie_word_embeddings=False)
    # untied: encoder, decoder and output embeddings are separate tensors (a checkpoint holds no
    # shared storage); BART's ``model.shared`` table is then read by nothing and never trained
    return BartForConditionalGeneration(cfg)


UNUSED_WHEN_UNTIED = ("lm.model.shared.weight",)


def load_seq2seq(name: str, where: str):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    path, local = resolve_model_path(name, where, "encoder-decoder")
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(path, local_files_only=local)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=local)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{where}: cannot load encoder-decoder '{name}': {str(e).splitlines()[0][:200]}") from None
    return model, tok, path


# ----------------------------------------------------------------------------- the method
@register("ld4lg")
class LD4LG(Method):
    Params = LD4LGParams
    likelihood = "none"
    time = "continuous"
    stages = ("autoencoder", "diffusion")
    display = "LD4LG"

    def __init__(self, params, backbone, vocab_size, seq_len, context=None):
        super().__init__(params, backbone, vocab_size, seq_len, context)
        require_text_tokenizer(self.context, "methods[ld4lg]")
        source = None
        if params.lm is None:
            lm = bart_from_config(backbone, vocab_size, seq_len, self.context.tokenizer.eos_id)
            self.crossing = SuiteIds(vocab_size, seq_len)
        else:
            lm, tok, source = load_seq2seq(params.lm, "methods[ld4lg].lm")
            self.crossing = LMTokenizer(tok, lm.config, params.enc_len or seq_len, params.lm)
        if params.frozen:
            self.add_frozen("lm", lm, source)
        else:
            self.lm = lm
        D, heads = lm.config.d_model, _heads_of(lm.config)
        self.compress = Compression(D, heads, params.latents, params.latent_dim, params.compress_layers)
        self.reconstruct = Reconstruction(D, heads, params.latent_dim, params.compress_layers)
        self.diffusion = LatentDiffusion(params.latent_dim, params, params.norm_batches)

    @classmethod
    def default_label(cls, params) -> str:
        """"LD4LG" for its recipe's pretrained frozen LM; says so when the LM is trained here."""
        if params.lm is None:
            return "LD4LG (BART from scratch)"
        return "LD4LG" if params.frozen else "LD4LG (LM fine-tuned)"

    @classmethod
    def check_compatible(cls, params, data, where):
        check_text_data(data, where)

    def build_network(self, cfg):
        return Backbone(cfg, vocab_in=None, vocab_out=self.p.latent_dim, seq_len=self.p.latents,
                        in_dim=self.p.latent_dim, self_condition=self.p.self_condition)

    def info(self) -> dict:
        return {**super().info(), "lm": self.p.lm or "bart-from-config", "lm_frozen": self.p.frozen,
                "latents": self.p.latents, "latent_dim": self.p.latent_dim, "text_crossing": self.crossing.crossing,
                "reference": {"code": REFERENCE_CODE, "params": reference_differences(self.p, REFERENCE),
                              "differs": DIFFERS}}

    # --- the autoencoder --------------------------------------------------------------------
    def lm_inputs(self, x0, counted):
        if isinstance(self.crossing, SuiteIds):
            return self.crossing.inputs(x0, counted)
        return self.crossing.inputs(x0, counted, self.context.tokenizer)

    def lm_states(self, ids, mask) -> torch.Tensor:
        """H = E(w) (B, m, D), the LM encoder's states (with gradient only when it trains)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.p.frozen):
            return self.lm.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state

    def latents_of(self, ids, mask) -> torch.Tensor:
        """x = f_φ(E(w)) (B, n, d)."""
        return self.compress(self.lm_states(ids, mask), mask)

    def frozen_features_key(self):
        """A frozen pretrained LM's encoder states are cached (both stages read them); an LM
        trained here (lm: null, or freeze_lm: false) has no frozen features."""
        if not self.p.frozen:
            return None
        return {"enc_len": self.crossing.enc_len, "suite_tokenizer": self.context.tokenizer.key,
                **encoder_fingerprint(self.lm, self.crossing.tok)}

    def frozen_features(self, x0, counted):
        """{"ids", "mask": the LM tokenizer's ids and attention mask (B, m), "H": E(w) (B, m, D)}:
        row i from block i alone (its text tokenised on its own, padded to enc_len)."""
        ids, mask, _ = self.lm_inputs(x0, counted)
        return {"ids": ids, "mask": mask, "H": self.lm_states(ids, mask)}

    def encoded(self, x0, counted):
        """(mask, labels, H) of a batch: for a frozen LM from its frozen features (the harness's
        cache when it holds the batch), else computed (with gradient when the LM trains)."""
        if self.p.frozen:
            f = self.features(x0, counted)
            return f["mask"], labels_of(f["ids"], f["mask"]), f["H"]
        ids, mask, labels = self.lm_inputs(x0, counted)
        return mask, labels, self.lm_states(ids, mask)

    def states(self, x):
        from transformers.modeling_outputs import BaseModelOutput
        return BaseModelOutput(last_hidden_state=self.reconstruct(x))

    def autoencoder_loss(self, x0, counted):
        mask, labels, H = self.encoded(x0, counted)
        x = self.compress(H, mask)
        logits = self.lm(encoder_outputs=self.states(x), labels=labels).logits.float()
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)

    # --- stages -----------------------------------------------------------------------------
    def stage_parameters(self, stage):
        if stage == "autoencoder":
            return [p for name, p in self.named_parameters()
                    if not name.startswith(("net.", "diffusion.")) and name not in UNUSED_WHEN_UNTIED]
        return list(self.net.parameters())

    def stage_loss(self, stage, x0, counted, u):
        if stage == "autoencoder":
            return self.autoencoder_loss(x0, counted)
        with torch.no_grad():
            mask, _, H = self.encoded(x0, counted)
            x = self.compress(H, mask)
        return self.diffusion.loss(self.net, x, u)

    # --- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, x):
        """Greedy decoding of the LM's decoder cross-attending to g_φ(x); suite ids (n, L)."""
        from transformers import GenerationConfig

        gen = GenerationConfig(do_sample=False, num_beams=1, **self.crossing.generation())
        out = self.lm.generate(encoder_outputs=self.states(x), generation_config=gen,
                               attention_mask=torch.ones(x.shape[:2], dtype=torch.long, device=x.device))
        return self.crossing.to_suite(out.cpu(), self.context.tokenizer, self.L).to(x.device)

    @torch.no_grad()
    def sample(self, n, steps=64, generator=None, *, given=None, keep=None):
        """A whole block from a latent; no conditioning (``conditioning = "none"``): a kept
        position is refused by bench.condition with one line, and tables show "—"."""
        condition(self, n, given, keep)
        x = self.diffusion.sample(self.net, n, self.p.latents, steps, generator, device=self.device)
        return self.decode(x)


def _heads_of(config) -> int:
    for key in ("encoder_attention_heads", "num_heads", "num_attention_heads"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise UserError("methods[ld4lg].lm: cannot tell the LM's number of attention heads from its config")
