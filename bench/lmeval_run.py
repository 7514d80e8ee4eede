"""``tdbench lm-eval RUN --tasks ...``: lm-eval's ``simple_evaluate`` on a run through the
registered ``tdbench`` model (bench/lmeval_model.py), lm-eval's usual results JSON (its
EvaluationTracker: ``--output_path``, ``--log_samples``), and the Monte-Carlo standard error
of every task metric beside lm-eval's own stderr.

Two errors, two keys. lm-eval's ``{metric}_stderr,{filter}`` is the metric's sampling error
over the task's documents (a bootstrap or a closed form over the documents; "N/A" for the
perplexities). A bound method's answers are themselves Monte-Carlo estimates (K time draws per
request, bench/lmeval.py), so re-running with another seed moves the metric even on the same
documents: ``{metric}_mc_stderr,{filter}`` in the same results block is that error, from a
parametric bootstrap — each request's log-likelihood redrawn B times as ll + se·z, z ~ N(0, 1)
(se its Monte-Carlo standard error from two replicates of K/2 strata, the normal its estimate's
CLT over the draws), the task's own ``process_results`` and aggregation applied to each redraw,
and the standard deviation of the B metric values reported. For a metric linear in the
log-likelihoods this is the delta method's √Σse² (per word, per byte) up to the bootstrap's
error (≈ 1/√(2B) relative); accuracy gets the error of its argmax flips. An exact row (AR,
hf-causal-lm) has se = 0 and reports 0.0; generation tasks report none (a sampler's draws are
not a likelihood estimate). lm-eval's table ignores keys ending in ``_stderr``, so the
command prints the Monte-Carlo errors in a table of its own after lm-eval's.

The bundled tiny tasks (bench/lmeval_tasks: ``tdbench_tiny_mc``, ``tdbench_tiny_rolling``,
``tdbench_tiny_gen``) are always on the include path, before ``--include-path``.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
from pydantic import Field, NonNegativeInt, PositiveFloat, model_validator

from bench.config import Strict
from bench.errors import UserError
from bench.lmeval import ScorerSettings

BUNDLED = Path(__file__).resolve().parent / "lmeval_tasks"
MC_TYPES = ("loglikelihood", "multiple_choice", "loglikelihood_rolling")


class Options(Strict):
    """lm-eval's options that ``tdbench lm-eval`` passes through, and its own ``mc_bootstrap``
    (the command's options are derived from these)."""

    tasks: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1, description="comma-separated lm-eval task names (bundled: tdbench_tiny_mc, "
                                  "tdbench_tiny_rolling, tdbench_tiny_gen)")
    include_path: Optional[str] = Field(None, min_length=1, description="more task YAMLs (lm-eval's --include_path)")
    limit: Optional[PositiveFloat] = Field(None, description="documents per task, a fraction of them if < 1 "
                                                             "(lm-eval's --limit)")
    num_fewshot: Optional[NonNegativeInt] = Field(None, le=1000, description="few-shot examples (lm-eval's "
                                                                             "--num_fewshot)")
    output_path: Optional[str] = Field(None, min_length=1, description="where lm-eval writes its results JSON: a "
                                                                       "directory, or a .json path (--output_path)")
    log_samples: bool = Field(False, description="also write every request and answer (lm-eval's --log_samples; "
                                                 "needs --output-path)")
    mc_bootstrap: int = Field(200, ge=2, le=100_000, description="redraws of the Monte-Carlo standard error's "
                                                                 "parametric bootstrap")

    @model_validator(mode="after")
    def _samples_need_a_place(self):
        if self.log_samples and not self.output_path:
            raise ValueError("--log-samples: needs --output-path (where lm-eval writes the samples)")
        return self


def task_manager(include_path: str | None, tasks: list[str]):
    """lm-eval's TaskManager over the bundled tiny tasks (and ``include_path``'s), with lm-eval's
    own tasks only when ``tasks`` names one (indexing them reads ~14,000 YAML files)."""
    from lm_eval.tasks import TaskManager

    paths = [str(BUNDLED)]
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise UserError(f"--include-path: {include_path}: no such directory")
        paths.append(str(Path(include_path).resolve()))
    local = TaskManager(include_path=paths, include_defaults=False)
    return local if tasks and all(local.match_tasks([t]) for t in tasks) else TaskManager(include_path=paths)


def check_tasks(tasks: list[str], tm) -> None:
    """UserError (one line) naming the first task that matches no task, group or tag."""
    if not tasks:
        raise UserError("--tasks: name at least one task (e.g. tdbench_tiny_mc)")
    import difflib

    for t in tasks:
        if not tm.match_tasks([t]):
            close = difflib.get_close_matches(t, tm.all_tasks, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"--tasks: unknown task '{t[:200]}'{hint} (lm_eval ls tasks lists them; bundled: "
                            f"{', '.join(sorted(p.stem for p in BUNDLED.glob('*.yaml')))})")


