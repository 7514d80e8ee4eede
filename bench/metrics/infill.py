"""Infill quality: a run's ``infill.jsonl`` (bench/infill.py) scored against the hidden text.

Per (eval set, setting, step budget) over the N filled blocks, block i with hidden positions S_i,
true ids x_{S_i} and fill y_{S_i}:

- **exact**: the fraction of blocks with y_{S_i} = x_{S_i} (every hidden token right);
- **token_acc**: Σ_i |{j ∈ S_i: y_j = x_j}| / Σ_i |S_i|;
- **rouge1 / rouge2 / rougeL**: the mean over blocks of the ROUGE F-measure (``rouge-score``,
  Lin 2004) of the fill's text against the hidden text, each the hidden ids in position order,
  decoded. Text: rouge-score's own word tokenizer (lower-cased alphanumeric words, no stemming);
  a synthetic source's symbols: each symbol one word.
- **fill_nll** (text): the scorer LM's NLL per token of the whole filled block (nats; the suite's
  gen_ppl scorer, bench/metrics/genppl.py, over every token — no cut at the first EOS — pooled
  over blocks, Σ NLL / Σ tokens), beside the same of the true blocks (the ``Source`` row).
- **true_cond_nll** (synthetic sources with a posterior pass, bench/data/posterior.py): the
  source's own conditional NLL of the fill given both sides, Σ_i −log p(y_{S_i} | x_{R_i}) / Σ_i |S_i|
  (nats per hidden token), read against **cond_entropy**, Σ_i H(X_{S_i} | x_{R_i}) / Σ_i |S_i|
  (exact for markov, estimated with its interval for hmm): a filler drawing from the source's
  conditional has E[true_cond_nll] = cond_entropy; a left-to-right filler that ignores the
  right side pays the difference. A fill the source cannot produce (p = 0) is left out and
  counted in the note.

The ``Source`` set of each task scores the true fill the same way (exact = 1, ROUGE = 1: the
ceiling; its true_cond_nll is one draw of the conditional, ≈ cond_entropy).
"""
from __future__ import annotations

import math

import numpy as np

from bench.infill import read_infill
from bench.metrics.base import settings_id

METRICS = ("exact", "token_acc", "rouge1", "rouge2", "rougeL", "fill_nll", "true_cond_nll", "cond_entropy")
SOURCE = "Source"


class SymbolWords:
    """rouge-score tokenizer for a synthetic source's decoded symbols: each symbol one word."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


def rouge(targets: list[str], fills: list[str], symbols: bool) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure of each fill against its target text."""
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False,
                                  tokenizer=SymbolWords() if symbols else None)
    rows = [sc.score(t, f) for t, f in zip(targets, fills)]
    return {k: float(np.mean([r[k].fmeasure for r in rows])) for k in ("rouge1", "rouge2", "rougeL")}


def matches(lines: list[dict]) -> dict[str, float]:
    """exact and token_acc of the filled lines (module doc)."""
    same = [np.asarray(r["ids"])[r["hidden"]] == np.asarray(r["target"]) for r in lines]
    return {"exact": float(np.mean([s.all() for s in same])),
            "token_acc": float(sum(s.sum() for s in same) / max(1, sum(len(s) for s in same)))}


def truth_scores(source, lines: list[dict], cond: dict | None) -> dict[str, dict]:
    """{true_cond_nll} of the lines' fills under the source (bench.data.posterior), given the
    per-block H values ``cond`` of the same blocks (their log p(x_R) in ``cond['logz']``)."""
    x = np.asarray([r["ids"] for r in lines], dtype=np.int64)
    S = np.asarray([len(r["hidden"]) for r in lines], dtype=np.float64)
    idx = [r["index"] for r in lines]
    inside = ((x >= 0) & (x < source.vocab)).all(1)
    lp = np.full(len(x), -np.inf)
    if inside.any():
        lp[inside] = source.log_prob(x[inside])
    nll = -lp + cond["logz"][idx]
    ok = np.isfinite(nll)
    out = {"value": float(nll[ok].sum() / S[ok].sum()) if ok.any() else None}
    if not ok.all():
        out["note"] = f"{int((~ok).sum())} of {len(ok)} fills have p = 0 under the source (not counted)"
    return {"true_cond_nll": out}


def source_conditional(source, task_lines: list[dict], seed: int) -> dict | None:
    """Per block of a task (by index): the true blocks, log p(x_R) and H(X_S | x_R) (bench.data.posterior)."""
    from bench.data.posterior import cond_entropy, log_marginal

    by = {r["index"]: r for r in task_lines}
    n = max(by) + 1
    x = np.zeros((n, len(task_lines[0]["ids"])), dtype=np.int64)
    keep = np.ones_like(x, dtype=bool)
    for i, r in by.items():
        x[i] = r["ids"]
        x[i, r["hidden"]] = r["target"]
        keep[i, r["hidden"]] = False
    logz = log_marginal(source, x, keep)
    if logz is None:
        return None
    H = cond_entropy(source, x, keep, seed=seed)
    return {"x": x, "keep": keep, "logz": logz, **H}


