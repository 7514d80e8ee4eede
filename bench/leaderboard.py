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
import os
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from bench import infilltable, tables
from bench.records import JSON_ERRORS
from bench.tables import SOURCE_BLOCKS_LABEL, SOURCE_LABEL, SOURCE_LABELS, Table, md_table
from bench.tdist import t_quantile

COLUMNS = ["size", "model", "dataset", "metric", "value", "ci_low", "ci_high", "bound", "n_seeds",
           "std", "protocol", "params", "estimate"]
# Tables written after the ppl table when their metric is present (markdown).
EXTRA_METRICS = {"bpc": "bits per character (log₂ ppl; character tokens)",
                 "bpb": "bits per UTF-8 byte of the decoded counted tokens (eval.per_byte; comparable across "
                        "tokenizers and for rows that retokenise)",
                 "gap": "nats per token above the source's exact NLL of the same test blocks "
                        "(paired interval over blocks)"}


def collect(out: Path) -> tuple[list[dict], list[str], list[dict]]:
    """(complete records, problems as one-line messages, failed records), in run-id order,
    from one pass over the records (bench.index: only records changed since the last pass
    are re-read)."""
    from bench.index import scan

    runs, problems = scan(out)
    recs = [r for r in runs.values() if r["status"] == "complete"]
    failed = [r for r in runs.values() if r["status"] == "failed"]
    return recs, problems, failed


def tidy(recs: list[dict]) -> pd.DataFrame:
    rows = []
    for r in recs:
        params = r.get("train", {}).get("params")
        for m in r.get("metrics", []):
            rows.append({"size": r["size"], "model": r["label"], "dataset": m["dataset"], "metric": m["metric"],
                         "value": m["value"], "ci_low": m.get("ci_low"), "ci_high": m.get("ci_high"),
                         "bound": m.get("bound"), "protocol": m.get("protocol_id"), "seed": r["seed"],
                         "params": params, "conf": r.get("protocol", {}).get("confidence", 0.95),
                         "estimate": m.get("estimate")})
        for m in r.get("reference", []):
            rows.append({"size": r["size"], "model": m.get("label", SOURCE_LABEL), "dataset": m["dataset"],
                         "metric": m["metric"], "value": m["value"], "ci_low": m.get("ci_low", m["value"]),
                         "ci_high": m.get("ci_high", m["value"]), "bound": False, "protocol": m.get("protocol_id"),
                         "seed": None, "params": None, "conf": 0.95, "estimate": m.get("estimate", "exact")})
    if not rows:
        return pd.DataFrame(columns=COLUMNS)
    df = pd.DataFrame(rows)
    out = []
    for key, g in df.groupby(["size", "model", "dataset", "metric", "protocol"], sort=False, dropna=False):
        vals = g["value"].dropna()
        if g["model"].iloc[0] in SOURCE_LABELS:
            g = g.iloc[:1]
            vals = vals.iloc[:1]
        n = len(g)
        row = dict(zip(["size", "model", "dataset", "metric", "protocol"], key))
        row.update(bound=g["bound"].iloc[0], n_seeds=n, params=g["params"].iloc[0],
                   estimate=g["estimate"].iloc[0])
        if vals.empty:
            row.update(value=None, ci_low=None, ci_high=None, std=None)
        elif n == 1:
            row.update(value=vals.iloc[0], ci_low=g["ci_low"].iloc[0], ci_high=g["ci_high"].iloc[0], std=None)
        else:
            mean, sd = float(vals.mean()), float(vals.std(ddof=1))
            half = t_quantile(float(g["conf"].iloc[0]), n - 1) * sd / math.sqrt(n)
            row.update(value=mean, ci_low=mean - half, ci_high=mean + half, std=sd)
        out.append(row)
    t = pd.DataFrame(out)[COLUMNS]
    size_order = {s: i for i, s in enumerate(t.groupby("size")["params"].max().sort_values().index)}
    rank = lambda m: 2 if m in SOURCE_LABELS else 0 if m == "GPT-2" else 1  # noqa: E731
    t["_s"] = t["size"].map(size_order)
    t["_m"] = t["model"].map(rank)
    return t.sort_values(["_s", "_m", "model", "dataset", "metric"]).drop(columns=["_s", "_m"]).reset_index(drop=True)


