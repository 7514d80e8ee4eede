"""Experiments: analyses a suite runs on its trained runs, after training and scoring.

A suite's optional ``experiment:`` key (schemas in bench.config: ``SelfCondMagnitude``,
``StepsCurve``) names one. ``tdbench run`` trains and scores the suite's runs as always, then
runs the analysis over the complete runs of the output directory and writes
``<out>/<kind>.json`` (the measured numbers) and ``<out>/<kind>.png`` beside the leaderboard;
``tdbench experiment DIR`` reruns only the analysis (it reads the suite from ``suite.json``).
Nothing here retrains: an analysis reads run records, scores and final checkpoints.

- ``selfcond-magnitude``: for each run whose method has ``self_condition_chain`` and each t,
  draws z_t ~ q(z_t | w) once for the first ``sequences`` test blocks, then predicts x̂0
  ``iterations`` times, feeding each prediction back as the self-conditioning input; plots the
  mean per-token ‖x̂0‖ against the iteration K (the lecture: it grows with K), with the mean
  clean-embedding norm ‖e‖ as the reference.
- ``steps``: the sample metrics of each run's scores against the step budget (one line per
  model, log-scale steps), and the likelihood bound per model on the first eval dataset.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench.config import SelfCondMagnitude, StepsCurve, Suite
from bench.errors import UserError
from bench.plots import pyplot, save_figure
from bench.records import read_record, write_json

SUITE_FILE = "suite.json"


def save_suite(out: Path, suite: Suite) -> None:
    write_json(Path(out) / SUITE_FILE, suite.model_dump(mode="json"))


def load_saved_suite(out: Path) -> Suite:
    p = Path(out) / SUITE_FILE
    if not p.is_file():
        raise UserError(f"{p}: not found (run the suite with `tdbench run` first)")
    try:
        return Suite(**json.loads(p.read_text()))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{p}: corrupt suite record ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def run_experiment(out: Path, suite: Suite, log=print) -> Path | None:
    """Run the suite's experiment over ``out``; returns the PNG written (None: no experiment)."""
    exp = suite.experiment
    if exp is None:
        return None
    if isinstance(exp, SelfCondMagnitude):
        res = selfcond_magnitude(Path(out), exp, log)
        png = plot_magnitude(res, Path(out) / f"{exp.kind}.png")
    elif isinstance(exp, StepsCurve):
        res = steps_curve(Path(out), exp)
        png = plot_steps(res, exp, Path(out) / f"{exp.kind}.png")
    else:  # pragma: no cover - the schema admits nothing else
        raise UserError(f"experiment.kind: unknown {exp!r}")
    write_json(Path(out) / f"{exp.kind}.json", {"experiment": exp.model_dump(mode="json"), **res})
    log(f"experiment {exp.kind}: {png}")
    return png


def _complete_runs(out: Path) -> list[tuple[Path, dict]]:
    runs = []
    for p in sorted(Path(out).glob("runs/*/result.json")):
        try:
            r = read_record(p)
        except UserError:
            continue
        if r["status"] == "complete":
            runs.append((p.parent, r))
    return runs


# ----------------------------------------------------------------------------- magnitude
def selfcond_magnitude(out: Path, exp: SelfCondMagnitude, log=print) -> dict:
    import torch

    from bench.data import load_blocks
    from bench.method import Method
    from bench.registry import get_method
    from bench.samples import load_final_method

    rows = []
    for rd, rec in _complete_runs(out):
        if get_method(rec["spec"]["method"]).self_condition_chain is Method.self_condition_chain:
            continue   # the method has no chain: nothing to load
        method, spec = load_final_method(rd)
        blocks = load_blocks(spec.data.eval[0], "test", spec.data, spec.eval.packing).head(exp.sequences)
        x = torch.as_tensor(np.array(blocks.tokens), dtype=torch.long)
        c = torch.as_tensor(np.array(blocks.counted), dtype=torch.bool)
        for t in exp.t:
            torch.manual_seed(exp.seed)
            chain = method.self_condition_chain(x, c, t, exp.iterations)
            if chain is None:   # the method has no self-conditioning chain (Method.self_condition_chain)
                break
            norms, ref = chain
            rows.append({"label": rec["label"], "seed": rec["seed"], "run_id": rec["run_id"], "t": t,
                         "x0_norm": [round(float(v), 5) for v in norms], "embedding_norm": round(float(ref), 5)})
            log(f"{rec['label']} t={t}: |x0| {norms[0]:.3f} -> {norms[-1]:.3f} (|e| {ref:.3f})")
    if not rows:
        raise UserError(f"{out}: no complete run whose method supports self-conditioning iteration "
                        "(self_condition: true)")
    return {"rows": rows}