def fill_nll(lines: list[dict], setup, truth: bool = False) -> dict:
    """The scorer's NLL per token of the filled (``truth``: the true) blocks, whole (module doc)."""
    from bench.metrics.genppl import gen_ppl, scorer_tokens

    if setup.scorer is None:
        return {"value": None, "note": setup.scorer_note}
    view = (setup.scorer.tokenizer_key, setup.scorer.encode, setup.scorer.eos_id)
    st = setup.cfg.gen_ppl.model_copy(update={"eos": "none", "aggregation": "token"})
    decode = setup.decode
    blocks = [true_block(r) if truth else r["ids"] for r in lines]
    seqs = scorer_tokens([{"ids": b, "text": decode(b)} for b in blocks], *view, st, setup.samples_tokenizer)
    v = gen_ppl(seqs, setup.scorer, st)["value"]
    return {"value": None if v is None else math.log(v)}


def true_block(r: dict) -> list[int]:
    x = list(r["ids"])
    for j, t in zip(r["hidden"], r["target"]):
        x[j] = t
    return x


def score_set(lines: list[dict], setup, cond: dict | None, symbols: bool, truth: bool = False) -> dict:
    """{metric: {value, [note]}} of one (task, budget) set of filled lines (``truth``: the true fills)."""
    dec = setup.decode
    use = [{**r, "ids": true_block(r)} for r in lines] if truth else lines
    fills = [dec(np.asarray(r["ids"])[r["hidden"]].tolist()) for r in use]
    m = {k: {"value": v} for k, v in {**matches(use), **rouge([dec(r["target"]) for r in use], fills,
                                                                symbols)}.items()}
    if setup.truth is not None:
        m.update(truth_scores(setup.truth.source, use, cond) if cond is not None else
                 {"true_cond_nll": {"value": None, "note": f"{setup.truth.dataset}: no conditional pass "
                                                          "(bench.data.posterior)"}})
        if truth and cond is not None:
            S = float(sum(len(r["hidden"]) for r in use))
            H = cond["values"][[r["index"] for r in use]]
            m["cond_entropy"] = {"value": float(H.sum() / S), "estimate": cond["estimate"]}
            if cond["estimate"] == "sampled":
                half = cond["z"] * cond["se_total"] / S
                m["cond_entropy"].update(ci_low=m["cond_entropy"]["value"] - half,
                                         ci_high=m["cond_entropy"]["value"] + half, draws=cond["draws"])
    else:
        m["fill_nll"] = fill_nll(use, setup, truth)
    return m


def settings(setup, symbols: bool, infill: dict | None) -> dict:
    """The resolved scoring settings (recorded beside the values, with their id)."""
    d = {"fills": infill, "rouge": {"types": ["rouge1", "rouge2", "rougeL"], "measure": "fmeasure",
                                    "tokenizer": "symbols" if symbols else "rouge-score words", "stemmer": False}}
    if setup.truth is not None:
        d["truth"] = {"source": setup.truth.dataset, "unit": "nats per hidden token"}
    else:
        d["fill_nll"] = {"scorer": setup.scorer_desc, "tokens": "whole filled block", "eos": "none",
                         "unit": "nats per token"}
    return {**d, "id": settings_id(d)}


def score_infill(path, setup, infill: dict | None, seed: int = 0) -> dict:
    """A run's infill file scored per (dataset, setting, steps) (module doc), with the Source set
    of each task and the reasons a task has no fills."""
    lines = read_infill(path)
    symbols = setup.truth is not None
    out, groups = [], {}
    for r in lines:
        groups.setdefault((r["dataset"], r["setting"]), []).append(r)
    for (ds, setting), g in groups.items():
        unfilled = [r for r in g if "unfilled" in r]
        if unfilled:
            out.append({"dataset": ds, "setting": setting, "steps": None, "note": unfilled[0]["unfilled"]})
            continue
        cond = None
        if setup.truth is not None:
            cond = source_conditional(setup.truth.source, g, seed)
        budgets = {}
        for r in g:
            budgets.setdefault(r["steps"], []).append(r)
        first = next(iter(budgets.values()))
        out.append({"dataset": ds, "setting": setting, "steps": None, "model": SOURCE, "n": len(first),
                    "metrics": score_set(first, setup, cond, symbols, truth=True)})
        for steps, b in budgets.items():
            out.append({"dataset": ds, "setting": setting, "steps": steps, "n": len(b),
                        "nfe": float(np.mean([r["nfe"] for r in b])),
                        "hidden_per_block": float(np.mean([len(r["hidden"]) for r in b])),
                        "metrics": score_set(b, setup, cond, symbols)})
    return {"sets": out, "settings": settings(setup, symbols, infill)}