def _is_true(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x)) and bool(x)


def _fmt(row) -> str:
    v = row["value"]
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    nd = 4 if row.get("metric") == "gap" else 2   # gaps are a few hundredths of a nat
    s = f"{v:.{nd}f}"
    if _is_true(row["bound"]):
        s = "≤ " + s
    elif row.get("estimate") == "truncated":
        s = "≈ " + s + " (t_min)"
    elif row.get("estimate") == "sampled":   # a source's entropy estimated from true samples (bench.data.hmm)
        s = "≈ " + s
    lo, hi = row["ci_low"], row["ci_high"]
    if lo is not None and hi is not None and not (isinstance(lo, float) and math.isnan(lo)) and hi - lo > 1e-9:
        s += f" ±{(hi - lo) / 2:.{nd}f}"
    return s


def text_crossings(recs: list[dict]) -> list[str]:
    """One note per model whose text crosses into another tokenizer (the record's
    ``protocol.text_crossing``, written from the method's ``info()``), then one per model with a
    "≤" row: what its record says the number bounds (``bounds``, from ``Method.bounds``)."""
    seen = {}
    for r in recs:
        c = (r.get("protocol") or {}).get("text_crossing")
        if c:
            seen.setdefault(f"- text crossing, {r.get('label')}: {c}", None)
    unsaid = "its record does not say what it bounds (written before records did)"
    for r in recs:
        for m in r.get("metrics") or []:
            if isinstance(m, dict) and m.get("metric") == "ppl" and _is_true(m.get("bound")):
                seen.setdefault(f"- ≤ {r.get('label')}: {m.get('bounds') or unsaid}", None)
    return list(seen)


def table(t: pd.DataFrame, problems=(), failed=(), metric: str = "ppl", crossings=()) -> Table:
    """The likelihood table of ``metric``: rows Size / Model, a column per dataset (per
    protocol when a dataset has several), best per column in bold; the notes below it."""
    t = t[t["metric"] == metric]
    what = "perplexity" if metric == "ppl" else EXTRA_METRICS.get(metric, metric)
    notes = ["", f"Metric: {metric} ({what}; \"≤\" marks an upper bound, \"≈ … (t_min)\" an estimate "
                 "truncated at t_min > 0, which is not a bound; ± is the CI half-width, "
                 "over seeds when n_seeds > 1, else the protocol's Monte-Carlo interval). Best per column in bold."]
    notes.extend(crossings)
    if metric == "ppl" and (t["estimate"] == "sampled").any():
        notes.append(f"- ≈ {SOURCE_LABEL}: an estimate, not exact — the source has no closed-form entropy (an HMM); "
                     "it is the mean exact NLL per token of fresh true blocks, ± its 95% interval. "
                     f"{SOURCE_BLOCKS_LABEL} and every gap are exact.")
    for r in failed:
        notes.append(f"- failed: {r.get('label')} {r.get('size')} seed={r.get('seed')} "
                     f"({r.get('run_id')}): {r.get('error')}")
    for p in problems:
        notes.append(f"- skipped: {p}")
    if t.empty:
        return Table(metric, ["Size", "Model"], notes=notes)
    multi = t.groupby("dataset")["protocol"].nunique().max() > 1
    t = t.assign(col=[f"{d} [{p}]" if multi else d for d, p in zip(t["dataset"], t["protocol"])])
    cols = list(dict.fromkeys(t["col"]))
    best = {}
    for c in cols:
        g = t[(t["col"] == c) & (~t["model"].isin(SOURCE_LABELS))].dropna(subset=["value"])
        if len(g) > 1:
            best[c] = g["value"].min()
    rows, bold = [], set()
    for (size, model), g in t.groupby(["size", "model"], sort=False):
        cells = [str(size), str(model)]
        for c in cols:
            r = g[g["col"] == c]
            if r.empty:
                cells.append("—")
                continue
            r = r.iloc[0]
            if c in best and r["value"] == best[c] and model not in SOURCE_LABELS:
                bold.add((len(rows), len(cells)))
            cells.append(_fmt(r))
        rows.append(cells)
    return Table(metric, ["Size", "Model", *cols], rows, bold, notes=notes)


