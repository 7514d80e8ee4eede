"""Typed configuration: the single source of every schema (suite YAML, run specs, protocol).

The CLI, YAML validation and ``tdbench methods`` all derive from these pydantic models.
bench.config_io reads them from YAML files and turns validation errors into one-line
:class:`UserError` messages naming the key path.
"""
from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    Field,
    PositiveFloat,
    PositiveInt,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from bench.config_data import MAX_SEQ_LEN, DataConfig, DatasetRef, Strict, SuiteData, TokenizerConfig, tokenizer_key  # noqa: F401
from bench.config_io import drop_defaults
from bench.metrics import MetricsConfig
from bench.names import Name

# Bounds on what sizes a run: generous (beyond every published setting of these models) but
# finite, so that a typo (1e9) is a one-line error at validation instead of a run that fails
# or exhausts memory hours later. Raise one here if a real experiment needs more.
MAX_BATCH = 65_536         # sequences per optimizer step or eval batch (GPT-3 used ~3,200 of 2048)
MAX_T_SAMPLES = 4096       # t draws per sequence (papers use 1-1000)
MAX_SAMPLES = 1_000_000    # samples per step budget per run (MAUVE uses 5,000)
MAX_LAYERS, MAX_HEADS = 1024, 1024
MAX_WIDTH = 65_536         # hidden, cond_dim (GPT-3 175B: 12,288)
MAX_BOUND_STEPS = 1_000_000   # T of a discrete-time bound (eval.bound_steps)
MAX_SEED = 2**31           # seeds are 0 <= seed < 2**31: every RNG (numpy's legacy one too) takes them
Seed = Annotated[int, Field(ge=0, lt=MAX_SEED)]

PROTOCOL_VERSION = "tdbench-lik/1"


# ----------------------------------------------------------------------------- model sizes
class BackboneConfig(Strict):
    """Transformer dimensions. ``cond_dim`` is the width of the time-conditioning vector."""

    layers: int = Field(gt=0, le=MAX_LAYERS)
    hidden: int = Field(gt=0, le=MAX_WIDTH)
    heads: int = Field(gt=0, le=MAX_HEADS)
    cond_dim: int = Field(128, gt=0, le=MAX_WIDTH)
    mlp_ratio: int = Field(4, gt=0, le=64)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # The MLP's nonlinearity: GELU with the tanh approximation (GPT-2's gelu_new, MDLM's DiT) or
    # the exact erf form (BERT's); they differ by at most 4.7e-4. On the 2-core AVX2 development
    # CPU torch's tanh kernel is 3.8x slower (forward + backward) than the erf one: 4-6% of the
    # cold smoke's CPU time (docs/performance.md). Absent from the dump at its default, so every
    # older run id stays.
    activation: Literal["gelu_tanh", "gelu"] = "gelu_tanh"

    @model_serializer(mode="wrap")
    def _drop_default_activation(self, handler):
        return drop_defaults(handler(self), activation="gelu_tanh")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide hidden ({self.hidden})")
        if (self.hidden // self.heads) % 2:
            raise ValueError(f"hidden/heads = {self.hidden // self.heads} must be even (rotary embeddings)")
        return self


NAMED_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(layers=2, hidden=128, heads=4),
    "small": dict(layers=12, hidden=768, heads=12),   # SEDD/MDLM small (GPT-2 small)
    "medium": dict(layers=24, hidden=1024, heads=16),  # SEDD/MDLM medium (GPT-2 medium)
}


# ----------------------------------------------------------------------------- training
class StageSettings(Strict):
    """The training settings a stage of a multi-stage method may set on its own (each stage
    has its own optimizer, schedule, EMA and checkpoints)."""

    steps: PositiveInt = 300
    batch_size: int = Field(16, gt=0, le=MAX_BATCH)  # global batch (sequences per optimizer step)
    lr: PositiveFloat = 1e-3
    warmup: int = Field(50, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, ge=0.0)  # 0 disables clipping
    ema: float = Field(0.0, ge=0.0, lt=1.0)  # 0 disables; SEDD/MDLM use 0.9999
    ckpt_every: PositiveInt = 100


STAGE_FIELDS: tuple[str, ...] = tuple(StageSettings.model_fields)

