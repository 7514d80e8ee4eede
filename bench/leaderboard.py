"""Leaderboards derived from run records (never edited by hand; regenerable at any time).

``leaderboard.csv`` is tidy: one row per (size, model, dataset, metric, protocol) with
``value, ci_low, ci_high, bound, n_seeds, std, protocol``. Across seeds, value is the mean and
the interval is mean ± t_{n−1}·sd/√n; with one seed it is the run's own protocol interval.
``leaderboard.md`` pivots it like the papers' tables: rows Size / Model, one column per
dataset (per protocol, if several protocols are present: numbers under different protocols are
never put in one column), "≤" for bounds, best per column in bold, ± CI half-width.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd


COLUMNS = ["size", "model", "dataset", "metric", "value", "ci_low", "ci_high", "bound", "n_seeds",
           "std", "protocol", "params"]
SOURCE_LABEL = "Source (true)"


def collect(out: Path) -> tuple[list[dict], list[str], list[dict]]:
    """(complete records, problems as one-line messages, failed records), in run-id order,
    from one pass over the records (bench.index: only records changed since the last pass
    are re-read)."""
    from bench.index import scan

    runs, problems = scan(out)
    recs = [r for r in runs.values() if r["status"] == "complete"]
    failed = [r for r in runs.values() if r["status"] == "failed"]
    return recs, problems, failed


def _t_quantile(conf: float, df: int) -> float:
    # scipy.special, not scipy.stats: the same quantile without ~2 s of importing scipy.stats
    from scipy.special import stdtrit  # noqa: PLC0415 - optional; falls back to normal
    return float(stdtrit(df, 0.5 + conf / 2))


def tidy(recs: list[dict]) -> pd.DataFrame:
    rows = []
    for r in recs:
        params = r.get("train", {}).get("params")
        for m in r.get("metrics", []):
            rows.append({"size": r["size"], "model": r["label"], "dataset": m["dataset"], "metric": m["metric"],
                         "value": m["value"], "ci_low": m.get("ci_low"), "ci_high": m.get("ci_high"),
                         "bound": m.get("bound"), "protocol": m.get("protocol_id"), "seed": r["seed"],
                         "params": params, "conf": r.get("protocol", {}).get("confidence", 0.95)})
        for m in r.get("reference", []):
            rows.append({"size": r["size"], "model": SOURCE_LABEL, "dataset": m["dataset"], "metric": m["metric"],
                         "value": m["value"], "ci_low": m["value"], "ci_high": m["value"], "bound": False,
                         "protocol": m.get("protocol_id"), "seed": None, "params": None, "conf": 0.95})
    if not rows:
        return pd.DataFrame(columns=COLUMNS)
    df = pd.DataFrame(rows)
    out = []
    for key, g in df.groupby(["size", "model", "dataset", "metric", "protocol"], sort=False, dropna=False):
        vals = g["value"].dropna()
        if g["model"].iloc[0] == SOURCE_LABEL:
            g = g.iloc[:1]
            vals = vals.iloc[:1]
        n = len(g)
        row = dict(zip(["size", "model", "dataset", "metric", "protocol"], key))
        row.update(bound=g["bound"].iloc[0], n_seeds=n, params=g["params"].iloc[0])
        if vals.empty:
            row.update(value=None, ci_low=None, ci_high=None, std=None)
        elif n == 1:
            row.update(value=vals.iloc[0], ci_low=g["ci_low"].iloc[0], ci_high=g["ci_high"].iloc[0], std=None)
        else:
            mean, sd = float(vals.mean()), float(vals.std(ddof=1))
            try:
                q = _t_quantile(float(g["conf"].iloc[0]), n - 1)
            except ImportError:
                from statistics import NormalDist
                q = NormalDist().inv_cdf(0.5 + float(g["conf"].iloc[0]) / 2)
            half = q * sd / math.sqrt(n)
            row.update(value=mean, ci_low=mean - half, ci_high=mean + half, std=sd)
        out.append(row)
    t = pd.DataFrame(out)[COLUMNS]
    size_order = {s: i for i, s in enumerate(t.groupby("size")["params"].max().sort_values().index)}
    rank = lambda m: 2 if m == SOURCE_LABEL else 0 if m == "GPT-2" else 1  # noqa: E731
    t["_s"] = t["size"].map(size_order)
    t["_m"] = t["model"].map(rank)
    return t.sort_values(["_s", "_m", "model", "dataset", "metric"]).drop(columns=["_s", "_m"]).reset_index(drop=True)


def _is_true(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x)) and bool(x)


def _fmt(row) -> str:
    v = row["value"]
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    s = f"{v:.2f}"
    if _is_true(row["bound"]):
        s = "≤ " + s
    lo, hi = row["ci_low"], row["ci_high"]
    if lo is not None and hi is not None and not (isinstance(lo, float) and math.isnan(lo)) and hi - lo > 1e-9:
        s += f" ±{(hi - lo) / 2:.2f}"
    return s


def markdown(t: pd.DataFrame, problems=(), failed=(), metric: str = "ppl") -> str:
    t = t[t["metric"] == metric]
    if t.empty:
        body = "_no complete runs yet_\n"
    else:
        multi = t.groupby("dataset")["protocol"].nunique().max() > 1
        t = t.assign(col=[f"{d} [{p}]" if multi else d for d, p in zip(t["dataset"], t["protocol"])])
        cols = list(dict.fromkeys(t["col"]))
        best = {}
        for c in cols:
            g = t[(t["col"] == c) & (t["model"] != SOURCE_LABEL)].dropna(subset=["value"])
            if len(g) > 1:
                best[c] = g["value"].min()
        lines = ["| Size | Model | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        last_size = None
        for (size, model), g in t.groupby(["size", "model"], sort=False):
            cells = []
            for c in cols:
                r = g[g["col"] == c]
                if r.empty:
                    cells.append("—")
                    continue
                r = r.iloc[0]
                s = _fmt(r)
                if c in best and r["value"] == best[c] and model != SOURCE_LABEL:
                    s = f"**{s}**"
                cells.append(s)
            lines.append(f"| {size if size != last_size else ''} | {model} | " + " | ".join(cells) + " |")
            last_size = size
        body = "\n".join(lines) + "\n"
    notes = ["", f"Metric: {metric} (perplexity; \"≤\" marks an upper bound; ± is the CI half-width, "
                 "over seeds when n_seeds > 1, else the protocol's Monte-Carlo interval). Best per column in bold."]
    for r in failed:
        notes.append(f"- failed: {r.get('label')} {r.get('size')} seed={r.get('seed')} ({r.get('run_id')}): {r.get('error')}")
    for p in problems:
        notes.append(f"- skipped: {p}")
    return body + "\n".join(notes) + "\n"


def write(out: Path, fmt: str | None = None) -> tuple[str, list[str]]:
    """Write leaderboard.csv, leaderboard.md and training.png (loss curves) into ``out``;
    return (text in ``fmt``, problems)."""
    from bench.records import atomic_write_text

    recs, problems, failed = collect(out)
    t = tidy(recs)
    csv = t.to_csv(index=False)
    md = markdown(t, problems, failed)
    atomic_write_text(Path(out) / "leaderboard.csv", csv)
    atomic_write_text(Path(out) / "leaderboard.md", md)
    from bench.plots import training_curves
    training_curves(recs, Path(out) / "training.png")
    if fmt == "json":
        return json.dumps(json.loads(t.to_json(orient="records")), indent=2), problems
    if fmt == "latex":
        from bench.tables import latex
        return latex(t), problems
    return (csv if fmt == "csv" else md), problems