def markdown(t: pd.DataFrame, problems=(), failed=(), metric: str = "ppl", crossings=()) -> str:
    return md_table(table(t, problems, failed, metric, crossings))


# ----------------------------------------------------------------------------- sample quality
SOURCE_TEXT = "Source text"
SAMPLE_COLUMNS = ["gen_ppl", "true_nll", "valid", "ngram_tv", "entropy", "mem", "div", "mauve", "nfe", "samples_per_s"]
ARROW = {"gen_ppl": " ↓", "mem": " ↓", "div": " ↑", "mauve": " ↑", "nfe": " ↓", "entropy": "", "samples_per_s": " ↑",
         "true_nll": "", "valid": " ↑", "ngram_tv": " ↓"}
HEADER = {"samples_per_s": "samples/s", "nfe": "NFE"}


def collect_scores(out: Path, recs: list[dict]) -> list[dict]:
    """The ``scores.json`` (bench.metrics.score) of every complete run that has one."""
    out_scores = []
    runs = os.path.join(out, "runs")
    for r in recs:
        try:   # no Path per run and no stat before the open: 10,000 runs without scores cost ~nothing
            with open(os.path.join(runs, r["run_id"], "scores.json"), "rb") as f:
                out_scores.append(json.loads(f.read().decode("utf-8")))
        except (OSError, *JSON_ERRORS):   # none yet, or derived data damaged: rescored on the next `score`
            continue
    return out_scores


def _floored(metric: str, m: dict, res_set: dict) -> dict:
    """``m`` without its value when its set is smaller than the metric's ``min_samples`` (the one
    recorded, else today's default): scores written before the floor existed never show one."""
    from bench.metrics import FLOORS, floor_note

    if metric not in FLOORS or m.get("value") is None or not isinstance(res_set.get("n"), int):
        return m
    floor = ((res_set.get("settings") or {}).get(metric) or {}).get("min_samples", FLOORS[metric][0])
    if res_set["n"] >= floor:
        return m
    return {**m, "value": None, "std": None, "note": floor_note(metric, floor, FLOORS[metric][1])}


