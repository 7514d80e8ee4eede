"""Showing a score result (bench.metrics.score): the aligned text table and the JSON that
``tdbench score`` prints, one metric as a table cell, and the numbers that tell whether a
rescoring reproduced a result. Pure functions of the result dict; nothing is computed here."""
from __future__ import annotations

SAMPLE_METRICS = ("gen_ppl", "true_nll", "valid", "ngram_tv", "entropy", "mem", "div", "mauve")


def fmt_metric(m: dict | None) -> str:
    """One metric as a table cell: ``12.3 ±0.45``, ``†`` when it carries a note, ``—`` when absent."""
    if not m or m.get("value") is None:
        return "—"
    s = f"{m['value']:.4g}"
    if m.get("std") is not None:
        s += f" ±{m['std']:.2g}"
    if m.get("note"):
        s += " †"
    return s


def gen_ppl_scorer(res_set: dict) -> str | None:
    """Which LM a set's gen_ppl was scored by, as its settings record it (a named model: + what it is)."""
    st = (res_set.get("settings") or {}).get("gen_ppl") or {}
    if not st.get("scorer"):
        return None
    return str(st["scorer"]) + (f" = {st['scorer_model']['model']}" if st.get("scorer_model") else "")


def score_rows(name: str, res: dict) -> list[tuple[str, dict, float | None]]:
    """(label, metrics, nfe) per step budget of a score result, then its Source-text row."""
    rows = []
    for b in res["budgets"]:
        label = name + (f" ({b['steps']} steps)" if b.get("steps") is not None else "")
        rows.append((label, b["metrics"], b.get("nfe")))
    if "source_text" in res:
        rows.append(("Source text", res["source_text"]["metrics"], None))
    return rows


def score_table(rows) -> str:
    """score_rows as an aligned text table, the notes below it: "† metric: …" for a value with a
    caveat, "— metric: …" for why a cell has none."""
    shown = [k for k in SAMPLE_METRICS if any(k in m for _, m, _ in rows)]
    head = ["samples", *shown, "nfe"]
    body = [[label, *(fmt_metric(m.get(k)) for k in shown), "—" if nfe is None else f"{nfe:g}"]
            for label, m, nfe in rows]
    w = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) for r in [head, *body]]
    notes = sorted({("—" if v.get("value") is None else "†", f"{k}: {v['note']}")
                    for _, m, _ in rows for k, v in m.items() if v.get("note")})
    return "\n".join(lines + [f"{mark} {n}" for mark, n in notes])


def flat_scores(res_set: dict, settings: bool = True) -> dict:
    """One sample set's metrics as {metric: value, metric_std: std, notes, n, settings}."""
    out = {k: v.get("value") for k, v in res_set["metrics"].items()}
    for k, v in res_set["metrics"].items():
        if v.get("std") is not None:
            out[f"{k}_std"] = v["std"]
        if v.get("note"):
            out.setdefault("notes", {})[k] = v["note"]
    out["n"] = res_set["n"]
    if settings:
        out["settings"] = res_set["settings"]
    return out


def score_json(res: dict) -> dict:
    """A score result as ``tdbench score --format json`` prints it (one budget: flat)."""
    bs = res["budgets"]
    out = {**flat_scores(bs[0])} if len(bs) == 1 else {
        "budgets": [{"steps": b.get("steps"), "nfe": b.get("nfe"), **flat_scores(b)} for b in bs]}
    if len(bs) == 1 and bs[0].get("nfe") is not None:
        out["nfe"] = bs[0]["nfe"]
    if "source_text" in res:
        out["source_text"] = flat_scores(res["source_text"], settings=False)
    for k in ("file", "run_id", "label", "scorer", "reference"):
        if res.get(k) is not None:
            out[k] = res[k]
    return out


def score_values(res: dict) -> list[dict]:
    """The numbers of a score result (value, std, settings id per metric and set), to tell
    whether rescoring reproduced them."""
    sets = [*res.get("budgets", []), *([res["source_text"]] if "source_text" in res else [])]
    return [{k: (v.get("value"), v.get("std"), v.get("id")) for k, v in b["metrics"].items()} for b in sets]
