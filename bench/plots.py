"""Plots derived from run records: training-loss curves per size, one line per model — the
mean over its seeds with a ±1 sd band when there are several — so the figure stays readable
(and fast) with thousands of runs (``training.png``); and the learning curves of the
intermediate evaluation (``learning.png``).

Written next to the leaderboard as ``training.png``; matplotlib is optional (no plot, no
error, when it is missing). Each figure carries a fingerprint of what it was drawn from (the
plotted data and this module's code) in a PNG text chunk; a figure whose fingerprint matches
is not drawn again, so an unchanged leaderboard does not import matplotlib at all (~0.5 s of a
command's start-up, docs/performance.md)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from bench.records import honour_umask

GRID = 200  # points each curve is resampled to (over the fraction of training done)


FINGERPRINT = "tdbench-inputs"   # the PNG text key holding what a figure was drawn from


def fingerprint(*parts) -> str:
    """sha256 of this module's code and the plotted data (numpy arrays by their bytes)."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray) else json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


def png_text(path: Path, key: str) -> str | None:
    """A PNG's tEXt value for ``key`` (the chunks before the image data), or None."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            while True:
                head = f.read(8)
                if len(head) < 8:
                    return None
                n, kind = struct.unpack(">I4s", head)
                if kind == b"IDAT" or n > 1 << 20:
                    return None
                data = f.read(n + 4)[:n]
                if kind == b"tEXt" and data.startswith(key.encode("latin-1") + b"\x00"):
                    return data[len(key) + 1:].decode("latin-1")
    except OSError:
        return None


def up_to_date(path: Path, fp: str) -> bool:
    """Was ``path`` drawn from exactly the inputs ``fp`` names?"""
    return png_text(path, FINGERPRINT) == fp


def save_figure(fig, path: Path, fp: str | None = None) -> Path:
    """Lay out ``fig``, write it to ``path`` atomically (temp file + rename) and close it;
    ``fp``: the inputs' :func:`fingerprint`, stored in the PNG (:func:`up_to_date`)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    # a temp file of this call's own: two commands writing one results directory's plots at
    # once (two `tdbench run` on one --out) must not rename each other's file away
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.png")
    honour_umask(fd)
    os.close(fd)
    tmp = Path(name)
    try:
        fig.savefig(tmp, dpi=110, **({"metadata": {FINGERPRINT: fp}} if fp else {}))
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def aggregate(recs: list[dict]) -> dict[tuple[str, str], dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int]]]:
    """{(size, dataset): {model: (steps, mean, sd, n_seeds)}} of the loss curves, ``dataset`` the
    run's first evaluated dataset (a suite training on several datasets scores each run on its
    own, so this separates them; "" for a run without metrics); curves of one model are resampled
    onto a common step grid (linear interpolation) before averaging."""
    groups: dict[tuple[str, str, str], list[tuple[np.ndarray, np.ndarray]]] = {}
    for r in recs:
        tr = r.get("train") or {}
        ys = tr.get("loss_curve")
        if not ys or not tr.get("steps"):
            continue
        ys = np.asarray(ys, dtype=float)
        xs = np.arange(len(ys)) * (tr["steps"] / len(ys))
        ds = next((m.get("dataset") for m in r.get("metrics") or [] if m.get("dataset")), "")
        groups.setdefault((r["size"], ds, r["label"]), []).append((xs, ys))
    out: dict = {}
    for (size, ds, model), curves in groups.items():
        end = min(float(x[-1]) for x, _ in curves)
        grid = np.linspace(0.0, end, min(GRID, max(len(x) for x, _ in curves)))
        stack = np.stack([np.interp(grid, x, y) for x, y in curves])
        sd = stack.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros_like(grid)
        out.setdefault((size, ds), {})[model] = (grid, stack.mean(axis=0), sd, len(curves))
    return out


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def training_curves(recs: list[dict], path: Path) -> Path | None:
    """``training.png``: the training loss against the step, a panel per size (× dataset, when
    runs train on several), one line per model (mean ± sd over seeds). The y range leaves out the
    first steps' spikes (a loss of 100+ nats at step 0 would flatten every other line)."""
    agg = aggregate(recs)
    if not agg:
        return None
    panels = sorted(agg)
    several = len({ds for _, ds in panels}) > 1
    keys = [(panel, model, agg[panel][model][3]) for panel in panels for model in sorted(agg[panel])]
    fp = fingerprint(keys, *(a for panel, model, _ in keys for a in agg[panel][model][:3]))
    if up_to_date(path, fp):
        return Path(path)
    plt = pyplot()
    if plt is None:
        return None
    cols = min(len(panels), 3)
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 3.8 * nrows), squeeze=False)
    for ax, (size, ds) in zip(axes.flat, panels):
        lows, highs = [], []
        for model in sorted(agg[(size, ds)]):
            xs, mean, sd, n = agg[(size, ds)][model]
            (line,) = ax.plot(xs, mean, lw=1.2, label=f"{model} ({n} seed{'s' if n > 1 else ''}"
                                                      f"{', mean ± sd' if n > 1 else ''})")
            if n > 1:
                ax.fill_between(xs, mean - sd, mean + sd, color=line.get_color(), alpha=0.2, lw=0)
            tail = mean[len(mean) // 10:] if len(mean) > 10 else mean
            lows.append(float(tail.min()))
            highs.append(float(tail.max()))
        lo, hi = min(lows), max(highs)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
        ax.set_title(f"size {size}" + (f"\n{ds}" if several else ""), fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return save_figure(fig, path, fp)


def learning_curves(recs: list[dict], path: Path) -> Path | None:
    """``learning.png``: the intermediate evaluation (``eval.curve_every``) against training
    tokens, one panel per size × dataset (a suite listing several training sets gets one per
    set), one line per model (mean over seeds, band = min…max over seeds, dotted: the mean of the
    probes' own Monte-Carlo intervals). Bits per character for character tokens; nats per token
    on a synthetic source, with its entropy h as a dashed line (the truth every model should
    approach: its ``Source (true)`` row); else perplexity. The curve is measured on the first eval
    set's first ``curve_blocks`` blocks, so its last point is close to, not equal to, the table
    (bench.runner.learning_probe)."""
    curves = [r for r in recs if r.get("train", {}).get("curve")]
    if not curves:
        return None
    panels: dict[tuple[str, str], list[dict]] = {}
    for r in curves:
        panels.setdefault((r["size"], r["train"]["curve"][0].get("dataset", "")), []).append(r)
    keys = sorted(panels)
    truths = {k: _probe_truth(panels[k][0]) for k in keys}
    fp = fingerprint([(r["size"], r["label"], r["train"]["curve"], r.get("spec", {}).get("data", {}).get("tokenizer"),
                       r.get("spec", {}).get("eval", {}).get("curve_blocks"), _truth_h(r)) for r in curves],
                     sorted(truths.items()))
    if up_to_date(path, fp):
        return Path(path)
    plt = pyplot()
    if plt is None:
        return None
    cols = min(len(keys), 3)
    nrows = -(-len(keys) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 4.4 * nrows), squeeze=False)
    for ax, (size, ds) in zip(axes.flat, keys):
        _learning_panel(ax, panels[(size, ds)], size, ds, truths[(size, ds)])
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    return save_figure(fig, path, fp)


def _truth_h(rec: dict) -> float | None:
    """A synthetic source's entropy h (nats/token) from the record's ``Source (true)`` row."""
    for m in rec.get("reference", []):
        if m.get("label") == "Source (true)" and m.get("value"):
            return math.log(m["value"])
    return None


def _probe_truth(rec: dict) -> float | None:
    """A synthetic source's exact NLL per counted token of the learning probe's own blocks, as
    the probe recorded it (bench.runner.learning_probe): the value every probe of a perfect model
    would show. It differs from h by those blocks' sampling error (64 blocks of 16 tokens: ~0.03
    nats), so the curves are read against it. None for text, and in records made before it was
    recorded (the line is then h)."""
    v = rec["train"]["curve"][0].get("source_nll_per_token")
    return None if v is None else float(v)


def _learning_panel(ax, runs_all: list[dict], size: str, ds: str, truth: float | None) -> None:
    def is_char(r):
        p = r["train"]["curve"][0]
        return p["char"] if "char" in p else (
            r.get("spec", {}).get("data", {}).get("tokenizer", {}).get("name") == "char")

    h = next((x for x in map(_truth_h, runs_all) if x is not None), None)
    char = all(is_char(r) for r in runs_all)
    conv, unit = ((lambda n: n / math.log(2)), "bits per character (≤ for bounds)") if char else \
        ((lambda n: n), "nats per token (≤ for bounds)") if h is not None else \
        (math.exp, "perplexity (≤ for bounds)")
    by_label: dict[str, list[dict]] = {}
    for r in runs_all:
        by_label.setdefault(r["label"], []).append(r)
    for label in sorted(by_label):
        runs = by_label[label]
        n = min(len(r["train"]["curve"]) for r in runs)
        xs = np.array([p["tokens"] for p in runs[0]["train"]["curve"][:n]], dtype=float)
        ys = np.array([[conv(p["nll_per_token"]) for p in r["train"]["curve"][:n]] for r in runs])
        line, = ax.plot(xs, ys.mean(0), lw=1.6, label=f"{label} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        if len(runs) > 1:
            ax.fill_between(xs, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2, lw=0)
        if all("ci_low_nll" in p for r in runs for p in r["train"]["curve"][:n]):   # the probe's own interval
            for key in ("ci_low_nll", "ci_high_nll"):
                ci = np.array([[conv(p[key]) for p in r["train"]["curve"][:n]] for r in runs]).mean(0)
                ax.plot(xs, ci, ls=":", lw=0.9, color=line.get_color())
    if h is not None:
        line = h if truth is None else truth
        ax.axhline(line, color="k", ls="--", lw=1.2,
                   label=f"truth: source entropy h = {h:.4f}" if truth is None else
                   f"truth: the source's NLL of these blocks = {truth:.4f} (h = {h:.4f})")
        lows = [p["nll_per_token"] for r in runs_all for p in r["train"]["curve"]]
        top = max(float(np.percentile(lows, 90)), line)
        bottom = min(float(np.percentile(lows, 2)), line)
        ax.set_ylim(bottom - 0.05 * (top - bottom), top)   # the tail near the truth, not the first probe's spike
    p0 = runs_all[0]["train"]["curve"][0]
    nb = p0.get("blocks", runs_all[0].get("spec", {}).get("eval", {}).get("curve_blocks", "?"))
    ax.set_title(f"size {size}: {ds}\nfirst {nb} test blocks", fontsize=9)
    ax.set_xlabel("training tokens")
    ax.set_ylabel(unit)
    if not char and h is None:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def frontier(st, path: Path) -> Path | None:
    """``frontier.png``: generative perplexity against entropy and against NFE, one line per
    method across its step budgets (per size), Source text as a reference mark. Low gen ppl
    from repetitive text shows up as a point far left (low entropy). A synthetic suite's
    samples (scored by the source: true_nll, ngram_tv) get :func:`_truth_frontier` instead."""
    fp = fingerprint(st[["size", "model", "steps", "dataset", "metric", "value"]].to_csv(index=False))
    if up_to_date(path, fp):
        return Path(path)
    plt = pyplot()
    if plt is None:
        return None
    if "true_nll" in set(st["metric"]):
        return _truth_frontier(st, path, fp, plt)
    panels = _panel_rows(st)
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 4.2 * len(panels)), squeeze=False)
    drew = False
    for row, (size, ds, s) in zip(axes, panels):
        colors = {}
        for model, g in s.groupby("model", sort=False):
            pts = []
            for steps, h in g.groupby("steps", sort=False, dropna=False):
                y, e, n = _value(h, "gen_ppl"), _value(h, "entropy"), _value(h, "nfe")
                if y is not None:
                    pts.append((steps, y, e, n))
            if not pts:
                continue
            pts.sort(key=lambda p: -1 if p[0] is None or (isinstance(p[0], float) and math.isnan(p[0])) else p[0])
            if model == "Source text":
                for ax, x in ((row[0], pts[0][2]), (row[1], None)):
                    ax.axhline(pts[0][1], color="k", ls="--", lw=1, label="Source text (gen ppl)")
                    if x is not None:
                        ax.plot([x], [pts[0][1]], "k*", ms=12, label="Source text")
                continue
            c = colors.setdefault(model, f"C{len(colors)}")
            for ax, xi in ((row[0], 2), (row[1], 3)):
                xs = [p[xi] for p in pts if p[xi] is not None]
                ys = [p[1] for p in pts if p[xi] is not None]
                if xs:
                    ax.plot(xs, ys, "o-", color=c, label=model, lw=1.2)
                    for p in pts:
                        if (p[xi] is not None and p[0] is not None
                                and not (isinstance(p[0], float) and math.isnan(p[0]))):
                            ax.annotate(f"{int(p[0])}", (p[xi], p[1]), fontsize=7, xytext=(3, 3),
                                        textcoords="offset points", color=c)
                    drew = True
        row[0].set_xlabel("unigram entropy of samples (nats)")
        row[1].set_xlabel("NFE (network calls per sample; log scale)")
        row[1].set_xscale("log")
        for ax in row:
            ax.set_ylabel("generative perplexity (log scale)")
            ax.set_yscale("log")
            ax.set_title(f"size {size}: gen ppl vs {'entropy' if ax is row[0] else 'NFE'} (labels: steps){ds}",
                         fontsize=9)
            ax.grid(alpha=0.3, which="both")
            if ax.get_legend_handles_labels()[0]:   # a panel with no labelled line gets no legend
                ax.legend(fontsize=7)
    if not drew:
        plt.close(fig)
        return None
    return save_figure(fig, path, fp)