def sample_tidy(scores: list[dict]) -> pd.DataFrame:
    """Tidy sample-metric rows (the leaderboard columns plus ``steps`` and ``note``): one per
    (size, model, steps, dataset, metric, settings id), mean over seeds with the t-interval and
    the std over seeds (one seed: MAUVE's std over its own seeds). A metric below its sample
    floor has no value, only the note saying why (:func:`_floored`); gen_ppl rows name their scorer."""
    rows, seen_source = [], set()
    for sc in scores:
        ds = (sc.get("reference") or {}).get("dataset")
        base = {"size": sc["size"], "dataset": ds, "seed": sc["seed"]}
        sets = [({**base, "model": sc["label"], "steps": b.get("steps")}, b) for b in sc["budgets"]]
        src = sc.get("source_text")
        if src and (sc["size"], sc["seed"], ds) not in seen_source:
            seen_source.add((sc["size"], sc["seed"], ds))
            sets.append(({**base, "model": SOURCE_TEXT, "steps": None}, src))
        for key, b in sets:
            for metric, m in b["metrics"].items():
                from bench.metrics.scoreview import gen_ppl_scorer  # (pydantic) only with sample scores

                m = _floored(metric, m, b)
                rows.append({**key, "metric": metric, "value": m.get("value"), "inner_std": m.get("std"),
                             "protocol": m.get("id"), "note": m.get("note"),
                             "scorer": gen_ppl_scorer(b) if metric == "gen_ppl" else None})
            for metric in ("nfe", "samples_per_s"):
                if b.get(metric) is not None:
                    rows.append({**key, "metric": metric, "value": b[metric], "inner_std": None,
                                 "protocol": metric, "note": None})
    cols = COLUMNS + ["steps", "note", "scorer"]
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows)
    df["steps"] = df["steps"].astype("object")
    out = []
    keys = ["size", "model", "steps", "dataset", "metric", "protocol"]
    for key, g in df.groupby(keys, sort=False, dropna=False):
        row = dict(zip(keys, key))
        vals = g["value"].dropna().astype(float)
        n = len(g)
        note = next((x for x in g["note"] if isinstance(x, str)), None)
        row.update(bound=False, n_seeds=n, params=None, note=note, estimate="sample", scorer=g["scorer"].iloc[0])
        if vals.empty:
            row.update(value=None, ci_low=None, ci_high=None, std=None)
        elif len(vals) == 1:
            sd = g["inner_std"].dropna()
            row.update(value=float(vals.iloc[0]), ci_low=None, ci_high=None,
                       std=float(sd.iloc[0]) if len(sd) else None)
        else:
            mean, sd = float(vals.mean()), float(vals.std(ddof=1))
            half = t_quantile(0.95, len(vals) - 1) * sd / math.sqrt(len(vals))
            row.update(value=mean, ci_low=mean - half, ci_high=mean + half, std=sd)
        out.append(row)
    t = pd.DataFrame(out)[cols]
    t["_m"] = t["model"].map(lambda m: 2 if m == SOURCE_TEXT else 0 if m == "GPT-2" else 1)
    t["_k"] = t["steps"].map(lambda x: -1 if x is None or (isinstance(x, float) and math.isnan(x)) else x)
    return t.sort_values(["size", "_m", "model", "_k"], kind="stable").drop(columns=["_m", "_k"]).reset_index(drop=True)