# The suite's ``train.stages.<stage>``: the same fields, each optional (unset: the method's
# stage_defaults, then the suite's top-level train value, then the default above).
StageOverrides = create_model(
    "StageOverrides", __base__=Strict,
    **{k: (Optional[Annotated[(f.annotation, *f.metadata)]], None) for k, f in StageSettings.model_fields.items()})


class TrainConfig(StageSettings):
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    engine: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: Literal[0, 1, 2, 3] = 0
    # torch.compile the training forward (inductor). Same math up to float rounding; a run id
    # only includes it when true, so existing run ids are unchanged.
    compile: bool = False
    # Per-stage settings of a multi-stage method (Method.stages). In a suite: overrides, by
    # stage name, of the fields above. In a run spec: every stage of the method, resolved
    # (resolve_stages); empty for a single-stage method, whose one stage is the fields above.
    stages: dict[str, StageOverrides] = {}

    @model_serializer(mode="wrap")
    def _drop_no_stages(self, handler):
        # Without stages the dump (hence every single-stage run id) is what it was before them.
        return drop_defaults(handler(self), stages={})

    def for_stage(self, stage: str) -> "TrainConfig":
        """The settings stage ``stage`` trains with (a run spec's resolved stage, or these)."""
        given = self.stages.get(stage)
        if given is None:
            return self.model_copy(update={"stages": {}})
        return self.model_copy(update={**given.model_dump(exclude_none=True), "stages": {}})

    @property
    def total_steps(self) -> int:
        return sum(self.for_stage(k).steps for k in self.stages) if self.stages else self.steps

    @property
    def train_sequences(self) -> int:
        """Sequences seen over the whole training (all stages)."""
        cfgs = [self.for_stage(k) for k in self.stages] or [self]
        return sum(c.steps * c.batch_size for c in cfgs)


def resolve_stages(train: TrainConfig, stages: tuple[str, ...], defaults: dict[str, dict]) -> TrainConfig:
    """A method's training settings per stage. Each field: the suite's ``train.stages.<stage>``
    value, else the method's ``stage_defaults[stage]``, else the suite's top-level ``train``
    value, else the default. A single-stage method's one stage becomes the top-level fields
    (``stages`` stays empty: its run id is what it was before stages existed)."""
    top = {k: getattr(train, k) for k in STAGE_FIELDS if k in train.model_fields_set}
    out = {}
    for st in stages:
        given = train.stages.get(st)
        out[st] = StageSettings(**{**top, **defaults.get(st, {}),
                                   **(given.model_dump(exclude_none=True) if given else {})})
    if len(stages) == 1:
        return train.model_copy(update={**out[stages[0]].model_dump(), "stages": {}})
    return train.model_copy(update={"stages": {k: StageOverrides(**v.model_dump()) for k, v in out.items()}})


# ----------------------------------------------------------------------------- evaluation
# Protocol presets (``eval.protocol``): the published conventions of "which tokens count".
# Each fixes the packing and which injected specials are scored; the other knobs stay the
# suite's (the papers' block length, 1024, is data.seq_len in suites/sedd-table.yaml etc.).
PROTOCOL_PRESETS: dict[str, dict] = {
    "sedd": {"packing": "eos_per_doc", "count_bos": False, "count_eos": True,
             "counted": "SEDD: document tokens + the EOS appended per document (no BOS); padding excluded"},
    "mdlm": {"packing": "bos_eos_per_block", "count_bos": True, "count_eos": True,
             "counted": "MDLM: [BOS] seq_len-2 tokens [EOS] per block, all counted; padding excluded"},
    "no-specials": {"packing": "eos_per_doc", "count_bos": False, "count_eos": False,
                    "counted": "no-specials: document tokens only; the EOS between documents is context, "
                               "never counted; padding excluded"},
}


# The bound's estimator settings (eval.bound_steps, eval.t_proposal) and their defaults: a
# method whose bound honours one lists it in ``Method.protocol_settings``.
BOUND_SETTINGS: dict[str, Any] = {"bound_steps": None, "t_proposal": "uniform"}


INFILL_SETTINGS = ("span", "random", "rocstories")


