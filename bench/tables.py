"""Tables for papers, and the published tables beside ours.

- :func:`latex`: the leaderboard pivoted like the SEDD / TEncDM tables (booktabs; rows Size /
  Model, one column per dataset, ``$\\leq$`` for bounds, best per column in bold, the interval
  as a ``$_{\\pm h}$`` subscript). The markdown leaderboard (bench.leaderboard.markdown) has
  the same shape.
- :class:`Table` and :func:`md_table`: one table as data (header, rows of cell texts, best
  cells, the lines above and below it) and as markdown; the leaderboard (bench.leaderboard)
  builds its tables as ``Table`` so that leaderboard.md and the HTML report (bench.report)
  show the same cells.
- :func:`compare`: ours vs a published table (``results/reference/NAME.csv``): one cell per
  (size, model) × dataset with ours, published and the relative difference (ours − published)
  / published, and a list of the cells that have no counterpart on either side.

A reference CSV is tidy like ``leaderboard.csv`` (``size, model, dataset, metric, value,
bound``, plus ``protocol`` and ``published_as``); ``#`` lines at the top name the source.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench.errors import UserError

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "results" / "reference"
SOURCE_LABEL = "Source (true)"
SOURCE_BLOCKS_LABEL = "Source (test blocks)"  # the source's exact NLL of the very test blocks
SOURCE_LABELS = (SOURCE_LABEL, SOURCE_BLOCKS_LABEL)  # reference rows of a synthetic source, not models


def _num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _true(x) -> bool:
    if isinstance(x, str):
        return x.strip().lower() in ("true", "1", "yes")
    return x is not None and not (isinstance(x, float) and math.isnan(x)) and bool(x)


def pivot(t: pd.DataFrame, metric: str = "ppl", lower_is_better: bool = True):
    """(columns, rows) of the paper-shaped table: rows are (size, model, {column: cell}),
    a cell is a dict value / bound / half (CI half-width or None) / best."""
    t = t[t["metric"] == metric]
    if t.empty:
        return [], []
    multi = t.groupby("dataset")["protocol"].nunique().max() > 1 if "protocol" in t else False
    t = t.assign(col=[f"{d} [{p}]" if multi else d for d, p in zip(t["dataset"], t.get("protocol", t["dataset"]))])
    cols = list(dict.fromkeys(t["col"]))
    best = {}
    for c in cols:
        vals = [_num(v) for v, m in zip(t.loc[t["col"] == c, "value"], t.loc[t["col"] == c, "model"])
                if m not in SOURCE_LABELS and _num(v) is not None]
        if len(vals) > 1:
            best[c] = min(vals) if lower_is_better else max(vals)
    rows = []
    for (size, model), g in t.groupby(["size", "model"], sort=False):
        cells = {}
        for c in cols:
            r = g[g["col"] == c]
            if r.empty:
                continue
            r = r.iloc[0]
            v = _num(r["value"])
            lo, hi = _num(r.get("ci_low")), _num(r.get("ci_high"))
            half = (hi - lo) / 2 if v is not None and lo is not None and hi is not None and hi - lo > 1e-9 else None
            cells[c] = {"value": v, "bound": _true(r.get("bound")), "half": half,
                        "best": v is not None and c in best and v == best[c] and model not in SOURCE_LABELS}
        rows.append((size, model, cells))
    return cols, rows


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
        # OT1 fonts set these as ¡ ¿ — outside math mode
        "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}"}


_CONTROLS = re.compile(r"[\x00-\x1f\x7f]+")


def tex_escape(s: str) -> str:
    """Text as LaTeX prints it literally; line breaks and other control characters become a
    space (a blank line would end the paragraph inside a table cell)."""
    return "".join(_TEX.get(ch, ch) for ch in _CONTROLS.sub(" ", str(s)))


def md_escape(s) -> str:
    """Text for one markdown table cell: ``|`` escaped, line breaks as spaces."""
    return _CONTROLS.sub(" ", str(s)).replace("|", "\\|")


@dataclass
class Table:
    """One table of ``leaderboard.md`` as plain text (each renderer escapes it): ``columns``
    the header, ``rows`` the cell texts — the first two name the row (size, model), the markdown
    writes a size once for the rows under it —, ``bold`` the (row, column) cells best in their
    column, ``head`` / ``notes`` the lines above / below it, ``empty`` what stands in for no
    rows; ``name`` is the report's id for it."""
    name: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    bold: set[tuple[int, int]] = field(default_factory=set)
    head: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    empty: str = "no complete runs yet"