def _num(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def _fmt_sample(r) -> str:
    v = r["value"]
    if not _num(v):
        return "—"
    digits = 1 if r["metric"] in ("gen_ppl", "nfe", "samples_per_s") else 4 if r["metric"] == "ngram_tv" else 3
    s = f"{v:.{digits}f}"
    if _num(r["std"]):
        s += f" ±{r['std']:.{digits}f}"
    if isinstance(r.get("note"), str):
        s += " †"
    return s


SAMPLE_NOTE = ("Sample quality (bench/metrics): gen_ppl = generative perplexity under the scorer (lower is "
               "more fluent to it; read it with entropy: repetitive text has low gen_ppl and low entropy), "
               "entropy = mean unigram entropy per sample (nats; closest to Source text is best), mem = "
               "fraction of 4-grams found in the training split, div = Π_{n=2..4} unique/total n-grams, "
               "mauve against held-out human text (Source text's mauve is the ceiling: a second human set "
               "against the same reference). ± is the std over seeds (over MAUVE seeds with one seed). "
               "† marks a value with a caveat, — a cell without a value; the notes below say why. "
               "Settings: scores.json of each run; metrics.json of this directory.")


def sample_table(st: pd.DataFrame, t: pd.DataFrame, several: bool = False) -> Table:
    """The TEncDM table's shape: rows = Size / Model / Steps, columns = the likelihood ppl on the
    reference dataset (bound "≤", "—" for methods without one) and the sample metrics with ↓/↑;
    best per column in bold (Source text excluded); ± is the std over seeds (one seed: over
    MAUVE's k-means seeds); numbers under different settings get separate columns. ``several``:
    one of several such tables, one per reference dataset (its name and head say which)."""
    ds = next((d for d in st["dataset"] if isinstance(d, str)), None)
    multi = st.groupby("metric")["protocol"].nunique()
    cols = [(m, p) for m in SAMPLE_COLUMNS for p in dict.fromkeys(st[st["metric"] == m]["protocol"])]
    names = [f"{HEADER.get(m, m)}{ARROW[m]}" + (f" [{p}]" if multi.get(m, 1) > 1 else "") for m, p in cols]
    ppl = t[(t["metric"] == "ppl") & (t["dataset"] == ds)] if ds else t.iloc[:0]
    best = {}
    for m, p in cols:
        if ARROW[m].strip() and m != "samples_per_s":
            g = st[(st["metric"] == m) & (st["protocol"] == p) & (st["model"] != SOURCE_TEXT)].dropna(subset=["value"])
            if len(g) > 1 and g["value"].nunique() > 1:
                best[(m, p)] = g["value"].min() if "↓" in ARROW[m] else g["value"].max()
    rows, bold = [], set()
    for (size, model, steps), g in st.groupby(["size", "model", "steps"], sort=False, dropna=False):
        pr = ppl[(ppl["size"] == size) & (ppl["model"] == (SOURCE_LABEL if model == SOURCE_TEXT else model))]
        cells = [str(size), str(model), "—" if not _num(steps) else str(int(steps)),
                 _fmt(pr.iloc[0]) if len(pr) else "—"]
        for m, p in cols:
            r = g[(g["metric"] == m) & (g["protocol"] == p)]
            if r.empty:
                cells.append("—")
                continue
            if (m, p) in best and r.iloc[0]["value"] == best[(m, p)] and model != SOURCE_TEXT:
                bold.add((len(rows), len(cells)))
            cells.append(_fmt_sample(r.iloc[0]))
        rows.append(cells)
    notes = ["", SAMPLE_NOTE]
    sc = st[st["metric"] == "gen_ppl"].dropna(subset=["scorer"]).groupby("protocol", sort=False)["scorer"].first()
    notes += [f"gen_ppl{f' [{p}]' if multi.get('gen_ppl', 1) > 1 else ''} scored by: {v}" for p, v in sc.items()]
    if st["metric"].isin(TRUTH_NOTES).any():
        notes.append(truth_note(st, ppl))
    # "† metric: …" for a value with a caveat, "— metric: …" for why a cell has no value
    marked = {f"{'†' if _num(v) else '—'} {m}: {n}"
              for m, v, n in zip(st["metric"], st["value"], st["note"]) if isinstance(n, str)}
    notes += [f"- {n}" for n in sorted(marked)]
    return Table(f"samples-{ds}" if several else "samples", ["Size", "Model", "Steps", f"ppl ({ds})", *names],
                 rows, bold, head=[f"Samples of the runs on {ds}"] if several else [], notes=notes)


def sample_markdown(st: pd.DataFrame, t: pd.DataFrame) -> str:
    return md_table(sample_table(st, t))


TRUTH_NOTES = {
    "true_nll": "true_nll = mean NLL per token of the samples under the source itself (nats; the samples it can "
                "produce), to read beside the source's entropy h: a sampler that draws from the source has "
                "E[true_nll] = h, below h it is too sure (too little diversity), above it off the source",
    "valid": "valid = fraction of samples the source can produce (well-formed)",
    "ngram_tv": "ngram_tv = total variation between the samples' n-gram frequencies and the source's exact n-gram "
                "marginals, mean over n = 1..3; above 0 even for true samples: Source text scores as many fresh "
                "true blocks, its ngram_tv is that finite-sample floor (the ceiling a model can reach)"}


def truth_note(st: pd.DataFrame, ppl: pd.DataFrame) -> str:
    """The note under a synthetic suite's sample table (bench.metrics.truth): what each truth
    metric is, and the source's entropy h (from its ``Source (true)`` row; Source text's ppl)."""
    have = [TRUTH_NOTES[m] for m in TRUTH_NOTES if (st["metric"] == m).any()]
    src = ppl[ppl["model"] == SOURCE_LABEL].dropna(subset=["value"])
    if len(src):
        r = src.iloc[0]
        kind = "an estimate" if r.get("estimate") == "sampled" else "exact"
        have.append(f"the source's h = ln ppl({SOURCE_LABEL}) = {math.log(float(r['value'])):.4f} nats/token ({kind})")
    return "Scored by the source (synthetic suite; gen_ppl and MAUVE do not apply): " + "; ".join(have) + "."


TEXT_COLUMNS = ("size", "model", "dataset", "note")   # labels and names: text a user or a record chose
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def csv_text(t: pd.DataFrame) -> str:
    """The tidy table as CSV, with every text cell a spreadsheet would take for a formula
    (starting with = + - @, tab or CR) prefixed with ``'`` (OWASP's CSV-injection rule);
    numeric columns are never touched."""
    t = t.copy()
    for c in TEXT_COLUMNS:
        if c in t.columns:
            t[c] = t[c].map(lambda x: "'" + x if isinstance(x, str) and x.startswith(_FORMULA) else x)
    return t.to_csv(index=False)


class Board(NamedTuple):
    """What the leaderboard shows of an output directory: its tables in leaderboard.md's order
    (sample quality first, when there are samples), the tidy likelihood and sample rows, the
    complete records and the problems (corrupt records) met on the way."""
    tables: list[Table]
    t: pd.DataFrame
    st: pd.DataFrame
    recs: list[dict]
    problems: list[str]
    it: pd.DataFrame | None = None   # the infill rows (bench.infilltable)


def board(out: Path, compare: Path | None = None) -> Board:
    """Read ``out``'s records and scores into its tables (``compare``: bench.tables.compare_tables)."""
    recs, problems, failed = collect(out)
    t = tidy(recs)
    tbs = [table(t, problems, failed, crossings=text_crossings(recs))]
    tbs += [table(t, metric=m) for m in EXTRA_METRICS if (t["metric"] == m).any()]
    if compare is not None:
        tbs += tables.compare_tables(t, compare, our_presets=[r.get("protocol", {}).get("preset", "custom")
                                                             for r in recs])
    scores = collect_scores(out, recs)
    st, it = sample_tidy(scores), infilltable.infill_tidy(scores)
    ds = st["dataset"].astype(object).fillna("")
    tbs[:0] = [sample_table(st[ds == d], t, ds.nunique() > 1) for d in dict.fromkeys(ds)]   # one per reference set
    return Board(tbs + infilltable.infill_tables(it), t, st, recs, problems, it)


def write(out: Path, fmt: str | None = None, compare: Path | None = None
          ) -> tuple[str, list[str]]:
    """Write leaderboard.csv, leaderboard.md, training.png (loss curves) and learning.png
    (intermediate evaluation) into ``out`` (with sample metrics — runs' scores.json — also the
    TEncDM-shaped table and frontier.png); ``compare`` = a published table's CSV
    (bench.tables.resolve_reference) appends ours / published / relative difference per cell
    to the markdown (bench.tables.compare). Return (text in ``fmt``, problems)."""
    from bench.records import atomic_write_text

    b = board(out, compare)
    md = "\n".join(md_table(tb) for tb in b.tables)
    t, recs = b.t, b.recs
    if not b.st.empty:
        t = pd.concat([t.astype(object), b.st.drop(columns="scorer").astype(object)], ignore_index=True)
        from bench.plots import frontier
        frontier(b.st, Path(out) / "frontier.png")
    csv = csv_text(t)
    atomic_write_text(Path(out) / "leaderboard.csv", csv)
    atomic_write_text(Path(out) / "leaderboard.md", md)
    infilltable.write(out, b.it, csv_text)   # infill.csv, infill.png (eval.infill)
    from bench.plots import training_curves
    training_curves(recs, Path(out) / "training.png")
    from bench.plots import learning_curves
    learning_curves(recs, Path(out) / "learning.png")
    if fmt == "json":
        return json.dumps(json.loads(t.to_json(orient="records")), indent=2), b.problems
    if fmt == "latex":
        return tables.latex(t), b.problems
    return (csv if fmt == "csv" else md), b.problems