class InfillConfig(Strict):
    """``eval.infill``: the infilling benchmark (bench/infill.py, docs/protocol.md#infilling).
    From the first ``blocks`` fully packed test blocks of each eval set, positions are hidden and
    each method fills them given the rest (``bench.condition.conditional_sample``; a left-to-right
    method given only what precedes the first hidden position): ``span`` hides the middle
    ``round(span_fraction·seq_len)`` positions (a span of known length), ``random`` a fraction
    drawn uniformly from ``random_fraction`` of each block's positions, ``rocstories`` the third
    sentence of a five-sentence ROCStories story (DiffuLLaMA's setting; only on a ``rocstories``
    eval set). Fills are drawn at each of ``steps`` (default: ``eval.sample_steps``)."""

    settings: list[Literal["span", "random", "rocstories"]] = Field(["span", "random"], min_length=1)
    blocks: int = Field(64, gt=0, le=MAX_SAMPLES)        # held-out blocks (stories) per eval set and setting
    span_fraction: float = Field(0.25, gt=0.0, lt=1.0)    # the middle span's share of seq_len
    random_fraction: tuple[float, float] = (0.15, 0.5)    # the random pattern's share, drawn per block
    steps: Optional[list[PositiveInt]] = Field(None, min_length=1)   # None: eval.sample_steps
    batch_size: int = Field(32, gt=0, le=MAX_BATCH)       # blocks per conditional sampler call
    seed: Seed = 0                                        # the random pattern and the samplers' generators

    @field_validator("settings")
    @classmethod
    def _distinct(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"each setting once (got {', '.join(v)})")
        return v

    @field_validator("random_fraction")
    @classmethod
    def _fraction(cls, v):
        lo, hi = v
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"random_fraction: need 0 < low <= high < 1, got [{lo}, {hi}]")
        return v


class EvalConfig(Strict):
    """The suite's ``eval:`` block: the knobs of the likelihood protocol."""

    protocol: Optional[Literal["sedd", "mdlm", "no-specials"]] = None  # a preset (PROTOCOL_PRESETS)
    t_samples: int = Field(8, gt=0, le=MAX_T_SAMPLES)  # K: t samples per sequence
    t_sampling: Literal["stratified", "antithetic", "iid"] = "stratified"
    t_min: float = Field(0.0, ge=0.0, lt=1.0)     # 0 keeps the bound valid (no truncation)
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    packing: Literal["eos_per_doc", "bos_eos_per_block", "none"] = "eos_per_doc"
    max_blocks: Optional[PositiveInt] = 256       # first N blocks of each eval set's test split
    batch_size: int = Field(32, gt=0, le=MAX_BATCH)
    seed: Seed = 1234
    samples: int = Field(0, ge=0, le=MAX_SAMPLES)  # unconditional samples per step budget per run
    sample_steps: list[PositiveInt] = Field([64], min_length=1)  # step budgets, e.g. [16, 64, 256]
    # Learning curve (learning.png): every ``curve_every`` training steps (0: off), the NLL on the
    # first ``curve_blocks`` blocks of the first eval set with ``curve_t_samples`` t draws.
    curve_every: int = Field(0, ge=0)
    curve_blocks: PositiveInt = 16
    curve_t_samples: int = Field(2, gt=0, le=MAX_T_SAMPLES)
    # Also count per byte: a ``bpb`` row (bits per UTF-8 byte of the decoded counted tokens,
    # Σ NLL / (ln 2 · Σ bytes)) beside ppl — the unit that stays comparable when a row scores
    # retokenised text (hf-causal-lm with its own tokenizer) or tokenizers differ across suites.
    per_byte: bool = False
    # The continuous-time bound's estimator (docs/protocol.md#what-a-bound-bounds): ``bound_steps``
    # T scores the discrete-time VLB of a T-step ancestral sampler (VDM eq. 13) instead of T = ∞;
    # ``t_proposal`` draws t uniformly, ∝ the bound's weight ½γ′e^{−γ}, uniformly in log-SNR, from
    # the half-and-half mixture of those two, or from a density fitted to a pilot pass of the
    # evaluation's first batch (adaptive; exact importance weights throughout). Read by the
    # methods whose ``protocol_settings`` name them (bench.suite checks); at their defaults
    # they are absent from the dump, so existing run ids stay.
    bound_steps: Optional[int] = Field(None, gt=0, le=MAX_BOUND_STEPS)
    t_proposal: Literal["uniform", "weight", "log-snr", "mixture", "adaptive"] = "uniform"
    # The infilling benchmark (InfillConfig); None: off, and absent from the dump (run ids unchanged).
    infill: Optional[InfillConfig] = None

    @field_validator("sample_steps", mode="before")
    @classmethod
    def _one_budget(cls, v):
        return [v] if isinstance(v, int) and not isinstance(v, bool) else v

    @model_validator(mode="before")
    @classmethod
    def _preset_packing(cls, v):
        """A preset fixes the packing; an explicit, different ``packing`` is a contradiction."""
        if isinstance(v, dict) and v.get("protocol") in PROTOCOL_PRESETS:
            want = PROTOCOL_PRESETS[v["protocol"]]["packing"]
            if v.get("packing", want) != want:
                raise ValueError(f"packing: {v['packing']} contradicts protocol {v['protocol']} "
                                 f"(which packs {want}); drop one of them")
            v = {**v, "packing": want}
        return v

    @model_serializer(mode="wrap")
    def _drop_unset_preset(self, handler):
        # Without a preset the dump (hence every run id) is what it was before presets existed.
        # Likewise per_byte: off, it leaves every existing run id unchanged.
        return drop_defaults(handler(self), protocol=None, per_byte=False, infill=None, **BOUND_SETTINGS)

    @property
    def infill_steps(self) -> list[int]:
        """The step budgets infill fills are drawn at (``infill.steps``, else ``sample_steps``)."""
        return list((self.infill and self.infill.steps) or self.sample_steps)

    @model_validator(mode="after")
    def _untruncated_estimators(self):
        if self.t_min > 0 and any(getattr(self, k) != v for k, v in BOUND_SETTINGS.items()):
            raise ValueError(f"t_min: must be 0 with bound_steps or a t_proposal other than uniform (a truncated "
                             f"estimate is defined for the uniform continuous-time form only), got {self.t_min}")
        return self

    @property
    def counting(self) -> tuple[bool, bool]:
        """(count_bos, count_eos): which injected specials are scored."""
        p = PROTOCOL_PRESETS.get(self.protocol or "")
        return (p["count_bos"], p["count_eos"]) if p else (False, True)