def evaluate(run: str, settings: ScorerSettings, opts: Options) -> dict:
    """lm-eval's results of ``run`` on ``opts.tasks``, with the Monte-Carlo standard errors
    (module docstring); written by lm-eval's EvaluationTracker under ``opts.output_path``."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import sanitize_model_name

    from bench.lmeval_model import TdbenchLM

    tm = task_manager(opts.include_path, opts.tasks)
    check_tasks(opts.tasks, tm)
    model_args = {"run": run, **settings.model_dump(exclude_none=True)}
    lm = TdbenchLM(**model_args)
    tracker = EvaluationTracker(output_path=opts.output_path) if opts.output_path else None
    limit = int(opts.limit) if opts.limit is not None and opts.limit >= 1 else opts.limit   # lm-eval: < 1 a share
    results = simple_evaluate(model=lm, tasks=opts.tasks, num_fewshot=opts.num_fewshot, limit=limit,
                              log_samples=True, evaluation_tracker=tracker, task_manager=tm)
    results["config"]["model"] = "tdbench"
    results["config"]["model_args"] = model_args
    samples = results.pop("samples")
    add_mc_stderr(results, samples, lm, tm, opts.mc_bootstrap, settings.seed)
    if tracker is not None:
        name = f"tdbench__{Path(run).resolve().name}"
        tracker.general_config_tracker.model_name = name
        tracker.general_config_tracker.model_name_sanitized = sanitize_model_name(name)
        tracker.save_results_aggregated(results=results, samples=samples if opts.log_samples else None)
        if opts.log_samples:
            for task_name in results["configs"]:
                tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    if opts.log_samples:
        results["samples"] = samples
    return results


def add_mc_stderr(results: dict, samples: dict, lm, tm, B: int, seed: int) -> None:
    """``{metric}_mc_stderr,{filter}`` into each likelihood task's block of ``results``, and
    each logged document's per-request Monte-Carlo standard errors (``mc_se``) into ``samples``."""
    names = [t for t in results["configs"] if t in samples and t in results["results"]]
    tasks = tm.load(names)["tasks"]   # this function's own copies of the leaf tasks: memoized below
    rng = np.random.default_rng(seed)
    for name in names:
        task = tasks[name]
        if task.OUTPUT_TYPE in MC_TYPES:
            for s in samples[name]:
                s["mc_se"] = [lm.mc_se[(name, s["doc_id"], i)] for i in range(len(s["filtered_resps"]))]
            results["results"][name].update(mc_stderr(task, samples[name], B, rng))


def memoize_docs(task) -> None:
    """Cache ``task``'s doc_to_text / doc_to_target / doc_to_choice per document object: pure
    functions of the document that ``process_results`` renders (a Jinja template each) on every
    call, which the bootstrap makes B times per document."""
    for name in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        def cached(doc, *a, _f=getattr(task, name), _c={}, **k):
            if a or k:
                return _f(doc, *a, **k)
            if id(doc) not in _c:
                _c[id(doc)] = (doc, _f(doc))   # the document held, so its id is never reused
            return _c[id(doc)][1]
        setattr(task, name, cached)


def mc_stderr(task, samples: list[dict], B: int, rng) -> dict:
    """{``{metric}_mc_stderr,{filter}``: value} of one task by the parametric bootstrap, from its
    logged documents (their answers ``filtered_resps`` and standard errors ``mc_se``)."""
    memoize_docs(task)
    rolling = task.OUTPUT_TYPE == "loglikelihood_rolling"
    agg = task.aggregation()
    out: dict[str, float] = {}
    by_filter: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        by_filter[s["filter"]].append(s)
    for filt, docs in by_filter.items():
        se = [np.asarray(s["mc_se"], dtype=np.float64) for s in docs]
        metrics = [m for m in task.process_results(docs[0]["doc"], docs[0]["filtered_resps"]) if m in agg]
        if not any(e.any() for e in se):   # an exact row: the metric does not move with the draws
            out.update({f"{m}_mc_stderr,{filt}": 0.0 for m in metrics})
            continue
        draws = defaultdict(list)
        for _ in range(B):
            per_doc = defaultdict(list)
            for s, e in zip(docs, se):
                ll = np.array([r if rolling else r[0] for r in s["filtered_resps"]], dtype=np.float64)
                ll = ll + e * rng.standard_normal(len(ll))
                resps = ll.tolist() if rolling else [(v, r[1]) for v, r in zip(ll, s["filtered_resps"])]
                for m, v in task.process_results(s["doc"], resps).items():
                    per_doc[m].append(v)
            for m in metrics:
                draws[m].append(float(agg[m](per_doc[m])))
        out.update({f"{m}_mc_stderr,{filt}": float(np.std(draws[m], ddof=1)) for m in metrics})
    return out


def mc_table(results: dict) -> str:
    """The metrics of every task with both standard errors, as a markdown table."""
    rows = ["| task | metric | value | stderr (documents) | mc_stderr (time draws) |", "|---|---|---|---|---|"]
    for task, block in results["results"].items():
        for key, v in block.items():
            m, _, f = key.partition(",")
            if not f or m.endswith("_stderr"):
                continue
            se, mc = block.get(f"{m}_stderr,{f}", "N/A"), block.get(f"{m}_mc_stderr,{f}", "—")
            rows.append(f"| {task} | {m} ({f}) | {_num(v)} | {_num(se)} | {_num(mc)} |")
    return "\n".join(rows)


def _num(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)