def md_table(tb: Table) -> str:
    """``tb`` as markdown: a size is written once for the rows under it, best cells in bold,
    every text through :func:`md_escape`."""
    if not tb.rows:
        body = [f"_{tb.empty}_"]
    else:
        body = ["| " + " | ".join(map(md_escape, tb.columns)) + " |", "|" + "---|" * len(tb.columns)]
        for i, row in enumerate(tb.rows):
            cells = [md_escape(c) for c in row]
            if i and row[0] == tb.rows[i - 1][0]:
                cells[0] = ""
            cells = [f"**{c}**" if (i, j) in tb.bold else c for j, c in enumerate(cells)]
            body.append("| " + " | ".join(cells) + " |")
    return "\n".join([*map(md_escape, tb.head), *body, *map(md_escape, tb.notes)]) + "\n"


def _tex_cell(c: dict | None) -> str:
    if c is None or c["value"] is None:
        return "---"
    s = f"{c['value']:.2f}"
    if c["best"]:
        s = rf"\textbf{{{s}}}"
    if c["bound"]:
        s = r"$\leq$ " + s
    if c["half"] is not None:
        s += rf"$_{{\pm {c['half']:.2f}}}$"
    return s


def latex(t: pd.DataFrame, metric: str = "ppl", caption: str | None = None) -> str:
    cols, rows = pivot(t, metric)
    if not rows:
        return f"% no complete runs with metric {metric}\n"
    out = [r"% tdbench leaderboard; needs \usepackage{booktabs}", r"\begin{table}[t]", r"\centering",
           r"\begin{tabular}{ll" + "r" * len(cols) + "}", r"\toprule",
           "Size & Model & " + " & ".join(tex_escape(c) for c in cols) + r" \\", r"\midrule"]
    last = None
    for size, model, cells in rows:
        if last is not None and size != last:
            out.append(r"\midrule")
        out.append(f"{tex_escape(size.capitalize()) if size != last else ''} & {tex_escape(model)} & "
                   + " & ".join(_tex_cell(cells.get(c)) for c in cols) + r" \\")
        last = size
    cap = caption or (f"{metric} (lower is better); $\\leq$: an upper bound; subscript: the CI half-width; "
                      "best per column in bold.")
    out += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{cap}}}", r"\end{table}"]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- published tables
def resolve_reference(name: str) -> Path:
    """``reference/sedd``, ``sedd``, ``sedd.csv`` (in results/reference/) or a path to a CSV."""
    p = Path(name)
    if p.suffix == ".csv" and p.is_file():
        return p
    stem = name.removeprefix("reference/").removesuffix(".csv")
    q = REFERENCE_DIR / f"{stem}.csv"
    if q.is_file():
        return q
    known = sorted(x.stem for x in REFERENCE_DIR.glob("*.csv"))
    from bench.errors import did_you_mean
    raise UserError(f"--compare: {name}: no such published table; {did_you_mean(stem, known)}")


