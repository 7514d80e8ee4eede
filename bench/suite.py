"""Suite expansion: a validated :class:`~bench.config.Suite` → fully resolved run specs.

Sizes are resolved against the named sizes, each ``methods[i]`` against the registry and the
method's own ``Params`` schema, the data block against the dataset registry; then every
size × method × seed becomes one :class:`~bench.config.RunSpec`. The schemas themselves live
in :mod:`bench.config`.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from bench.config import (
    BOUND_SETTINGS,
    NAMED_SIZES,
    BackboneConfig,
    MethodEntry,
    RunSpec,
    StageOverrides,
    Suite,
    TrainConfig,
    resolve_stages,
)
from bench.config_io import first_error, read_validated
from bench.data import is_synthetic, validate_data_config
from bench.errors import FileError, UserError, did_you_mean
from bench.infill import check_infill
from bench.names import check_label, clip
from bench.registry import get_method

MAX_RUNS = 1000  # a suite expanding to more runs needs `--yes` (tdbench run / submit)


def resolve_sizes(suite: Suite) -> dict[str, BackboneConfig]:
    out = {}
    for name, dims in suite.sizes.items():
        base = dict(NAMED_SIZES.get(name, {}))
        if dims is None and not base:
            raise UserError(f"sizes.{name}: not a named size ({', '.join(NAMED_SIZES)}); "
                            "give layers, hidden, heads")
        base.update(dims or {})
        h, k = base.get("hidden"), base.get("heads")
        if isinstance(h, int) and isinstance(k, int) and k > 0 and h % k:
            raise UserError(f"sizes.{name}.heads: heads ({k}) must divide hidden ({h})")
        try:
            out[name] = BackboneConfig(**base)
        except ValidationError as e:
            raise UserError(first_error(e, ("sizes", name))) from None
    return out


def resolve_methods(suite: Suite) -> list[MethodEntry]:
    """Validate each ``methods[i]`` against the registry and the method's Params schema."""
    entries = list(suite.methods)
    names = [m.get("method") for m in entries]
    if suite.baseline and suite.baseline not in names:
        entries.append({"method": suite.baseline})
    out = []
    for i, raw in enumerate(entries):
        where = f"methods[{i}]" if i < len(suite.methods) else "baseline"
        raw = dict(raw)
        name = raw.pop("method", None)
        label = raw.pop("label", None)
        only = raw.pop("sizes", None)
        if only is not None and (not isinstance(only, list) or
                                 any(not isinstance(x, str) or x not in suite.sizes for x in only)):
            raise UserError(f"{where}.sizes: must be a list of the suite's sizes ({', '.join(suite.sizes)}), "
                            f"got {clip(only)}")
        if not isinstance(name, str):
            raise UserError(f"{where}.method: required (a registered method name)")
        try:
            cls = get_method(name)
        except UserError as e:
            raise UserError(f"{where}.method: {e}") from None
        variant = raw.pop("variant", None)
        if variant is not None:
            if not isinstance(variant, str):
                raise UserError(f"{where}.variant: must be a string, one of {', '.join(cls.variants) or '(none)'}; "
                                f"got {clip(variant)}")
            if variant not in cls.variants:
                raise UserError(f"{where}.variant: {did_you_mean(variant, cls.variants)}")
            raw = {**cls.variants[variant], **raw}
        try:
            params = cls.Params(**raw)
        except ValidationError as e:
            raise UserError(first_error(e, (where,))) from None
        if label is not None and not isinstance(label, str):
            raise UserError(f"{where}.label: must be a string")
        label = label or cls.default_label(params)
        try:
            check_label(label)
        except ValueError as e:
            raise UserError(f"{where}.label: {e}") from None
        out.append(MethodEntry(method=name, label=label, params=params.model_dump(mode="json"), sizes=only))
    dup = set()
    for size in suite.sizes:  # a label names one row per size
        labels = [m.label for m in out if m.sizes is None or size in m.sizes]
        dup |= {x for x in labels if labels.count(x) > 1}
    if dup:
        raise UserError(f"methods: duplicate label(s) {sorted(dup)}; give each a distinct 'label'")
    return out


def count_runs(suite: Suite) -> int:
    """How many runs ``expand`` would make, counted without making them (size × method ×
    training dataset × seed, a method's ``sizes:`` restricting its rows); an upper bound when
    the methods are invalid."""
    names = [m.get("method") for m in suite.methods]
    rows = list(suite.methods) + ([{}] if suite.baseline and suite.baseline not in names else [])
    per_seed = sum(len(m["sizes"]) if isinstance(m.get("sizes"), list) else len(suite.sizes) for m in rows)
    return per_seed * len(suite.data.trains) * len(suite.seeds)


