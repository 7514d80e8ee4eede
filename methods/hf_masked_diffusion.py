"""hf-masked-diffusion: any pretrained Hugging Face masked LM or masked-diffusion checkpoint as a
leaderboard row, evaluated as given under the suite's protocol (nothing is trained).

    methods: [{method: hf-masked-diffusion, model: answerdotai/ModernBERT-base}]
    methods: [{method: hf-masked-diffusion, model: kuleshov-group/mdlm-owt, trust_remote_code: true,
               mask_id: 50257, time_kwarg: timesteps, time_value: zero}]
    methods: [{method: hf-masked-diffusion, model: GSAI-ML/LLaDA-8B-Base, trust_remote_code: true,
               auto_class: model, mask_id: 126336, sampler: confidence}]

The network's p_θ(x_0 | x_t) read with SUBS (MDLM §3.2; methods._masked.subs: the [MASK] logit
at −∞, unmasked positions carried over) is a denoiser of the absorbing-state (masked) diffusion
with α_t = 1 − t, and its continuous-time NELBO (MDLM eq. 10)

    L = ∫_0^1 (1/t) E_{x_t ~ q(x_t|x_0)} [ Σ_{masked i} −log p_θ(x_0^i | x_t) ] dt

is estimated from the protocol's stratified u draws with MDLM's bounded-weight form
(methods._masked.nelbo_beta: m = ⌈u·n⌉ tokens masked, t ~ Beta(m, n−m+1), weight n/m) and the
protocol's Monte-Carlo interval (bench.evaluate). For a time-agnostic denoiser (BERT, RoBERTa,
ModernBERT, LLaDA, Dream) it is the mean over masking orders of the any-order autoregressive
NLL, Σ_{m=1}^{n} (1/m)·mean_{|S|=m} Σ_{i∈S} −log p_θ(x_0^i | x_{S masked})
(tests/test_hf_masked_diffusion.py checks it against that enumeration).

Settings recorded beside the number (``method_info``): ``mask_id`` (default: the tokenizer's
mask token, else the config's ``mask_token_id``; MDLM's is 50257, appended to GPT-2's
vocabulary; LLaDA's 126336), ``time_kwarg`` (None: the model takes no time; else the keyword its
forward takes t under, e.g. ``timesteps``) with ``time_value`` (``t``, or ``sigma`` = −log(1 − t),
the log-linear σ(t), or ``zero``: a time-agnostic model whose forward still takes the keyword, as
MDLM's released mdlm-owt trained with σ ≡ 0), ``logits`` (``subs``: raw logits at the position
they predict; ``shifted-subs``: position i's token read from the logits at i − 1, Dream's
AR-adapted head), ``auto_class`` (``masked-lm``: AutoModelForMaskedLM; ``model``: AutoModel,
LLaDA and Dream), the hub commit loaded and the weights' sha256. Modelling code shipped with a
checkpoint runs only when the row says ``trust_remote_code: true`` (never by default: a one-line UserError otherwise).

Which ids: with the suite's tokenizer the model's own (or, with no tokenizer saved, GPT-2's
with a vocabulary of at least GPT-2's 50257), the suite's ids are scored as they are; otherwise
each block's counted tokens are detokenized and retokenized with the model's tokenizer, framed
by its special tokens ([CLS] … [SEP]) as uncounted clean context (``special_tokens``), and the
NELBO of that text is counted per suite token, as hf-causal-lm does.

``block_size: L′`` (a released BD3-LM, kuleshov-group/bd3lm-owt-block_size*): BD3-LM's bound
(Arriola et al. 2025, §3.1) L_BD = Σ_b E_t (1/t) Σ_{masked ℓ in b} −log p_θ(x^{b,ℓ} | x_t^b, x^{<b})
by methods/bd3lm.py's estimator (methods._masked.nelbo_blocks) from the one pass over [x_t, x_0]
(2L ids) its remote code takes, x_t's logits read with SUBS; BD3-LM's block sampler, uncached.

Samplers (``sampler``): ``ancestral``, MDLM's reverse process (methods._masked.ancestral_sample;
p_θ(x_0 | x_t) reused across unchanged steps when the model takes no time), or ``confidence``,
confidence-ordered unmasking as LLaDA and Dream (methods._masked.confidence_sample). Samples are
L tokens of the suite's vocabulary (same ids) or L tokens of the model's, decoded and encoded
with the suite's tokenizer, cut or padded (EOS) to L.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn as nn
from pydantic import Field, model_serializer, model_validator

from bench import hf, models
from bench.config_io import drop_defaults
from bench.errors import UserError
from bench.method import Method, Params, weights_sha256
from bench.registry import register
from methods._masked import ancestral_sample, block_sample, confidence_sample, nelbo_beta, nelbo_blocks, subs, subs_ce

WHERE = "methods[hf-masked-diffusion]"
BETA_ESTIMATOR = "beta (MDLM eq. 10: m = ceil(u n) masked, t ~ Beta(m, n-m+1), weight n/m)"
BLOCK_ESTIMATOR = ("per block (BD3-LM's L_BD): u_b = (u + b/B) mod 1, m_b = ceil(u_b n_b) masked, weight n_b/m_b; "
                   "one [x_t, x_0] pass of 2L ids")
GPT2_VOCAB = 50257


class HFMaskedDiffusionParams(Params):
    model: str = Field("answerdotai/ModernBERT-base",
                       description="hub name or a save_pretrained directory (a path-like name must exist locally)")
    revision: Optional[str] = Field(None, min_length=1, max_length=100,
                                    description="hub commit (or tag/branch) to load; unpinned, the record shows "
                                                "the commit loaded")
    trust_remote_code: bool = Field(False, description="run the modelling code the checkpoint ships (MDLM, "
                                                       "BD3-LM, DUO, LLaDA, Dream); never by default")
    auto_class: Literal["masked-lm", "model"] = Field(
        "masked-lm", description="masked-lm: AutoModelForMaskedLM; model: AutoModel (LLaDA, Dream)")
    mask_id: Optional[int] = Field(None, ge=0, description="the [MASK] id (default: the tokenizer's mask token, "
                                                           "else the config's mask_token_id)")
    time_kwarg: Optional[str] = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=64,
                                      description="None: time-agnostic; else the forward keyword t is passed as")
    time_value: Literal["t", "sigma", "zero"] = Field(
        "t", description="what time_kwarg receives: t, sigma = -log(1-t), or zero (a time-agnostic model whose "
                         "forward still takes the keyword: MDLM's released mdlm-owt, trained with "
                         "time_conditioning: False, i.e. sigma = 0)")
    n_params: Optional[int] = Field(None, ge=1, description="the checkpoint's parameter count, for --dry-run's "
                                                            "cost only (a dry run loads no model); the run "
                                                            "records the count it loaded")
    logits: Literal["subs", "shifted-subs"] = Field(
        "subs", description="subs: logits at the position they predict; shifted-subs: at the position before (Dream)")
    special_tokens: bool = Field(True, description="retokenized text framed by the tokenizer's special tokens")
    sampler: Literal["ancestral", "confidence"] = Field(
        "ancestral", description="ancestral: MDLM's reverse process; confidence: most confident first (LLaDA, Dream)")
    float64_sampling: bool = Field(True, description="Gumbel draws in float64")
    block_size: Optional[int] = Field(None, ge=1, description="L′ of a BD3-LM checkpoint: BD3-LM's per-block bound "
                                                              "from one [x_t, x_0] input of 2L ids; None: MDLM's "
                                                              "whole-sequence bound from x_t")

    @model_validator(mode="after")
    def _time_value_needs_kwarg(self):
        if self.time_value != "t" and self.time_kwarg is None:
            raise ValueError("time_value applies only with time_kwarg (the model takes no time)")
        if self.block_size and (self.time_kwarg and self.time_value != "zero" or self.sampler != "ancestral"
                                or self.logits != "subs"):
            raise ValueError("block_size: a BD3-LM row takes no time (time_value: zero, as the released ones were "
                             "trained), reads logits: subs and samples with sampler: ancestral")
        return self

    @model_serializer(mode="wrap")
    def _drop_no_blocks(self, handler):   # block_size came later: unset, the run ids stay as they were
        return drop_defaults(handler(self), block_size=None)


class MaskedLMNet(nn.Module):
    """The pretrained model as a network (x_t, t) → logits (B, L, V'), V' its output vocabulary:
    t passed as the forward keyword ``time_kwarg`` (t, σ(t) = −log(1 − t), or 0), the logits read
    from ``.logits`` (or the first output), shifted one position right for ``shifted-subs``
    (position 0 keeps its own). Its output is one tensor, so the harness counts its calls."""

    def __init__(self, model: nn.Module, time_kwarg: str | None, time_value: str, shifted: bool):
        super().__init__()
        self.model, self.time_kwarg, self.time_value, self.shifted = model, time_kwarg, time_value, shifted

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kw = {}
        if self.time_kwarg:
            t = t.float().clamp(0.0, 1 - 1e-6)
            kw[self.time_kwarg] = {"sigma": -torch.log1p(-t), "zero": torch.zeros_like(t)}.get(self.time_value, t)
        out = self.model(input_ids=x_t, **kw)
        logits = getattr(out, "logits", None)
        if logits is None:
            logits = out[0] if isinstance(out, (tuple, list)) else out
        if self.shifted:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits


def load_masked_lm(p: HFMaskedDiffusionParams) -> nn.Module:
    """The checkpoint in eval mode; UserError (one line) when it cannot be loaded, or when it ships
    modelling code and the row does not say ``trust_remote_code: true``."""
    from transformers import AutoModel, AutoModelForMaskedLM

    if models.is_named(p.model):
        raise UserError(f"{WHERE}.model: {p.model} is a named causal LM (use hf-causal-lm), not a masked LM")
    src, local = hf.resolve_pretrained(p.model, f"{WHERE}.model", "a masked LM")
    local_dir = hf.is_local_name(p.model)
    cls = AutoModelForMaskedLM if p.auto_class == "masked-lm" else AutoModel
    try:
        model = cls.from_pretrained(src, local_files_only=local, trust_remote_code=p.trust_remote_code,
                                    **({"revision": p.revision} if p.revision and not local_dir else {}))
    except Exception as e:  # noqa: BLE001 - any loading failure is the user's path/name/setting
        if not p.trust_remote_code and "trust_remote_code" in str(e):
            raise UserError(f"{WHERE}.trust_remote_code: {p.model} ships its own modelling code, which runs only "
                            f"when this row says trust_remote_code: true") from None
        what = "local directory" if local_dir else "model name"
        raise UserError(f"{WHERE}.model: {p.model}: cannot load a masked LM ({cls.__name__}) from this {what}: "
                        f"{hf.failure(e, local_dir)}") from None
    return model.eval()


def ships_code(p: HFMaskedDiffusionParams) -> bool:
    """Does the checkpoint's config.json, read from its local directory or the local hub cache
    (never the network), map the auto class we load to modelling code of its own (``auto_map``,
    for a model type transformers does not know)? False when the config is not at hand."""
    import json

    from transformers import CONFIG_MAPPING

    if models.is_named(p.model):
        return False
    if hf.is_local_name(p.model):
        path = Path(p.model).expanduser() / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            got = try_to_load_from_cache(p.model, "config.json", revision=p.revision)
        except Exception:  # noqa: BLE001 - an odd name or cache: decided when loading
            return False
        path = Path(got) if isinstance(got, str) else None
    try:
        cfg = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    except (OSError, ValueError):
        return False
    key = "AutoModelForMaskedLM" if p.auto_class == "masked-lm" else "AutoModel"
    return key in (cfg.get("auto_map") or {}) and cfg.get("model_type") not in CONFIG_MAPPING


@register("hf-masked-diffusion")
class HFMaskedDiffusion(Method):
    Params = HFMaskedDiffusionParams
    likelihood = "bound"
    time = "continuous"
    trains = False

    @classmethod
    def default_label(cls, params) -> str:
        return f"{Path(params.model).name} (pretrained, masked)"

    @classmethod
    def example_params(cls, workdir: Path) -> dict:
        """A tiny random BertForMaskedLM with a character-level WordPiece tokenizer saved under
        ``workdir`` (so a GPT-2 suite is retokenized): the hub is not needed to check it."""
        path = Path(workdir) / "tiny-bert-mlm"
        if not path.is_dir():
            save_tiny_bert(path)
        return {"model": str(path)}

    @classmethod
    def check_compatible(cls, params, data, where: str) -> None:
        """Before anything runs: a checkpoint whose modelling code is its own (``ships_code``)
        needs ``trust_remote_code: true`` on its row."""
        p = params if isinstance(params, HFMaskedDiffusionParams) else cls.Params(**params)
        if not p.trust_remote_code and ships_code(p):
            raise UserError(f"{where}.trust_remote_code: {p.model} ships its own modelling code, which runs only "
                            f"when this row says trust_remote_code: true")
        if p.block_size and data is not None and data.seq_len % p.block_size:
            raise UserError(f"{where}.block_size: {p.block_size} does not divide data.seq_len {data.seq_len}")

    def __init__(self, params, backbone, vocab_size, seq_len, context=None):
        super().__init__(params, backbone, vocab_size, seq_len, context)
        self.retokenized = self.suite_tok = self.hf_tok = None
        self._mask = self.p.mask_id
        if self.context.tokenizer is not None:
            self.choose_ids(self.context.tokenizer)
        self._mask = self.resolve_mask_id()
        if self.p.block_size:
            self.check_blocks()

    def build_network(self, cfg):
        model = load_masked_lm(self.p)
        self.weights_sha256 = weights_sha256(model)   # hashed once, as loaded (it never trains)
        return MaskedLMNet(model, self.p.time_kwarg, self.p.time_value, self.p.logits == "shifted-subs")

    @property
    def mask_id(self) -> int:
        return self._mask

    def resolve_mask_id(self) -> int:
        """The row's ``mask_id``, else the tokenizer's mask token, else the config's; checked
        against the model's output vocabulary (the column SUBS removes)."""
        cfg = self.net.model.config
        mid = self.p.mask_id
        if mid is None:
            mid = getattr(self.hf_tok, "mask_token_id", None) if self.hf_tok is not None else None
        if mid is None:
            mid = getattr(cfg, "mask_token_id", None)
        if not isinstance(mid, int):
            raise UserError(f"{WHERE}.mask_id: {self.p.model} names no mask token (tokenizer or config); set "
                            f"mask_id (MDLM: 50257, LLaDA: 126336)")
        vocab = getattr(cfg, "vocab_size", None)
        if isinstance(vocab, int) and not 0 <= mid < vocab:
            raise UserError(f"{WHERE}.mask_id: {mid} is outside {self.p.model}'s vocabulary of {vocab}")
        return mid

    def check_blocks(self) -> None:
        """A block row: the suite's ids as they are, L′ | L, and the config's ``block_size`` and
        ``model_length`` (BD3-LM's mask is built for exactly 2·model_length ids) the row's and L."""
        cfg, size, where = self.net.model.config, self.p.block_size, f"{WHERE}.block_size"
        if self.retokenized or self.L % size:
            raise UserError(f"{where}: {size} needs the suite's ids as they are (the model's tokenizer) and "
                            f"dividing data.seq_len {self.L}")
        own, n = getattr(cfg, "block_size", None), getattr(cfg, "model_length", None)
        if isinstance(own, int) and own != size:
            raise UserError(f"{where}: {size}, but {self.p.model} was trained with block_size {own} (its config)")
        if isinstance(n, int) and n != self.L:
            raise UserError(f"data.seq_len: {self.L}, but {self.p.model} takes [x_t, x_0] of exactly 2·{n} ids "
                            f"(its config's model_length {n})")

    def choose_ids(self, tokenizer) -> None:
        """Score the suite's ids as they are when ``tokenizer`` is the model's own (with none
        saved: GPT-2's, and a vocabulary that holds it); else retokenize each block's text."""
        self.suite_tok = tokenizer
        self.hf_tok = hf.load_tokenizer(self.p.model, self.p.revision)
        vocab = self.net.model.config.vocab_size
        if self.hf_tok is None:
            if tokenizer.key != "gpt2" or vocab < GPT2_VOCAB:
                raise UserError(f"{WHERE}.model: {self.p.model} has no tokenizer of its own and the suite's "
                                f"({tokenizer.key}) is not its vocabulary; use tokenizer: gpt2 or save its "
                                f"tokenizer beside it")
            self.retokenized = False
        else:
            self.retokenized = not hf.same_tokenizer(tokenizer, self.net.model, self.hf_tok)

    @property
    def takes_time(self) -> bool:
        """Whether p_θ(x_0 | x_t) depends on t (time_value zero: the keyword is passed, always 0)."""
        return self.p.time_kwarg is not None and self.p.time_value != "zero"

    @classmethod
    def planned_params(cls, params) -> int | None:
        return params.n_params

    @classmethod
    def planned_eval_tokens(cls, params, seq_len: int) -> int:
        return 2 * seq_len if params.block_size else seq_len   # a block row's pass reads [x_t, x_0]

    def info(self) -> dict:
        """The settings the number depends on (module doc), the hub commit loaded (None for a
        local directory) and the weights' sha256 (bench.method.weights_sha256)."""
        p = self.p
        return {"model": p.model, "revision": hf.hub_revision(p.model, p.revision),
                "weights_sha256": self.weights_sha256, "trust_remote_code": p.trust_remote_code,
                "auto_class": p.auto_class, "mask_id": self.mask_id, "time_kwarg": p.time_kwarg,
                "time_value": p.time_value if p.time_kwarg else None, "logits": p.logits,
                "estimator": BLOCK_ESTIMATOR if p.block_size else BETA_ESTIMATOR, "block_size": p.block_size,
                "retokenized": self.retokenized, "special_tokens": p.special_tokens if self.retokenized else None,
                "counted_per": "suite token", "context": hf.context_length(self.net.model), "sampler": p.sampler,
                "n_params": sum(x.numel() for x in self.net.model.parameters())}

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cap: int | None = None) -> torch.Tensor:
        """log p_θ(x_0 | x_t) by SUBS (methods._masked.subs); ``cap``: ids ≥ cap excluded (samples
        drawn in the suite's vocabulary)."""
        return subs(self.capped(self.net(x_t, t).float(), cap), x_t, self.mask_id)

    def capped(self, logits: torch.Tensor, cap: int | None) -> torch.Tensor:
        if cap is not None and cap < logits.shape[-1]:
            logits = logits.clone()
            logits[..., cap:] = -torch.inf
        return logits

    def readout(self, logits: torch.Tensor, cap: int | None = None) -> torch.Tensor:
        """log p_θ(x_0 | x_t) at masked rows (R, V') of the logits: SUBS's [MASK] logit at −∞ (when
        the V' columns hold it)."""
        logits = self.capped(logits.float(), cap).clone()
        if self.mask_id < logits.shape[-1]:
            logits[..., self.mask_id] = -torch.inf
        return torch.log_softmax(logits, dim=-1)

    def check_length(self, n: int) -> None:
        ctx = hf.context_length(self.net.model)
        if n > ctx:
            raise UserError(f"{WHERE}.model: a block of {n} tokens in {self.p.model}'s ids exceeds its context "
                            f"of {ctx}; use a shorter data.seq_len")

    def retokenize(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, counted) (1, n) of one block's counted text in the model's tokenizer, framed by its
        special tokens (uncounted) when ``special_tokens``."""
        text = self.suite_tok.decode(x[c].tolist())
        enc = self.hf_tok(text, add_special_tokens=self.p.special_tokens, return_special_tokens_mask=True)
        ids = torch.tensor([enc["input_ids"]], dtype=torch.long)
        special = torch.tensor([enc.get("special_tokens_mask") or [0] * ids.shape[1]], dtype=torch.bool)
        return ids, ~special & (ids != self.mask_id)

    def block_ce(self, x_t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """(B, L) −log p_θ(x_0 | x_t^b, x_0^{<b}) from one pass over [x_t, x_0] (the checkpoint's own
        block-diff mask), the x_t half's logits (the first L rows) read with SUBS."""
        L = x0.shape[1]
        logits = self.net(torch.cat([x_t, x0], 1), torch.zeros(len(x0), device=x0.device))[:, :L]
        return subs_ce(logits.float(), x_t, x0, self.mask_id)

    def nll(self, x0, counted, u):
        if self.p.block_size:
            return nelbo_blocks(x0, counted, u, self.block_ce, self.mask_id, self.p.block_size)
        if not self.retokenized:
            self.check_length(x0.shape[1])
            return nelbo_beta(x0, counted, u, self.denoise, self.mask_id)
        out = torch.zeros(len(x0), dtype=torch.float64, device=x0.device)
        for i, (x, c) in enumerate(zip(x0.cpu(), counted.cpu())):
            ids, cnt = self.retokenize(x, c)
            if cnt.any():
                self.check_length(ids.shape[1])
                out[i] = nelbo_beta(ids.to(x0.device), cnt.to(x0.device), u[i:i + 1], self.denoise,
                                    self.mask_id)[0].double()
        return out

    def sampler_info(self, steps):
        return {"name": self.p.sampler, "retokenized": self.retokenized,
                **({"block_size": self.p.block_size} if self.p.block_size else {})}

    def frame(self) -> tuple[list[int], list[int]]:
        """The special tokens the model's tokenizer puts before and after a text ([CLS], [SEP])."""
        if not self.p.special_tokens:
            return [], []
        enc = self.hf_tok("a", add_special_tokens=True, return_special_tokens_mask=True)
        ids, sp = enc["input_ids"], enc.get("special_tokens_mask") or [0] * len(enc["input_ids"])
        first = sp.index(0) if 0 in sp else len(ids)
        last = len(sp) - sp[::-1].index(0) if 0 in sp else len(ids)
        return ids[:first], ids[last:]

    @torch.no_grad()
    def sample(self, n, steps=64, generator=None, *, given=None, keep=None):
        """L tokens drawn by the row's ``sampler`` (module doc) from all-[MASK]; in the model's
        ids between its special tokens when retokenized, then carried to the suite's ids."""
        if given is not None or keep is not None:
            raise UserError(f"{WHERE}: conditional sampling is not supported")
        if self.p.block_size:
            return self.sample_blocks(n, steps, generator)
        pre, post = self.frame() if self.retokenized else ([], [])
        width = min(self.L, hf.context_length(self.net.model)) - len(pre) - len(post)
        x = torch.full((n, width), self.mask_id, dtype=torch.long)
        x = torch.cat([torch.tensor([pre] * n, dtype=torch.long).view(n, -1), x,
                       torch.tensor([post] * n, dtype=torch.long).view(n, -1)], 1).to(self.device)
        cap = None if self.retokenized else self.V

        def den(x_t, t):
            return self.denoise(x_t, t, cap)
        if self.p.sampler == "confidence":
            x = confidence_sample(den, x, self.mask_id, steps, generator, self.p.float64_sampling)
        else:
            x = ancestral_sample(self.net, lambda rows: self.readout(rows, cap), x, self.mask_id, steps, generator,
                                 self.p.float64_sampling, cache=not self.takes_time)
        return x if not self.retokenized else self.to_suite_ids(x[:, len(pre):x.shape[1] - len(post)])

    def sample_blocks(self, n: int, steps: int, generator=None) -> torch.Tensor:
        """BD3-LM's sampler, uncached (methods._masked.block_sample), over the suite's V ids: block b
        from a pass over [x, x] (x: clean blocks < b, its x_t, [MASK]; b sees its x_t and x_0 < b)."""
        x = torch.full((n, self.L), self.mask_id, dtype=torch.long, device=self.device)
        t = torch.zeros(n, device=self.device)
        return block_sample(lambda x, s: self.readout(self.net(torch.cat([x, x], 1), t)[:, s, :self.V]), x,
                            self.p.block_size, self.mask_id, steps, generator, self.p.float64_sampling)

    def to_suite_ids(self, x: torch.Tensor) -> torch.Tensor:
        """The model's ids decoded with its tokenizer and encoded with the suite's, L per row (cut,
        or padded with the suite's EOS — id 0 where it has none)."""
        texts = [self.hf_tok.decode(r, skip_special_tokens=True) for r in x.tolist()]
        pad = self.suite_tok.eos_id if self.suite_tok.eos_id >= 0 else 0
        rows = [(ids + [pad] * self.L)[:self.L] for ids in self.suite_tok.encode_batch(texts)]
        return torch.tensor(rows, dtype=torch.long, device=x.device)


def save_tiny_bert(path: Path, seed: int = 0, sharpen: float = 1.0):
    """A tiny random BertForMaskedLM and a character-level WordPiece tokenizer (lower-case letters,
    digits and ASCII punctuation, with ``##`` continuations) saved with save_pretrained; returns
    the model. ``sharpen`` scales the output embeddings (a random init is near uniform)."""
    import string

    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + ch for ch in chars]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    model = BertForMaskedLM(cfg).eval()
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.mul_(sharpen)
    model.save_pretrained(path)
    return model