def read_reference(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """(tidy rows, the file's ``#`` source lines). UserError naming the file if malformed."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        source = [x.lstrip("# ").rstrip() for x in lines if x.startswith("#")]
        ref = pd.read_csv(path, comment="#", dtype={"size": str, "model": str, "dataset": str})
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise UserError(f"{path}: unreadable reference table ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    need = {"size", "model", "dataset", "metric", "value"}
    if not need <= set(ref.columns):
        raise UserError(f"{path}: a reference table needs columns {', '.join(sorted(need))} "
                        f"(has {', '.join(ref.columns)})")
    bad = ref[pd.to_numeric(ref["value"], errors="coerce").isna()]
    if len(bad):
        raise UserError(f"{path}: row {int(bad.index[0]) + 1}: value {bad['value'].iloc[0]!r} is not a number")
    return ref, source


def compare(ours: pd.DataFrame, path: Path, our_presets: list[str] = ()) -> str:
    """Markdown: ours / published / relative difference per cell, and what has no counterpart;
    one section per metric of the reference table (:func:`compare_tables`)."""
    return "\n".join(md_table(tb) for tb in compare_tables(ours, path, our_presets))


def compare_tables(ours: pd.DataFrame, path: Path, our_presets: list[str] = ()) -> list[Table]:
    """One :class:`Table` per metric of the reference table. A published row with no size (e.g.
    text8 bpc, whose paper gives one model size) matches our rows of that model at every size."""
    ref, source = read_reference(path)
    return [_compare_metric(ours, ref[ref["metric"] == m], m, Path(path).name, source, our_presets)
            for m in dict.fromkeys(ref["metric"].astype(str))]


def _compare_metric(ours: pd.DataFrame, ref: pd.DataFrame, metric: str, name: str, source: list[str],
                    our_presets) -> Table:
    ours = ours[(ours["metric"] == metric) & (~ours["model"].isin(SOURCE_LABELS))]
    mine = {(str(r["size"]), str(r["model"]), str(r["dataset"])): r for _, r in ours.iterrows()}
    our_sizes: dict[str, list[str]] = {}
    for size, model, _ in mine:
        if size not in our_sizes.setdefault(model, []):
            our_sizes[model].append(size)
    theirs = {}
    for _, r in ref.iterrows():
        size = "" if "size" not in r or pd.isna(r["size"]) else str(r["size"]).strip()
        for s in ([size] if size else our_sizes.get(str(r["model"]), [""])):
            theirs[(s, str(r["model"]), str(r["dataset"]))] = r
    rows = list(dict.fromkeys([(k[0], k[1]) for k in theirs] + [(k[0], k[1]) for k in mine]))
    size_order = list(dict.fromkeys(r[0] for r in rows))
    rows.sort(key=lambda r: size_order.index(r[0]))  # stable: published rows first within a size
    cols = list(dict.fromkeys([k[2] for k in theirs] + [k[2] for k in mine]))

    def fmt(r) -> str:
        v = _num(r["value"])
        return "—" if v is None else ("≤ " if _true(r.get("bound")) else "") + f"{v:.2f}"

    head = [f"Ours vs published: {name} ({metric}; cell = ours / published (relative difference); "
            "— = no counterpart)", ""]
    body = []
    matched, only_ours, only_theirs, matched_protocols = 0, [], [], set()
    for size, model in rows:
        cells = [size, model]
        for c in cols:
            a, b = mine.get((size, model, c)), theirs.get((size, model, c))
            if a is not None and b is not None:
                va, vb = _num(a["value"]), _num(b["value"])
                rel = f"{(va - vb) / vb:+.1%}" if va is not None and vb else "n/a"
                cells.append(f"{fmt(a)} / {fmt(b)} ({rel})")
                matched += 1
                if "protocol" in b and not pd.isna(b["protocol"]):
                    matched_protocols.add(str(b["protocol"]))
            elif a is not None:
                cells.append(f"{fmt(a)} / —")
                only_ours.append(f"{size} {model} {c}")
            elif b is not None:
                cells.append(f"— / {fmt(b)}")
                only_theirs.append(f"{size} {model} {c}")
            else:
                cells.append("")
        body.append(cells)
    lines = ["", f"{matched} cell(s) matched by (size, model) and dataset."]
    if only_ours:
        lines.append(f"No published counterpart ({len(only_ours)}): " + "; ".join(only_ours))
    if only_theirs:
        lines.append(f"Published, not in this leaderboard ({len(only_theirs)}): " + "; ".join(only_theirs))
    # the protocols of the matched cells (of the whole table when none matched)
    pubs = sorted(matched_protocols or {str(p) for p in ref.get("protocol", pd.Series(dtype=str)).dropna()})
    if pubs:
        mine_p = sorted(set(our_presets)) or ["?"]
        warn = "" if set(mine_p) <= set(pubs) and not (matched_protocols - set(mine_p)) else (
            " — NOT the same protocol: differences include the token-counting convention")
        lines.append(f"Published protocol: {', '.join(pubs)}; ours: {', '.join(mine_p)} (eval.protocol){warn}.")
    if source:
        lines += ["", "Source: " + " ".join(source)]
    return Table(f"compare-{Path(name).stem}-{metric}", ["Size", "Model", *cols], body, head=head, notes=lines)
