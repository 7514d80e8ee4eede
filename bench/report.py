"""The report: one static HTML page per output directory, ``<out>/report.html``.

Everything a researcher reads of a suite on one page, with no server and no network (every
asset inline; a Content-Security-Policy allows nothing else): the leaderboards — the very
:class:`bench.tables.Table` s that ``leaderboard.md`` is rendered from (bench.leaderboard.board),
so the cells and notes are the markdown's, each table sortable by clicking a column header —,
the directory's plots (``training.png``, ``learning.png``, ``frontier.png``, any other ``*.png``)
as base64 images, the metric settings (``metrics.json``) and the likelihood protocol each run
recorded, the runs (label, seed, status, wall time, …), and a sample browser: per run and step
budget, the samples' text with what each sample line recorded (NFE, wall time, any per-sample
score) and the budget's scores (``scores.json``), filtered by method, step budget and a text
search. The view (sort, filters) lives in the URL fragment, so a link reopens it
(``report.html#sort=lb-ppl:2:desc&method=MDLM&steps=8&q=the``).

All text — labels, sample texts, errors — is untrusted: every string goes through :func:`esc`
(HTML-escaped, control characters shown as their Unicode pictures), data only ever becomes
element text or a quoted attribute, and the page's one script is allowed by its hash.

Written by ``tdbench report DIR`` and at the end of ``tdbench run``, atomically (temp +
rename); the page shell (CSS, the sorting/filtering script) is ``bench/report.html``.
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from datetime import datetime, timezone
from pathlib import Path

from bench import leaderboard
from bench.errors import UserError
from bench.index import scan
from bench.records import atomic_write_text, read_record
from bench.tables import Table

FILE = "report.html"
PAGE = Path(__file__).with_name("report.html")
DEFAULT_SAMPLES = 20          # samples shown per run and step budget
PLOTS_FIRST = ("training.png", "learning.png", "frontier.png")
PNG = b"\x89PNG\r\n\x1a\n"
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_MARK = re.compile(r"{{(\w+)}}")
_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)
# sample-line fields that say where a sample comes from, not what it scored
_BOOKKEEPING = ("ids", "text", "steps", "index", "seed", "float64_sampling")


def esc(s) -> str:
    """``s`` as HTML text (or a quoted attribute value) that shows it literally: ``& < > " '``
    escaped, control characters but tab and newline shown as their pictures (U+2400 …)."""
    s = _CONTROLS.sub(lambda m: "\u2421" if m.group() == "\x7f" else chr(0x2400 + ord(m.group())), str(s))
    return html.escape(s, quote=True)


def sort_key(cell: str) -> str | None:
    """The number a cell sorts by: the first one in its text (``≤ 363.23 ±44.55`` → 363.23,
    ``50,656`` → 50656; ``—`` → None, sorted last); read from the text, so a cell shows and
    sorts the same."""
    m = _NUMBER.search(cell.replace(",", ""))
    return m.group() if m else None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


def _td(text: str, numeric: bool, best: bool = False, cls: str = "") -> str:
    """A cell: its text escaped; ``data-v`` = its number (:func:`sort_key`) in a numeric column."""
    classes = " ".join(c for c in (cls, "n" if numeric else "", "best" if best else "") if c)
    v = sort_key(text) if numeric else None
    attrs = (f' class="{esc(classes)}"' if classes else "") + (f' data-v="{v}"' if v is not None else "")
    return f"<td{attrs}>{esc(text)}</td>"


def _title(tb: Table) -> str:
    if tb.name == "samples":
        return "<h3>Sample quality, per step budget</h3>"
    return "" if tb.head else f"<h3>Likelihood: {esc(tb.name)}</h3>"   # a comparison's first line names it


def table_html(tb: Table) -> str:
    """A leaderboard :class:`Table` as a sortable HTML table with its lines above and below;
    every column after Size and Model sorts by number (:func:`sort_key`)."""
    head = _title(tb) + "".join(f"<p>{esc(x)}</p>" for x in tb.head if x.strip())
    notes = "".join(f'<p class="note">{esc(x)}</p>' for x in tb.notes if x.strip())
    if not tb.rows:
        return f'<section class="board">{head}<p class="empty">{esc(tb.empty)}</p>{notes}</section>'
    ths = "".join(f'<th scope="col" aria-sort="none">{esc(c)}</th>' for c in tb.columns)
    trs = "".join("<tr>" + "".join(_td(c, j >= 2, (i, j) in tb.bold) for j, c in enumerate(row)) + "</tr>"
                  for i, row in enumerate(tb.rows))
    return (f'<section class="board">{head}<table class="sortable" id="lb-{_slug(tb.name)}">'
            f"<thead><tr>{ths}</tr></thead><tbody>{trs}</tbody></table>{notes}</section>")


def plots_html(out: Path) -> str:
    """Every ``*.png`` of the directory (training, learning, frontier first), inline."""
    files = [p for p in Path(out).glob("*.png") if not p.name.startswith(".") and p.is_file()]
    files.sort(key=lambda p: (PLOTS_FIRST.index(p.name) if p.name in PLOTS_FIRST else len(PLOTS_FIRST), p.name))
    figs = []
    for p in files:
        data = p.read_bytes()
        if not data.startswith(PNG):
            continue
        figs.append(f'<figure><img alt="{esc(p.name)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
                    f"<figcaption>{esc(p.name)}</figcaption></figure>")
    return "".join(figs) or '<p class="empty">no plots in this directory</p>'


def _flat(d: dict, prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v if isinstance(v, str) else json.dumps(v)))
    return out


def kv_table(columns: list[str], cols: list[dict], tid: str) -> str:
    """Settings side by side: a row per (dotted) key, a column per settings dict."""
    flats = [dict(_flat(c)) for c in cols]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    ths = "".join(f'<th scope="col" aria-sort="none">{esc(c)}</th>' for c in ["setting", *columns])
    trs = "".join("<tr>" + _td(k, False, cls="k") + "".join(_td(f.get(k, "—"), False) for f in flats) + "</tr>"
                  for k in keys)
    return f'<table class="sortable" id="{tid}"><thead><tr>{ths}</tr></thead><tbody>{trs}</tbody></table>'


def settings_html(out: Path, runs: dict[str, dict]) -> str:
    """The metric settings (``metrics.json``, as bench.metrics.MetricsConfig reads them) and
    each likelihood protocol the runs recorded (one column per protocol id, the runs under it)."""
    from bench.metrics.score import metrics_config_of

    parts = ['<div class="pair"><section class="box"><h3>Sample metrics (metrics.json)</h3>']
    if (Path(out) / "metrics.json").is_file():
        parts.append(kv_table(["value"], [metrics_config_of(out).model_dump(mode="json")], "settings-metrics"))
    else:
        parts.append('<p class="empty">no metrics.json: no samples were scored in this directory</p>')
    by_id: dict[str, list[dict]] = {}
    for r in runs.values():
        pid = (r.get("protocol") or {}).get("id")
        if pid:
            by_id.setdefault(pid, []).append(r)
    protos, names = [], []
    for pid, rs in by_id.items():
        try:
            proto = read_record(Path(out) / "runs" / rs[0]["run_id"] / "result.json").get("protocol") or {}
        except UserError:
            continue
        used = sorted({f"{r.get('label')} {r.get('size')} seed={r.get('seed')}" for r in rs})
        protos.append({**proto, "runs": "; ".join(used)})
        names.append(f"protocol {pid}")
    parts.append("</section><section class=\"box\"><h3>Likelihood protocol (each run's record)</h3>")
    parts.append(kv_table(names, protos, "settings-protocol") if protos else
                 '<p class="empty">no run has recorded a protocol yet</p>')
    return "".join(parts) + "</section></div>"


def _wall(r: dict) -> str:
    try:
        s = (datetime.fromisoformat(r["finished"]) - datetime.fromisoformat(r["started"])).total_seconds()
    except (KeyError, TypeError, ValueError):
        return "—"
    return f"{s:.0f}"   # the timestamps are whole seconds


def _num(x, fmt: str) -> str:
    return "—" if not isinstance(x, (int, float)) or isinstance(x, bool) else format(x, fmt)


RUN_COLUMNS = ["Model", "Method", "Size", "Seed", "Status", "Steps", "Params", "Wall (s)", "Train (s)",
               "tokens/s", "Final loss", "Finished", "Run id", "Error"]


def runs_html(runs: dict[str, dict], problems: list[str]) -> str:
    """One row per run record: label, method, size, seed, status, wall time (started →
    finished), training time and speed, final loss, error."""
    trs = []
    for r in sorted(runs.values(), key=lambda r: (str(r.get("size")), str(r.get("label")), str(r.get("seed")))):
        tr = r.get("train") or {}
        err = str(r.get("error") or "")
        cells = [r.get("label"), r.get("method"), r.get("size"), r.get("seed"), r.get("status"),
                 _num(tr.get("steps"), ",d"), _num(tr.get("params"), ",d"), _wall(r), _num(tr.get("wall_s"), ".1f"),
                 _num(tr.get("tokens_per_s"), ",.0f"), _num(tr.get("final_loss"), ".4f"), r.get("finished") or "—",
                 r.get("run_id")]
        tds = [_td(str(c if c is not None else "—"), j in (3, 5, 6, 7, 8, 9, 10),
                   cls=f"status-{c}" if j == 4 else "") for j, c in enumerate(cells)]
        tds.append(_td(err[:500] + ("…" if len(err) > 500 else ""), False, cls="err"))
        trs.append("<tr>" + "".join(tds) + "</tr>")
    ths = "".join(f'<th scope="col" aria-sort="none">{esc(c)}</th>' for c in RUN_COLUMNS)
    table = (f'<table class="sortable" id="runs-table"><thead><tr>{ths}</tr></thead><tbody>{"".join(trs)}</tbody>'
             "</table>" if trs else '<p class="empty">no run records yet</p>')
    notes = "".join(f'<p class="note">{esc("skipped: " + p)}</p>' for p in problems)
    return f'<section class="box">{table}{notes}</section>'


def _budget_groups(out: Path, recs: list[dict], per: int) -> tuple[list[dict], list[str]]:
    """Per complete run with samples and per step budget: the first ``per`` samples, how many
    there are and the budget's scores; a sample file that does not parse is a problem line."""
    from bench.metrics.score import budget_groups, read_scores
    from bench.samples import FILE as SAMPLES
    from bench.samples import read_samples

    groups, problems = [], []
    for r in sorted(recs, key=lambda r: (str(r["size"]), str(r["label"]), str(r["seed"]))):
        rd = Path(out) / "runs" / r["run_id"]
        if not (rd / SAMPLES).is_file():
            continue
        try:
            samples = read_samples(rd / SAMPLES)
        except UserError as e:
            problems.append(str(e))
            continue
        budgets = (read_scores(rd) or {}).get("budgets")
        scores = {b.get("steps"): b for b in budgets if isinstance(b, dict)} if isinstance(budgets, list) else {}
        by_steps = budget_groups(samples)
        for steps in sorted(by_steps, key=lambda x: -1 if x is None else x):
            g = by_steps[steps]
            groups.append({"run": r, "steps": steps, "n": len(g), "shown": g[:per], "scores": scores.get(steps)})
    return groups, problems


