"""The method interface: what a plugin writes (its math), and nothing else.

A method is an ``nn.Module`` built on the shared :class:`~bench.backbone.Backbone`. It owns:

- ``loss(x0, counted, u)``: the training objective, a scalar (nats per counted token).
- ``nll(x0, counted, u)``: a per-sequence NLL estimate in nats, summed over counted tokens,
  for ONE time draw per sequence ``u ∈ (0, 1)`` supplied by the harness (stratified per the
  protocol). It must be an upper bound on −log p(x0) in expectation over u (``likelihood =
  "bound"``), or exact and independent of u (``likelihood = "exact"``); methods without a
  bound set ``likelihood = "none"`` and tables show "—".
- ``sample(n, steps, generator)``: unconditional samples (n, L) of token ids, drawn with
  ``generator`` only, in ``steps`` network calls or fewer (the harness counts the real calls
  of ``self.net`` as the NFE). Methods never score their own samples (bench/metrics does).

``counted`` (B, L) bool marks the tokens that count under the protocol; the others (padding,
an injected BOS) are given to the model as clean context and never scored or noised.
``u`` is mapped by each method to its own time: t = u in continuous time, ⌈u·T⌉ in discrete.

A method with ``trains = False`` (a pretrained model, e.g. ``hf-causal-lm``) is evaluated as
given: the runner never calls the training loop for it.

Parameters are a pydantic ``Params`` schema with defaults; ``variants`` are named presets of
them (``sedd: {absorb: {graph: absorb}, uniform: {graph: uniform}}``). Later families add
stages (encoder → decoder) by overriding ``stages``; the default is one training stage.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from bench.backbone import Backbone
from bench.config import BackboneConfig


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Params(BaseModel):
    """Base for a method's parameter schema (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Method(nn.Module):
    name: ClassVar[str] = "?"
    Params: ClassVar[type[BaseModel]] = NoParams
    variants: ClassVar[dict[str, dict]] = {}
    likelihood: ClassVar[Literal["exact", "bound", "none"]] = "bound"
    time: ClassVar[Literal["continuous", "discrete", "none"]] = "continuous"
    causal: ClassVar[bool] = False
    stages: ClassVar[tuple[str, ...]] = ("train",)
    display: ClassVar[str | None] = None   # default label in tables, e.g. "GPT-2"
    trains: ClassVar[bool] = True          # False: evaluated as given (a pretrained model); the
                                           # runner skips the training loop and train: is unused
    sampler_steps: ClassVar[bool] = True   # False: sample() ignores the step budget (AR: NFE = L)

    def __init__(self, params: BaseModel, backbone: BackboneConfig, vocab_size: int, seq_len: int):
        super().__init__()
        self.p, self.V, self.L = params, vocab_size, seq_len
        self.net = self.build_network(backbone)

    # --- what a method may override ---------------------------------------------------------
    def build_network(self, cfg: BackboneConfig) -> nn.Module:
        """Default: token ids 0..V (V = the method's extra token: [MASK] or [BOS]) → V logits."""
        return Backbone(cfg, vocab_in=self.V + 1, vocab_out=self.V, seq_len=self.L, causal=self.causal)

    @classmethod
    def default_label(cls, params: BaseModel) -> str:
        return cls.display or cls.name.upper()

    @classmethod
    def check_compatible(cls, params: dict, data, where: str) -> None:
        """Raise UserError if this method cannot run on ``data`` (e.g. needs a tokenizer)."""

    def bind_tokenizer(self, tokenizer) -> None:
        """Called once by the runner with the suite's tokenizer (bench.data.tokenizers) before
        training or evaluation. Default: nothing; a pretrained model that reads text (not the
        suite's ids) keeps it to detokenize."""

    def info(self) -> dict:
        """Facts about this run's model worth recording beside its numbers (``method_info`` in
        result.json), e.g. a pretrained model's name and whether text was retokenized."""
        return {}

    @classmethod
    def supports(cls) -> list[str]:
        out = {"exact": ["exact likelihood"], "bound": ["likelihood bound"], "none": []}[cls.likelihood]
        if cls.sample is not Method.sample:
            out.append("sampling")
        return out

    def bounds(self) -> str:
        """What the ``nll`` estimate upper-bounds (recorded beside every bound row)."""
        return "the sampled model's NLL" if self.likelihood == "bound" else ""

    def forward(self, x0, counted, u):
        return self.loss(x0, counted, u)

    def loss(self, x0: torch.Tensor, counted: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.nll(x0, counted, u).sum() / counted.sum().clamp(min=1)

    def nll(self, x0: torch.Tensor, counted: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} has no likelihood")

    def sample(self, n: int, steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} has no sampler")

    @property
    def mask_id(self) -> int:
        """The extra input id V reserved by the default network: [MASK] for absorbing-state
        methods ([BOS] for the AR baseline)."""
        return self.V

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def gumbel_argmax(logits: torch.Tensor, generator=None, float64: bool = False) -> torch.Tensor:
    """Categorical sample via the Gumbel-max trick; float64 avoids the truncation that lowers
    generative perplexity in float32 (flow_matching#27)."""
    logits = logits.double() if float64 else logits.float()
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    return (logits - torch.log(-torch.log(u.clamp_min(1e-30)))).argmax(-1)
