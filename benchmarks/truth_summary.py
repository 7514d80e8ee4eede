"""What a truth suite's leaderboard says, as the tables of results/truth/README.md.

    python benchmarks/truth_summary.py results/truth

Reads ``leaderboard.csv`` (written by ``tdbench run`` / ``tdbench leaderboard``) and prints
markdown: (1) per method and source the distance to the truth — the paired gap to the source's
exact NLL of the same test blocks (nats/token, mean over seeds with its t-interval), as a
percentage of that NLL, and the issue's target for it; (2) the published ordering (AR ≤ absorbing
≤ uniform) per source, decided by non-overlapping seed intervals; (3) the sampler cost: per step
budget, the samples' true NLL minus the source's entropy h (nats/token; 0 = samples as likely
under the source as its own), and on dyck the fraction well-formed. Nothing here is a new
number: each figure is a cell of leaderboard.csv, rearranged.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

# The convergence targets (fraction of the truth) per (method group, source name).
TARGETS = {("AR", "markov"): 0.01, ("AR", "hmm"): 0.01, ("AR", "dyck"): 0.01,
           ("absorbing", "markov"): 0.03, ("absorbing", "hmm"): 0.05}
GROUP = {"GPT-2": "AR", "MDLM": "absorbing", "SEDD Absorb": "absorbing", "D3PM Absorb": "absorbing",
         "CSM": "absorbing", "SEDD Uniform": "uniform", "D3PM Uniform": "uniform"}
TARGETED = {"GPT-2", "MDLM", "SEDD Absorb", "D3PM Absorb"}   # the rows the issue sets a target for
SOURCES = ("Source (true)", "Source (test blocks)", "Source text")


def source_name(dataset: str) -> str:
    return dataset.split("(")[0]


def _cell(t: pd.DataFrame, model: str, ds: str, metric: str, steps=None) -> pd.Series | None:
    g = t[(t.model == model) & (t.dataset == ds) & (t.metric == metric)]
    if steps is not None:
        g = g[g.steps == steps]
    return g.iloc[0] if len(g) else None


def distance_table(t: pd.DataFrame, datasets: list[str], models: list[str]) -> list[str]:
    lines = ["| model | " + " | ".join(source_name(d) for d in datasets) + " |",
             "|---|" + "---|" * len(datasets)]
    for m in models:
        cells = []
        for ds in datasets:
            gap, blocks = _cell(t, m, ds, "gap"), _cell(t, "Source (test blocks)", ds, "ppl")
            if gap is None or blocks is None or pd.isna(gap.value):
                cells.append("—")
                continue
            nll = math.log(blocks.value)
            pct = gap.value / nll
            ci = f" [{gap.ci_low:+.4f}, {gap.ci_high:+.4f}]" if not pd.isna(gap.ci_low) else ""
            target = TARGETS.get((GROUP.get(m), source_name(ds))) if m in TARGETED else None
            mark = "" if target is None else (" ✓" if gap.ci_high / nll <= target else
                                              " ✗" if gap.ci_low / nll > target else " ?")
            cells.append(f"{'≤ ' if GROUP.get(m, 'cont') != 'AR' else ''}{gap.value:+.4f}{ci} "
                         f"({100 * pct:.1f}%{'' if target is None else f', target {100 * target:.0f}%'}){mark}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def ordering(t: pd.DataFrame, datasets: list[str]) -> list[str]:
    out = []
    for ds in datasets:
        g = t[(t.dataset == ds) & (t.metric == "gap") & t.model.isin(GROUP)]
        grp = g.model.map(GROUP)
        best = {k: g[grp == k].sort_values("value").iloc[0] for k in ("AR", "absorbing", "uniform") if (grp == k).any()}
        pairs = [("AR", "absorbing"), ("absorbing", "uniform")]
        verdicts = []
        for a, b in pairs:
            if a not in best or b not in best:
                continue
            ra, rb = best[a], best[b]
            sep = ra.ci_high < rb.ci_low
            verdicts.append(f"best {a} ({ra.model} {ra.value:+.4f}) {'<' if ra.value < rb.value else '>'} best {b} "
                            f"({rb.model} {rb.value:+.4f}): {'separated' if sep else 'intervals overlap'}")
        out.append(f"- {source_name(ds)}: " + "; ".join(verdicts))
    return out


def sampler_table(t: pd.DataFrame, ds: str, models: list[str]) -> list[str]:
    h_row = _cell(t, "Source (true)", ds, "ppl")
    h = math.log(h_row.value)
    st = t[(t.dataset == ds) & (t.metric == "true_nll") & t.steps.notna()]
    budgets = sorted({int(s) for s in st.steps})
    dyck = source_name(ds) == "dyck"
    lines = [f"{source_name(ds)} (h = {h:.4f} nats/token): true_nll − h"
             + (" / fraction well-formed" if dyck else "") + " per step budget",
             "", "| model | " + " | ".join(map(str, budgets)) + " |", "|---|" + "---|" * len(budgets)]
    for m in models:
        cells = []
        for b in budgets:
            r, v = _cell(t, m, ds, "true_nll", float(b)), _cell(t, m, ds, "valid", float(b))
            c = "—" if r is None or pd.isna(r.value) else f"{r.value - h:+.3f}"
            if dyck and v is not None and not pd.isna(v.value):
                c += f" / {v.value:.2f}"
            cells.append(c)
        if any(c != "—" for c in cells):
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    ar = t[(t.model == "GPT-2") & (t.dataset == ds) & (t.metric == "true_nll")]
    src = _cell(t, "Source text", ds, "true_nll")
    extra = []
    if len(ar):
        v = _cell(t, "GPT-2", ds, "valid")
        extra.append(f"GPT-2 (ancestral, {ar.iloc[0].value - h:+.3f}"
                     + (f" / {v.value:.2f}" if dyck and v is not None else "") + ")")
    if src is not None:
        extra.append(f"fresh true blocks ({src.value - h:+.3f})")
    return lines + ["", "For comparison: " + ", ".join(extra) + "."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    t = pd.read_csv(ap.parse_args().out / "leaderboard.csv")
    datasets = list(dict.fromkeys(t[t.metric == "gap"].dataset))
    models = [m for m in dict.fromkeys(t.model) if m not in SOURCES]
    models.sort(key=lambda m: (list(GROUP).index(m) if m in GROUP else len(GROUP), m))
    print("\n".join(["## Distance to the truth", ""] + distance_table(t, datasets, models)
                    + ["", "## Ordering", ""] + ordering(t, datasets) + ["", "## Sampler cost", ""]))
    for ds in datasets:
        print("\n".join(sampler_table(t, ds, models)) + "\n")


if __name__ == "__main__":
    main()