class Protocol(Strict):
    """The likelihood-evaluation protocol, recorded beside every number.

    Tokens counted: every real token of the test split after packing, i.e. the document's
    tokens plus the one EOS appended per document (``eos_per_doc``, SEDD's convention); the
    padding of the last partial block never counts; an injected BOS (``bos_eos_per_block``)
    never counts, the injected EOS does. Perplexity = exp(sum NLL / sum counted tokens).
    """

    version: str = PROTOCOL_VERSION
    tokenizer: str
    seq_len: int
    packing: str
    counted: str
    t_samples: int
    t_sampling: str
    t_min: float
    confidence: float
    max_blocks: Optional[int]
    split: str = "test"
    preset: str = "custom"   # eval.protocol, or "custom" (the packing settings as given)
    bound_steps: Optional[int] = None   # T of the discrete-time VLB; None: continuous time (T = ∞)
    t_proposal: str = "uniform"         # how the bound's t is drawn: uniform, or ∝ its weight

    @property
    def id(self) -> str:
        # "custom" protocols hash as they did before presets existed, and the bound's estimator
        # settings at their defaults as before they existed (ids stay stable)
        drop = {k for k, v in BOUND_SETTINGS.items() if getattr(self, k) == v}
        return short_hash(self.model_dump(exclude=drop | ({"preset"} if self.preset == "custom" else set())))[:8]


# ----------------------------------------------------------------------------- launching
class LaunchConfig(Strict):
    executor: Literal["local", "debug", "slurm"] = "local"
    parallel: Optional[PositiveInt] = None   # local: runs at once (default: min(#runs, cores))
    threads: Optional[PositiveInt] = None    # torch threads per run (default: cores / parallel)
    cluster: Optional[str] = None            # slurm profile name or path
    timeout_min: PositiveInt = 60            # per job; on slurm it overrides the profile's time_min
    # Processes per run (where it runs, not what it computes: the global batch is fixed by
    # train.batch_size, so these are not part of the run id).
    nodes: PositiveInt = 1
    tasks_per_node: PositiveInt = 1
    micro_batch: Optional[PositiveInt] = None  # sequences per forward per process (grad. accumulation)
    # Experiment trackers every run logs to through Accelerate (bench.tracking): loss, lr, tokens/s,
    # the eval curve, the final metrics. Empty: off (nothing is imported, no tracking/ directory).
    log_with: list[Literal["tensorboard", "wandb", "trackio", "mlflow"]] = []

    @field_validator("log_with", mode="before")
    @classmethod
    def _one_tracker(cls, v):
        return [v] if isinstance(v, str) else v