def load_suite(path: str | Path, seeds: list[int] | None = None,
               max_runs: int | None = None) -> tuple[Suite, list[RunSpec]]:
    """Read and validate a suite, expand it into run specs. Raises UserError on bad input.
    ``seeds``: instead of the suite's (already validated); ``max_runs``: refuse, before
    expanding, a suite of more runs (the message says to pass ``--yes``)."""
    path = Path(path)
    suite = read_validated(path, Suite)
    if seeds:
        suite = suite.model_copy(update={"seeds": list(dict.fromkeys(seeds))})
    n = count_runs(suite)
    if max_runs is not None and n > max_runs:
        raise UserError(f"{path}: expands to {n:,} runs (more than {max_runs:,}): pass --yes to run them all")
    try:
        specs = expand(suite)
    except FileError:
        raise
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return suite, specs


def expand(suite: Suite) -> list[RunSpec]:
    """Every size × method × training dataset × seed as a run spec (in that nesting)."""
    sizes = resolve_sizes(suite)
    methods = resolve_methods(suite)
    datas = suite.data.per_run()
    several = len(datas) > 1
    if several and suite.data.eval is not None and any(is_synthetic(d.train) for _, d in datas):
        raise UserError("data.eval: a synthetic source is scored against itself; with several training "
                        "datasets leave data.eval out (each run is evaluated on its own)")
    for where, data in datas:
        validate_data_config(data, where)
        if suite.eval.per_byte and is_synthetic(data.train):
            raise UserError(f"eval.per_byte: {where} is a synthetic source, whose symbols are not text; "
                            "bytes are not defined for it")
        check_infill(suite.eval, data, where)
    trains = resolve_train(suite, methods)
    specs = []
    for size, bb in sizes.items():
        for i, m in enumerate(methods):
            if m.sizes is not None and size not in m.sizes:
                continue
            for where, data in datas:
                at = f"methods[{m.label}]" + (f" on {where}" if several else "")
                get_method(m.method).check_compatible(m.params, data, where=at)
                check_bound_settings(suite, m)
                for seed in suite.seeds:
                    specs.append(RunSpec(method=m.method, label=m.label, params=m.params, size=size,
                                         backbone=bb, data=data, train=trains[i], eval=suite.eval, seed=seed))
    return specs


def check_bound_settings(suite: Suite, m: MethodEntry) -> None:
    """UserError when the suite sets a bound-estimator setting (``eval.bound_steps``,
    ``eval.t_proposal``) that a bound method of it does not honour (``Method.protocol_settings``):
    its row would be recorded under an estimator it never used."""
    cls = get_method(m.method)
    for key, default in BOUND_SETTINGS.items():
        if getattr(suite.eval, key) != default and cls.likelihood == "bound" and key not in cls.protocol_settings:
            raise UserError(f"eval.{key}: {m.label} ({m.method}) does not read it — its bound has no such "
                            f"estimator; leave eval.{key} out, or score {m.method} in a suite of its own")


def _where(i: int, suite: Suite) -> str:
    return f"methods[{i}]" if i < len(suite.methods) else "baseline"


def resolve_train(suite: Suite, methods: list[MethodEntry]) -> list[TrainConfig]:
    """Each method's training settings, per stage (bench.config.resolve_stages). Every
    ``train.stages.<name>`` must name a stage of some method of the suite; a method's own
    ``stage_defaults`` must name its stages and valid settings."""
    classes = [get_method(m.method) for m in methods]
    for name in suite.train.stages:
        if not any(name in cls.stages for cls in classes):
            have = "; ".join(f"{_where(i, suite)} {m.method}: {', '.join(cls.stages)}"
                             for i, (m, cls) in enumerate(zip(methods, classes)))
            raise UserError(f"train.stages.{name}: no method of this suite has a stage '{name}' ({have})")
    out = []
    for i, (m, cls) in enumerate(zip(methods, classes)):
        where = _where(i, suite)
        for st, d in cls.stage_defaults.items():
            if st not in cls.stages:
                raise UserError(f"{where}.method: {m.method}.stage_defaults.{st}: not one of its stages "
                                f"({', '.join(cls.stages)})")
            try:
                StageOverrides(**d)
            except ValidationError as e:
                raise UserError(f"{where}.method: " + first_error(e, (f"{m.method}.stage_defaults", st))) from None
        if len(cls.stages) > 1 and suite.train.engine == "deepspeed":
            raise UserError(f"train.engine: deepspeed trains one model engine per run, and {where} "
                            f"({m.method}) trains in {len(cls.stages)} stages ({', '.join(cls.stages)}); use ddp")
        try:
            out.append(resolve_stages(suite.train, cls.stages, cls.stage_defaults))
        except ValidationError as e:
            raise UserError(f"{where}.method: " + first_error(e, ("train",))) from None
    return out