def _steps_value(steps) -> str:
    return "none" if steps is None else str(steps)


def _group_head(g: dict) -> str:
    """A budget's header row: run, step budget, its scores (scores.json) and how many shown."""
    from bench.metrics.scoreview import SAMPLE_METRICS, fmt_metric

    r, sc = g["run"], g["scores"] or {}
    steps = "no step budget" if g["steps"] is None else f"{g['steps']} steps"
    m = sc.get("metrics") or {}
    nums = [f"{k} {fmt_metric(m.get(k))}" for k in SAMPLE_METRICS if k in m]
    if isinstance(sc.get("nfe"), (int, float)):
        nums.append(f"NFE {sc['nfe']:g}")
    notes = sorted({f"† {k}: {v['note']}" for k, v in m.items() if isinstance(v, dict) and v.get("note")})
    where = f"runs/{r['run_id']}/samples.jsonl"
    return (f'<tr class="group"><th colspan="3"><b>{esc(r["label"])}</b> · size {esc(r["size"])} · seed '
            f'{esc(r["seed"])} · {esc(steps)}' + (f" — {esc(' · '.join(nums))}" if nums else " — not scored")
            + f'<br><span class="note">{len(g["shown"])} of {g["n"]} samples shown ({esc(where)})'
            + "".join(f"<br>{esc(n)}" for n in notes) + "</span></th></tr>")