# ----------------------------------------------------------------------------- methods
class MethodEntry(Strict):
    """One row of the suite's ``methods:`` list: registry name, display label, parameters
    (validated by the method's own ``Params`` schema, defaults filled in)."""

    method: str
    label: Optional[str] = None
    params: dict[str, Any] = {}
    sizes: Optional[list[str]] = None   # only these sizes (e.g. a pretrained GPT-2 small row)


# ----------------------------------------------------------------------------- suite
# ----------------------------------------------------------------------------- experiments
class SelfCondMagnitude(Strict):
    """From the same z_t (one ε per eval block), predict x̂0 ``iterations`` times feeding each
    prediction back as the self-conditioning input; record mean ‖x̂0‖ per token against the
    iteration, for each t, for every run whose method can (``self_condition_chain``)."""

    kind: Literal["selfcond-magnitude"]
    t: list[float] = Field([0.1, 0.3, 0.5, 0.7, 0.9], min_length=1)
    iterations: PositiveInt = 10
    sequences: PositiveInt = 32      # first N test blocks of the first eval dataset
    seed: int = 0

    @field_validator("t")
    @classmethod
    def _in_unit(cls, v):
        if any(not 0 < x < 1 for x in v):
            raise ValueError("every t must lie in (0, 1)")
        return v


class StepsCurve(Strict):
    """Sample metrics (from each run's scores) against the sampling step budget, one line per
    model, beside the likelihood bound per model when it has one."""

    kind: Literal["steps"]
    metrics: list[Literal["gen_ppl", "entropy", "mauve", "div", "mem"]] = Field(["gen_ppl", "entropy"], min_length=1)


Experiment = Annotated[Union[SelfCondMagnitude, StepsCurve], Field(discriminator="kind")]


class Suite(Strict):
    name: Name   # becomes the default output directory runs/<name> (bench.names)
    data: SuiteData
    sizes: dict[Name, Optional[dict[str, Any]]] = Field(min_length=1)  # each key is part of run ids
    methods: list[dict[str, Any]] = Field(min_length=1)
    baseline: Optional[str] = "ar"
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    seeds: list[Seed] = Field([0], min_length=1)
    launch: LaunchConfig = LaunchConfig()
    metrics: MetricsConfig = MetricsConfig()   # how samples are scored (never part of a run id)
    experiment: Optional[Experiment] = None    # an analysis of the trained runs (bench.experiments)

    @model_validator(mode="after")
    def _char_needs_no_packing_eos(self):
        if self.data.tokenizer.name == "char" and self.eval.packing != "none":
            raise ValueError(f"eval.packing: the char tokenizer (text8) has no EOS; use packing: none "
                             f"(not {self.eval.packing})")
        return self


class RunSpec(Strict):
    """A fully resolved run: everything that determines its numbers (not where it runs)."""

    method: str
    label: str
    params: dict[str, Any]
    size: str
    backbone: BackboneConfig
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig
    seed: int
    protocol_version: str = PROTOCOL_VERSION

    @property
    def run_id(self) -> str:
        d = self.model_dump(mode="json")
        if not d["train"]["compile"]:
            del d["train"]["compile"]  # added later: absent from the ids of runs that do not use it
        return f"{self.method}-{self.size}-s{self.seed}-{short_hash(d)[:10]}"

    def protocol(self) -> Protocol:
        e = self.eval
        counted = {"eos_per_doc": "document tokens + appended EOS; padding excluded",
                   "bos_eos_per_block": "block tokens + EOS; injected BOS and padding excluded",
                   "none": "all tokens; padding excluded"}[e.packing]
        if e.protocol:
            counted = PROTOCOL_PRESETS[e.protocol]["counted"]
        return Protocol(tokenizer=tokenizer_key(self.data.tokenizer), seq_len=self.data.seq_len,
                        packing=e.packing, counted=counted, t_samples=e.t_samples,
                        t_sampling=e.t_sampling, t_min=e.t_min, confidence=e.confidence,
                        max_blocks=e.max_blocks, preset=e.protocol or "custom", bound_steps=e.bound_steps,
                        t_proposal=e.t_proposal)


def short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
