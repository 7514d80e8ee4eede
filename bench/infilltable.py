"""The infill leaderboard: quality against NFE per method, one table per (eval set, setting)
(leaderboard.md), the tidy rows (``infill.csv``) and the plot (``infill.png``), from the
``infill`` part of every run's ``scores.json`` (bench/metrics/infill.py; fills: bench/infill.py).

Rows Size / Model / Steps with the NFE per filled block; a method that cannot condition (the
latent ones) one row of "—"; the ``Source`` row scores the true fill (exact = ROUGE = 1, its
true_cond_nll one draw of the source's conditional) and carries the source's conditional entropy
H of the hidden positions given both sides. Across seeds a value is the mean, ± the std over
seeds (one seed: none). A left-to-right model (AR) fills from the prefix only (bench/infill.py).
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from bench.tables import Table

SOURCE = "Source (true fill)"
TEXT_COLS = ["nfe", "exact", "token_acc", "rouge1", "rouge2", "rougeL", "fill_nll"]
TRUTH_COLS = ["nfe", "exact", "token_acc", "rouge1", "rouge2", "rougeL", "true_cond_nll"]
ARROW = {"nfe": " ↓", "exact": " ↑", "token_acc": " ↑", "rouge1": " ↑", "rouge2": " ↑", "rougeL": " ↑",
         "fill_nll": " ↓", "true_cond_nll": ""}   # true_cond_nll: closest to H, not lowest
KEYS = ["size", "model", "dataset", "setting", "steps", "metric"]
NOTE = ("Infill (eval.infill, docs/protocol.md#infilling): each method fills the hidden positions of held-out "
        "blocks given the rest; AR (a left-to-right model) is given only what precedes the first hidden position "
        "and generates the rest of the block, of which only the hidden positions are scored. exact = fraction of "
        "blocks with every hidden token right; token_acc = fraction of hidden tokens right; rouge1/2/L = mean "
        "ROUGE F-measure of the fill's text against the hidden text; NFE = network calls per filled block. "
        "— marks a method that cannot condition (latent) or a value that does not apply. ± is the std over seeds.")
FILL_NOTE = ("fill_nll = the scorer LM's NLL per token of the whole filled block (nats; the suite's gen_ppl scorer); "
             "Source's is that of the true blocks.")
TRUTH_NOTE = ("true_cond_nll = the source's own NLL of the fill given both sides, nats per hidden token: a filler "
              "drawing from the source's conditional has E[true_cond_nll] = H, the source's conditional entropy of "
              "the hidden positions given the rest")


def infill_tidy(scores: list[dict]) -> pd.DataFrame:
    """One row per (size, model, dataset, setting, steps, metric): mean and std over seeds, the
    note of a value without one; the Source rows once per (size, dataset, setting)."""
    rows, seen = [], set()
    for sc in scores:
        for s in (sc.get("infill") or {}).get("sets", []):
            model = SOURCE if s.get("model") == "Source" else sc["label"]
            key = (sc["size"], s["dataset"], s["setting"])
            if model == SOURCE:
                if key in seen:
                    continue
                seen.add(key)
            base = {"size": sc["size"], "model": model, "dataset": s["dataset"], "setting": s["setting"],
                    "steps": s.get("steps"), "seed": sc["seed"]}
            if "metrics" not in s:   # cannot condition: a row of —
                rows.append({**base, "metric": "exact", "value": None, "note": s.get("note"), "estimate": None})
                continue
            if s.get("nfe") is not None:
                rows.append({**base, "metric": "nfe", "value": s["nfe"], "note": None, "estimate": None})
            for m, v in s["metrics"].items():
                rows.append({**base, "metric": m, "value": v.get("value"), "note": v.get("note"),
                             "estimate": v.get("estimate"), "ci": (v.get("ci_low"), v.get("ci_high"))})
    if not rows:
        return pd.DataFrame(columns=KEYS + ["value", "std", "n_seeds", "note", "estimate", "ci"])
    df = pd.DataFrame(rows)
    df["steps"] = df["steps"].astype("object")
    out = []
    for key, g in df.groupby(KEYS, sort=False, dropna=False):
        vals = g["value"].dropna().astype(float)
        note = next((x for x in g["note"] if isinstance(x, str)), None)
        out.append({**dict(zip(KEYS, key)), "value": float(vals.mean()) if len(vals) else None,
                    "std": float(vals.std(ddof=1)) if len(vals) > 1 else None, "n_seeds": len(g), "note": note,
                    "estimate": g["estimate"].iloc[0], "ci": g["ci"].iloc[0] if "ci" in g else None})
    return pd.DataFrame(out)


def _num(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def _cell(r) -> str:
    if r is None or not _num(r["value"]):
        return "—"
    v = r["value"]
    s = f"{v:.1f}" if r["metric"] == "nfe" else f"{v:.3f}"
    if _num(r["std"]):
        s += f" ±{r['std']:.3f}"
    return s + (" †" if isinstance(r["note"], str) else "")


def task_table(g: pd.DataFrame, dataset: str, setting: str) -> Table:
    """The table of one (eval set, setting): rows Size / Model / Steps, the columns of TEXT_COLS or
    (a synthetic source scored by itself) TRUTH_COLS, best per column in bold (Source excluded)."""
    truth = (g["metric"] == "true_cond_nll").any()
    cols = TRUTH_COLS if truth else TEXT_COLS
    best = {}
    for m in (c for c in cols[1:] if ARROW[c]):
        v = g[(g["metric"] == m) & (g["model"] != SOURCE)]["value"].dropna()
        if v.nunique() > 1:
            best[m] = v.min() if "↓" in ARROW[m] else v.max()
    rows, bold = [], set()
    for (size, model, steps), h in g.groupby(["size", "model", "steps"], sort=False, dropna=False):
        cells = [str(size), str(model), str(int(steps)) if _num(steps) else "—"]
        for m in cols:
            r = h[h["metric"] == m]
            r = r.iloc[0] if len(r) else None
            if r is not None and m in best and r["value"] == best[m] and model != SOURCE:
                bold.add((len(rows), len(cells)))
            cells.append(_cell(r))
        rows.append(cells)
    notes = ["", NOTE, TRUTH_NOTE + _entropy(g) if truth else FILL_NOTE]
    notes += [f"- {'†' if _num(v) else '—'} {m}: {n}" for m, v, n in
              sorted({(m, v if _num(v) else None, n) for m, v, n in zip(g["metric"], g["value"], g["note"])
                      if isinstance(n, str)}, key=str)]
    return Table(f"infill-{dataset}-{setting}", ["Size", "Model", "Steps", *[c.replace("nfe", "NFE") + ARROW[c]
                                                                          for c in cols]],
                 rows, bold, head=[f"Infill: {setting} on {dataset}"], notes=notes)


def _entropy(g: pd.DataFrame) -> str:
    """'; H = … nats per hidden token (exact | an estimate ± its 95% interval)' from the Source row."""
    r = g[(g["metric"] == "cond_entropy") & (g["model"] == SOURCE)].dropna(subset=["value"])
    if r.empty:
        return " (no conditional entropy: the source has no posterior pass)."
    r = r.iloc[0]
    if r["estimate"] == "sampled" and isinstance(r["ci"], tuple) and _num(r["ci"][0]):
        return f"; here H ≈ {r['value']:.4f} ±{(r['ci'][1] - r['ci'][0]) / 2:.4f} (posterior draws, 95%)."
    return f"; here H = {r['value']:.4f} (exact, forward–backward)."


def infill_tables(it: pd.DataFrame) -> list[Table]:
    if it.empty:
        return []
    return [task_table(it[(it["dataset"] == d) & (it["setting"] == s)], d, s)
            for d, s in dict.fromkeys(zip(it["dataset"], it["setting"]))]


def write(out: Path, it: pd.DataFrame, csv_text) -> None:
    """``infill.csv`` (the tidy rows, as ``csv_text`` writes them: bench.leaderboard's) and
    ``infill.png`` into ``out`` when there are infill scores."""
    if it.empty:
        return
    from bench.records import atomic_write_text

    atomic_write_text(Path(out) / "infill.csv", csv_text(it.drop(columns="ci")))
    plot(it, Path(out) / "infill.png")


def plot(it: pd.DataFrame, path: Path) -> Path | None:
    """``infill.png``: per (eval set, setting) a row of two panels, quality against NFE (log), one
    line per method across its step budgets: true_cond_nll (H dashed) and token_acc on a synthetic
    source, ROUGE-L and fill_nll (Source's dashed) on text."""
    from bench.plots import fingerprint, pyplot, save_figure, up_to_date

    fp = fingerprint(it[KEYS + ["value"]].to_csv(index=False))
    if up_to_date(path, fp):
        return Path(path)
    plt = pyplot()
    if plt is None:
        return None
    tasks = list(dict.fromkeys(zip(it["dataset"], it["setting"])))
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4 * len(tasks)), squeeze=False)
    style = {m: f"C{k % 10}" for k, m in enumerate(dict.fromkeys(it["model"]))}
    for row, (d, s) in zip(axes, tasks):
        g = it[(it["dataset"] == d) & (it["setting"] == s)]
        truth = (g["metric"] == "true_cond_nll").any()
        for ax, m in zip(row, ("true_cond_nll", "token_acc") if truth else ("rougeL", "fill_nll")):
            _panel(ax, g, m, style, "cond_entropy" if m == "true_cond_nll" else m)
            ax.set_title(f"{s} on {d}: {m} vs NFE (labels: steps)", fontsize=8)
    return save_figure(fig, path, fp)


def _panel(ax, g: pd.DataFrame, metric: str, style: dict, ref: str) -> None:
    src = g[(g["model"] == SOURCE) & (g["metric"] == ref)]["value"].dropna()
    if len(src):
        ax.axhline(float(src.iloc[0]), color="k", ls="--", lw=1, label="H (source)" if ref != metric else SOURCE)
    for model, h in g[g["model"] != SOURCE].groupby("model", sort=False):
        pts = []
        for steps, k in h.groupby("steps", sort=False, dropna=False):
            x, y = k[k["metric"] == "nfe"]["value"].dropna(), k[k["metric"] == metric]["value"].dropna()
            if len(x) and len(y):
                pts.append((float(x.iloc[0]), float(y.iloc[0]), steps))
        if not pts:
            continue
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=style[model], label=model, lw=1.2, ms=4)
        for x, y, steps in pts:
            if _num(steps):
                ax.annotate(f"{int(steps)}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("NFE per filled block (log scale)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