def _sample_row(s: dict, label: str, steps) -> str:
    rec = [f"{k} {v:g}" for k, v in s.items()
           if k not in _BOOKKEEPING and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return (f'<tr class="sample" data-method="{esc(label)}" data-steps="{esc(_steps_value(steps))}">'
            + _td(str(s.get("index", "")), True) + _td(s["text"], False, cls="text")
            + _td(" · ".join(rec), False, cls="rec") + "</tr>")


def samples_html(out: Path, recs: list[dict], per: int) -> str:
    """The sample browser: filters (method, step budget, text), then per run and budget a
    header with the budget's scores and the first ``per`` samples."""
    groups, problems = _budget_groups(out, recs, per)
    notes = "".join(f'<p class="note">{esc("skipped: " + p)}</p>' for p in problems)
    if not groups:
        return f'<section class="box"><p class="empty">no samples in this directory</p>{notes}</section>'
    labels = list(dict.fromkeys(str(g["run"]["label"]) for g in groups))
    steps = list(dict.fromkeys(g["steps"] for g in groups))
    opt = lambda v, t: f'<option value="{esc(v)}">{esc(t)}</option>'  # noqa: E731
    controls = ('<div class="filters"><label>method <select id="f-method">' + opt("", "all")
                + "".join(opt(x, x) for x in labels) + '</select></label><label>steps <select id="f-steps">'
                + opt("", "all") + "".join(opt(_steps_value(x), "—" if x is None else x) for x in steps)
                + '</select></label><label>text <input type="search" id="f-text" placeholder="search the samples">'
                  '</label><span id="f-count" class="note"></span></div>')
    bodies = "".join("<tbody>" + _group_head(g) + "".join(_sample_row(s, str(g["run"]["label"]), g["steps"])
                                                          for s in g["shown"]) + "</tbody>" for g in groups)
    table = ('<table id="samples-table"><thead><tr><th scope="col">#</th><th scope="col">text</th>'
             f'<th scope="col">recorded per sample</th></tr></thead>{bodies}</table>')
    return f'<section class="box">{controls}{table}{notes}</section>'


def build(out: Path, compare: Path | None = None, samples: int = DEFAULT_SAMPLES) -> str:
    """The whole page of ``out`` as a string (nothing written)."""
    out = Path(out)
    b = leaderboard.board(out, compare)
    runs, _ = scan(out)
    counts: dict[str, int] = {}
    for r in runs.values():
        counts[str(r.get("status"))] = counts.get(str(r.get("status")), 0) + 1
    summary = (f"{len(runs)} run record(s): " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
               if runs else "no run records yet")
    sections = [("leaderboards", "Leaderboards", "".join(table_html(tb) for tb in b.tables)),
                ("plots", "Plots", plots_html(out)),
                ("settings", "Settings", settings_html(out, runs)),
                ("runs", "Runs", runs_html(runs, b.problems)),
                ("samples", "Samples", samples_html(out, b.recs, samples))]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#{sid}">{title}</a>' for sid, title, _ in sections)
    body = (f"<header><h1>tdbench report: {esc(out.resolve().name)}</h1>"
            f"<p>{esc(summary)} · generated {esc(when)} from {esc(out.resolve())}</p><nav>{nav}</nav></header><main>"
            + "".join(f'<h2 id="{sid}">{title}</h2>{part}' for sid, title, part in sections) + "</main>")
    page = PAGE.read_text(encoding="utf-8")
    script = _SCRIPT.search(page).group(1)
    fills = {"title": esc(f"tdbench report: {out.resolve().name}"), "body": body,
             "script_hash": "sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}
    return _MARK.sub(lambda m: fills[m.group(1)], page)   # one pass: filled-in text is never rescanned


def write(out: Path, compare: Path | None = None, samples: int = DEFAULT_SAMPLES) -> Path:
    """Build the page, then write ``out/report.html`` atomically (temp file + rename)."""
    text = build(out, compare, samples)
    atomic_write_text(Path(out) / FILE, text)
    return Path(out) / FILE