def _panel_rows(st) -> list[tuple[str, str, object]]:
    """(size, "\n<dataset>" or "", its rows) per size × sample reference dataset: one row of
    panels each (a suite with several training sets scores each run's samples on its own); the
    dataset goes on a second title line."""
    ds = st["dataset"].astype(object).fillna("").astype(str)
    several = ds.nunique() > 1
    return [(size, f"\n{d}" if several and d else "", st[(st["size"] == size) & (ds == d)])
            for size, d in dict.fromkeys(zip(st["size"], ds))]


def _value(g, metric: str) -> float | None:
    r = g[g["metric"] == metric]["value"].dropna()
    return float(r.iloc[0]) if len(r) else None


def _truth_frontier(st, path: Path, fp: str, plt) -> Path | None:
    """``frontier.png`` of a synthetic suite: true_nll, ngram_tv and (where a source has
    ill-formed strings) valid (bench.metrics.truth) against NFE, one line per method across its
    step budgets, a row of panels per size × source; the Source row (fresh true blocks: true_nll
    ≈ the source's entropy, ngram_tv = the finite-sample floor, valid = 1) as a dashed line."""
    panels = [("true_nll", "true NLL of samples (nats/token)"), ("ngram_tv", "n-gram TV to the source (log scale)")]
    if (st["metric"] == "valid").any():
        panels.append(("valid", "fraction of samples well-formed"))
    rows = _panel_rows(st)
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(5.5 * len(panels), 4.2 * len(rows)), squeeze=False)
    # one colour and marker per model in every panel (solid circles for the first ten, then dashed squares)
    style = {m: (f"C{k % 10}", "o-" if k < 10 else "s--") for k, m in enumerate(dict.fromkeys(st["model"]))}
    drew = False
    for row, (size, ds, s) in zip(axes, rows):
        for ax, (metric, ylabel) in zip(row, panels):
            if metric == "valid" and not (s["metric"] == "valid").any():
                ax.axis("off")   # a source whose every string has p > 0 (markov, hmm): nothing to show
                continue
            for model, g in s.groupby("model", sort=False):
                color, fmt = style[model]
                pts = [(steps, _value(h, "nfe"), _value(h, metric))
                       for steps, h in g.groupby("steps", sort=False, dropna=False)]
                pts = [p for p in pts if p[2] is not None]
                if pts and all(p[1] is None for p in pts):   # the Source row: true samples, no sampler
                    ax.axhline(pts[0][2], color="k", ls="--", lw=1, label=f"{model} (true samples)")
                    continue
                pts = sorted((p for p in pts if p[1] is not None), key=lambda p: p[1])
                if not pts:
                    continue
                ax.plot([p[1] for p in pts], [p[2] for p in pts], fmt, color=color, label=model, lw=1.2, ms=4)
                for steps, x, y in pts:
                    if steps is not None and not (isinstance(steps, float) and math.isnan(steps)):
                        ax.annotate(f"{int(steps)}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points",
                                    color=color)
                drew = True
            ax.set_xscale("log")
            if metric == "ngram_tv":
                ax.set_yscale("log")
            ax.set_xlabel("NFE (network calls per sample; log scale)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"size {size}: {metric} vs NFE (labels: steps){ds}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    if not drew:
        plt.close(fig)
        return None
    return save_figure(fig, path, fp)