def plot_magnitude(res: dict, path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    labels = list(dict.fromkeys(r["label"] for r in res["rows"]))
    ts = sorted({r["t"] for r in res["rows"]})
    fig, axes = plt.subplots(1, len(labels), figsize=(5.2 * len(labels), 4), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, label in zip(axes[0], labels):
        for r in (r for r in res["rows"] if r["label"] == label):
            color = cmap(ts.index(r["t"]) / max(1, len(ts) - 1))
            ks = list(range(1, len(r["x0_norm"]) + 1))
            ax.plot(ks, r["x0_norm"], "o-", ms=3, color=color, label=f"t = {r['t']:g}")
            ax.axhline(r["embedding_norm"], color=color, ls=":", lw=0.8)
        ax.set_title(label)
        ax.set_xlabel("K (predictions of x̂0, each fed back as self-condition)")
        ax.set_ylabel("mean per-token ‖x̂0‖ (dotted: ‖e‖ of the data)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- steps
def steps_curve(out: Path, exp: StepsCurve) -> dict:
    p = Path(out) / "leaderboard.csv"
    if not p.is_file():
        raise UserError(f"{p}: not found (the leaderboard is written before the experiment)")
    t = pd.read_csv(p)
    if "steps" not in t.columns:
        raise UserError(f"{p}: no sample metrics (set eval.samples > 0 and eval.sample_steps)")
    pts = t[t.metric.isin(exp.metrics) & t.steps.notna()]
    curves = [{"model": m, "metric": k, "size": s,
               "steps": [int(x) for x in g.sort_values("steps").steps],
               "value": [float(v) for v in g.sort_values("steps").value]}
              for (s, m, k), g in pts.groupby(["size", "model", "metric"], sort=False)]
    src = t[(t.model == "Source text") & t.metric.isin(exp.metrics)]
    source = {r.metric: float(r.value) for r in src.itertuples() if not math.isnan(r.value)}
    ppl = t[(t.metric == "ppl") & t["value"].notna()]
    first = ppl.dataset.iloc[0] if len(ppl) else None
    bounds = [{"model": r.model, "dataset": r.dataset, "value": float(r.value), "ci_low": float(r.ci_low),
               "ci_high": float(r.ci_high), "bound": bool(r.bound)}
              for r in ppl[ppl.dataset == first].itertuples()]
    return {"curves": curves, "source_text": source, "ppl": bounds}


def plot_steps(res: dict, exp: StepsCurve, path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    n = len(exp.metrics) + (1 if res["ppl"] else 0)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    axes = axes[0]
    colors: dict[str, str] = {}
    budgets = sorted({b for c in res["curves"] for b in c["steps"]})
    single = len(budgets) == 1          # one budget: a point per model along a categorical axis
    for ax, metric in zip(axes, exp.metrics):
        curves = [c for c in res["curves"] if c["metric"] == metric]
        for i, c in enumerate(curves):
            col = colors.setdefault(c["model"], f"C{len(colors)}")
            if single:
                ax.plot([i], c["value"], "o", ms=8, color=col, label=c["model"])
            else:
                ax.plot(c["steps"], c["value"], "o-", color=col, label=c["model"])
        if metric in res["source_text"]:
            ax.axhline(res["source_text"][metric], color="k", ls="--", lw=1, label="Source text")
        if single:
            ax.set_xticks(range(len(curves)), [c["model"] for c in curves], rotation=30, ha="right", fontsize=7)
            ax.set_xlim(-0.5, len(curves) - 0.5)
            ax.set_xlabel(f"model (sampled with {budgets[0]} steps = NFE)")
            ax.set_title(f"{metric} at {budgets[0]} steps")
        else:
            ax.set_xscale("log")
            ax.set_xlabel("sampling steps (= NFE; log scale)")
            ax.set_title(f"{metric} vs steps")
        ax.set_ylabel({"gen_ppl": "generative perplexity (AR scorer)", "entropy": "unigram entropy (nats)"}
                      .get(metric, metric))
        if metric == "gen_ppl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    if res["ppl"]:
        ax = axes[-1]
        rows = res["ppl"]
        xs = range(len(rows))
        vals = [r["value"] for r in rows]
        err = [[r["value"] - r["ci_low"] for r in rows], [r["ci_high"] - r["value"] for r in rows]]
        ax.bar(xs, vals, yerr=err, color=[colors.get(r["model"], "0.6") for r in rows], capsize=3,
               label="perplexity (≤ bound, 95% CI)")
        ax.set_xticks(list(xs), [r["model"] for r in rows], rotation=30, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel(f"perplexity on {rows[0]['dataset']} (log scale)")
        ax.set_title("likelihood (bound ≤ for diffusion)")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- helpers
def table(res: dict) -> str:
    """A markdown summary of a magnitude result (for the README / stdout)."""
    lines = ["| model | t | ‖x̂0‖ K=1 | K=last | ‖e‖ |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['label']} | {r['t']:g} | {r['x0_norm'][0]:.3f} | {r['x0_norm'][-1]:.3f} | "
                     f"{r['embedding_norm']:.3f} |")
    return "\n".join(lines)
