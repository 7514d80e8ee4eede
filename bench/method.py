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
- ``sample(n, steps, generator, given=ids, keep=mask)``: a conditional draw — the positions
  where ``keep`` (n, L) is true are ``given`` (n, L), the rest generated, in the same budget.
  What patterns a method accepts is its ``conditioning`` ("any", "prefix" or "none"); a
  sampler checks its arrays with ``bench.condition.condition`` (one place: shapes, ids, the
  prefix rule), which returns None when nothing is kept (the unconditional draws). The
  likelihood side is ``bench.evaluate.conditional_nll``: ``nll`` with counted = ~keep.

``counted`` (B, L) bool marks the tokens that count under the protocol; the others (padding,
an injected BOS) are given to the model as clean context and never scored or noised.
``u`` is mapped by each method to its own time: t = u in continuous time, ⌈u·T⌉ in discrete.

A method with ``trains = False`` (a pretrained model, e.g. ``hf-causal-lm``) is evaluated as
given: the runner never calls the training loop for it.

Parameters are a pydantic ``Params`` schema with defaults; ``variants`` are named presets of
them (``sedd: {absorb: {graph: absorb}, uniform: {graph: uniform}}``).

Context: the harness builds a method with a :class:`Context` (the suite's tokenizer), so a
method that reads text (a pretrained model, a frozen encoder with its own tokenizer) has it
from construction on: ``self.context.tokenizer``. A method whose text crosses into another
tokenizer (detokenise with the suite's, retokenise with the encoder's) says how in
``info()["text_crossing"]``; the runner records it in the run's protocol block.

Stages: ``stages`` names the training stages in order (default one stage, ``"train"``), e.g.
``("autoencoder", "diffusion")``. Each stage trains ``stage_parameters(stage)`` (default:
every parameter) on ``stage_loss(stage, x0, counted, u)`` (default: ``loss``) with its own
optimizer, schedule, EMA and checkpoints; ``stage_defaults[stage]`` gives its default
training settings (TrainConfig fields: steps, lr, batch_size, ...), which the suite's
``train: {stages: {<stage>: {...}}}`` overrides. The harness sets ``current_stage`` before
each stage; ``forward`` routes to that stage's loss; ``before_step(stage, k)`` is called before
each optimizer step k (a schedule keyed to the step, e.g. attention-mask annealing).

Frozen parts: ``add_frozen(name, module, source)`` holds a pretrained module that is never
trained: it is no child of the method, so it is outside ``parameters()``, ``state_dict()``,
the optimizer, EMA, gradient sync and checkpoints; it moves with the method (``.to()``) and
stays in eval mode. A run records its ``source`` and the sha256 of its weights
(``info()["frozen"]``) and, when reloaded, loads it again from ``source`` and refuses to go on
when the hash differs.

Frozen features: a method whose frozen parts turn each block into something no training step
changes (an encoder's outputs) returns it from ``frozen_features(x0, counted)``, says what
else it depends on in ``frozen_features_key()``, and reads it through ``features(x0,
counted)``: the harness computes it once per (frozen weights, blocks) and memory-maps it
(bench/data/frozencache.py); a batch of blocks it does not hold is computed as before.

The training set: before the first stage of a fresh run the harness calls
``fit_training_set(blocks)`` once with the run's training blocks (under the training autocast,
without gradient, on the training device), for state a method computes from the whole
training set (e.g. TEncDM's normaliser statistics over every block's encodings); that state
must live in buffers, because a resumed run is not given the blocks again: its checkpoint
brings the state. ``training_set_encodes(n)`` says how many blocks' frozen features that pass
reads (the frozen-features cache counts them when it decides whether to build).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from bench.backbone import Backbone
from bench.config import BackboneConfig
from bench.errors import UserError
from bench.models import weights_sha256  # noqa: F401 (part of the plugin API)


@dataclass(frozen=True)
class Context:
    """What the harness hands a method at construction, beyond its params."""

    tokenizer: object | None = None   # the suite's tokenizer (bench.data.tokenizers): .encode(text) -> ids,
                                      # .decode(ids) -> text, .vocab_size, .eos_id


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
    stages: ClassVar[tuple[str, ...]] = ("train",)          # ordered training stages
    stage_defaults: ClassVar[dict[str, dict]] = {}          # per stage: defaults of TrainConfig fields
    display: ClassVar[str | None] = None   # default label in tables, e.g. "GPT-2"
    trains: ClassVar[bool] = True          # False: evaluated as given (a pretrained model); the
                                           # runner skips the training loop and train: is unused
    sampler_steps: ClassVar[bool] = True   # False: sample() ignores the step budget (AR: NFE = L)
    # What sample(..., given, keep) and the conditional likelihood accept (bench/condition.py):
    # "any" keep pattern, a "prefix" only (left-to-right models), or "none" (tables show "—").
    # An instance may narrow it (hf-causal-lm retokenizing: "none").
    conditioning: ClassVar[Literal["any", "prefix", "none"]] = "none"
    # The bound-estimator settings of the protocol (bench.config.BOUND_SETTINGS: eval.bound_steps,
    # eval.t_proposal) this method's ``nll`` honours; a suite setting another one for a bound
    # method is an error (bench.suite), so no row claims an estimator it did not use.
    protocol_settings: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, params: BaseModel, backbone: BackboneConfig, vocab_size: int, seq_len: int,
                 context: Context | None = None):
        super().__init__()
        self.p, self.V, self.L = params, vocab_size, seq_len
        self.context = context if context is not None else Context()
        self.current_stage = self.stages[0]   # set by the harness before each stage
        self.net = self.build_network(backbone)

    # --- what a method may override ---------------------------------------------------------
    def build_network(self, cfg: BackboneConfig) -> nn.Module:
        """Default: token ids 0..V (V = the method's extra token: [MASK] or [BOS]) → V logits."""
        return Backbone(cfg, vocab_in=self.V + 1, vocab_out=self.V, seq_len=self.L, causal=self.causal)

    @classmethod
    def default_label(cls, params: BaseModel) -> str:
        return cls.display or cls.name.upper()

    @classmethod
    def planned_params(cls, params: BaseModel) -> int | None:
        """The parameter count ``--dry-run`` costs a row that builds no network (``trains = False``:
        its model is loaded, not built, and a dry run loads nothing); None: not known (n/a)."""
        return None

    @classmethod
    def planned_eval_tokens(cls, params: BaseModel, seq_len: int) -> int:
        """The ids one ``nll`` pass feeds the network per block of ``seq_len`` (``--dry-run``'s
        evaluation FLOPs are 2·N per id fed): ``seq_len``; 2·seq_len for an [x_t, x_0] input
        (hf-masked-diffusion's BD3-LM rows)."""
        return seq_len

    @classmethod
    def check_compatible(cls, params: dict, data, where: str) -> None:
        """Raise UserError if this method cannot run on ``data`` (e.g. needs a tokenizer)."""

    def info(self) -> dict:
        """Facts about this run's model worth recording beside its numbers (``method_info`` in
        result.json), e.g. a pretrained model's name and whether text was retokenized. An
        override extends ``super().info()`` (it holds ``frozen``); ``text_crossing`` (how text
        crosses from the suite's tokenizer to another one, when it does) goes into the
        record's protocol block."""
        return {"frozen": self.frozen_info()} if self._frozen else {}

    # --- stages -----------------------------------------------------------------------------
    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        """Parameters that ``stage`` trains. Default: every parameter of the module that
        requires grad as built (frozen parts are never parameters of the module, see
        add_frozen). The harness asks with requires_grad as built, sets requires_grad to
        exactly these during the stage and builds that stage's optimizer (and EMA) over them.
        Under DDP each of them must get a gradient from ``stage_loss(stage, ...)``."""
        return [p for p in self.parameters() if p.requires_grad]

    def before_step(self, stage: str, step: int) -> None:
        """Called by the training loop before optimizer step ``step`` (0-based, within
        ``stage``; a resumed run starts at its checkpoint's step), on every rank: for a
        curriculum keyed to the step (mdlm's ``anneal_steps``). Default: nothing."""

    def stage_loss(self, stage: str, x0: torch.Tensor, counted: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The stage's scalar training loss (per counted token). Default: ``loss``."""
        return self.loss(x0, counted, u)

    # --- frozen parts -----------------------------------------------------------------------
    def add_frozen(self, name: str, module: nn.Module, source: str) -> None:
        """Hold a frozen pretrained module (e.g. an HF encoder) as attribute ``name``: not an
        nn.Module child, so it is outside parameters(), state_dict(), the optimizer, EMA, DDP
        gradient sync and checkpoints; requires_grad False; eval mode always; moved with the
        method by .to()/.cuda()/.float(); ``source`` (HF name or local path) and the sha256 of
        its weights are reported by info()["frozen"] and checked when a run is reloaded (the
        module is loaded again from ``source``, never from our checkpoint)."""
        if name in self._frozen or hasattr(self, name):
            raise ValueError(f"{type(self).__name__}.add_frozen: '{name}' is already an attribute")
        module.requires_grad_(False)
        module.eval()   # and so it stays: the method's train() reaches its children only
        self._frozen[name] = (module, str(source), weights_sha256(module))
        object.__setattr__(self, name, module)   # bypasses nn.Module.__setattr__: no child module

    @property
    def _frozen(self) -> dict[str, tuple[nn.Module, str, str]]:
        """name -> (module, source, sha256), kept outside nn.Module's registries."""
        return self.__dict__.setdefault("_frozen_parts", {})

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {k: m for k, (m, _, _) in self._frozen.items()}

    def frozen_info(self) -> dict[str, dict[str, str]]:
        """``{name: {source, sha256}}`` of every frozen module (as loaded at construction)."""
        return {k: {"source": src, "sha256": sha} for k, (_, src, sha) in self._frozen.items()}

    def check_frozen(self, recorded: dict | None) -> None:
        """UserError (one line, naming the source) unless every frozen module loaded now is the
        one a run recorded (``recorded``: a ``frozen_info()`` of that run)."""
        for k, want in (recorded or {}).items():
            have = self.frozen_info().get(k)
            if have is None:
                raise UserError(f"{want.get('source')}: the run was trained with a frozen module '{k}' "
                                f"this method no longer holds")
            if have["sha256"] != want.get("sha256"):
                raise UserError(f"{have['source']}: frozen module '{k}' changed since the run recorded it "
                                f"(sha256 {have['sha256'][:12]}… ≠ {str(want.get('sha256'))[:12]}…); restore "
                                f"those weights or start a new run")

    # --- frozen features --------------------------------------------------------------------
    def frozen_features_key(self) -> dict | None:
        """None (the default): nothing to cache. Otherwise a JSON-able dict of what, besides
        the frozen parts' weights (their sha256) and the blocks themselves, determines
        ``frozen_features`` (e.g. the space, the encoder's tokenizer and config); the harness
        then caches ``frozen_features`` of every training block (bench/data/frozencache.py)."""
        return None

    def frozen_features(self, x0: torch.Tensor, counted: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the frozen parts compute from a batch of blocks: ``{name: (B, …) tensor}``,
        names usable as file names. Row i must be a function of block i alone (``x0[i]``,
        ``counted[i]``) and of the frozen weights: never of trained parameters, of the batch's
        other rows or of random draws (a cached row is read back in any batch)."""
        raise NotImplementedError(f"{type(self).__name__} declares no frozen features")

    def features(self, x0: torch.Tensor, counted: torch.Tensor) -> dict[str, torch.Tensor]:
        """``frozen_features(x0, counted)`` (no gradient): read from the cache the harness
        attached (``use_frozen_cache``) when it holds every block of the batch, else computed."""
        cache = self.__dict__.get("_frozen_cache")
        got = cache.lookup(x0, counted) if cache is not None else None
        if got is not None:
            return got
        with torch.no_grad():
            return self.frozen_features(x0, counted)

    # --- the training set -------------------------------------------------------------------
    def fit_training_set(self, blocks) -> str | None:
        """Compute state from the whole training set (``blocks``: bench.data.Blocks, or a
        StreamBlocks for a synthetic stream) into buffers, before the first stage of a fresh
        run (module docstring). Returns a line for the run's log, or None (the default: nothing
        to compute)."""
        return None

    def training_set_encodes(self, n_blocks: int) -> int:
        """How many of the ``n_blocks`` training blocks ``fit_training_set`` reads the frozen
        features of (default 0)."""
        return 0

    def use_frozen_cache(self, cache) -> None:
        """Read ``features`` from ``cache`` (its ``lookup(x0, counted)`` gives the batch's
        features or None); None detaches it. Kept outside nn.Module's registries."""
        self.__dict__["_frozen_cache"] = cache

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for m in self.frozen_modules().values():
            m._apply(fn, *args, **kwargs)   # .to(), .cuda(), .float() move the frozen parts too
        return self

    @classmethod
    def supports(cls) -> list[str]:
        out = {"exact": ["exact likelihood"], "bound": ["likelihood bound"], "none": []}[cls.likelihood]
        if cls.sample is not Method.sample:
            out.append("sampling")
        if cls.conditioning != "none":
            out.append(f"conditioning ({cls.conditioning})")
        return out

    @classmethod
    def example_params(cls, workdir: Path) -> dict:
        """Params (``cls.Params(**…)``) of a small instance that builds offline: what the
        contract test (tests/test_method_contract.py) checks every registered method and
        variant with. Default: the schema's defaults. A method whose defaults need a download
        (a hub model) saves a tiny stand-in under ``workdir`` and names it here."""
        return {}

    @property
    def float64_sampling(self) -> bool | None:
        """Whether ``sample`` draws its categorical choices in float64 (float32 Gumbel noise
        is truncated and lowers generative perplexity, flow_matching#27); recorded beside
        every sample set. A method declares it with a ``float64_sampling: bool`` field of its
        Params; None: the method declares none."""
        return self.p.float64_sampling if "float64_sampling" in type(self.p).model_fields else None

    def self_condition_chain(self, w: torch.Tensor, counted: torch.Tensor, t: float, K: int):
        """The self-conditioning magnitude experiment (bench.experiments): from one z_t ~
        q(z_t | w), x̂0^(k) = f(z_t, t, x̂0^(k−1)) with x̂0^(0) = 0, k = 1..K; returns the
        mean per-token ‖x̂0^(k)‖ over counted tokens (K floats) and the mean ‖e‖ of the clean
        embeddings. None (the default): the method has no such chain (no self-conditioning
        input, or no embedding space), and the experiment skips its runs."""
        return None

    def bounds(self) -> str:
        """What the ``nll`` estimate upper-bounds (recorded beside every bound row, after
        ``use_protocol``)."""
        return "the sampled model's NLL" if self.likelihood == "bound" else ""

    def use_protocol(self, protocol) -> None:
        """The run's likelihood ``Protocol`` (bench.config), handed over by the harness before
        ``bounds`` and ``nll`` (bench.evaluate.per_sequence_nll, bench.runner): a method that
        honours any of its ``protocol_settings`` keeps them here. Default: nothing to keep."""

    def sampler_info(self, steps: int | None) -> dict | None:
        """What ``sample(n, steps)`` draws from, recorded on every sample line (bench.samples),
        e.g. where a continuous sampler ends and how it makes the word; None: nothing to add."""
        return None

    def forward(self, x0, counted, u):
        return self.stage_loss(self.current_stage, x0, counted, u)

    def loss(self, x0: torch.Tensor, counted: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.nll(x0, counted, u).sum() / counted.sum().clamp(min=1)

    def nll(self, x0: torch.Tensor, counted: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} has no likelihood")

    def sample(self, n: int, steps: int, generator: torch.Generator | None = None, *,
               given: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
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
