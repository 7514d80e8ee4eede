"""`tdbench report DIR`: one static HTML page per output directory (bench/report.py).

A tiny suite with samples is run once (it writes report.html itself at the end); the page is
then rendered in headless Chromium (``--dump-dom``: the DOM after the page's script ran) with
the view in the URL fragment, and the DOM is read back with the standard library's parser.
What is checked: every table of leaderboard.md is on the page with the same cells and the same
bold ones; a fragment's sort orders a table's rows by the column's numbers (cells without one
last) in the direction asked; the sample browser's filters hide exactly the rows that do not
match; untrusted text (a label, a sample with a ``<script>``) is shown as text, never run; the
page needs nothing outside itself. The browser checks skip with a reason when Chromium is not
installed (.ci/run installs it).
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import tiny_suite, write_suite

from bench.cli import main

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y "
                                    "chromium): the rendered-page checks need a headless browser")
LABEL = 'M<i>D</i>LM & "co"'   # a label is free text: it must show literally, not as markup
EVIL = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">\x07 & done"


class Page(HTMLParser):
    """What the tests read of a page: each table by id (header and body rows, each row with its
    attributes, whether it is hidden itself or by its tbody, and its cells' attributes and
    text), the text of each <p>, of #f-count, the <title>, the number of <script> elements,
    every src / href and the set of element names."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, dict] = {}
        self.paragraphs: list[str] = []
        self.links: list[tuple[str, str, str]] = []
        self.tags: set[str] = set()
        self.scripts, self.title, self.count = 0, "", ""
        self._table = self._row = self._cell = self._p = None
        self._body_hidden: bool | None = None
        self._in = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        self.links += [(tag, k, v) for k, v in attrs if k in ("src", "href")]
        if tag == "script":
            self.scripts += 1
        elif tag == "title" or a.get("id") == "f-count":
            self._in = tag if tag == "title" else "count"
        elif tag == "p":
            self._p = ""
        elif tag == "table":
            self._table = self.tables.setdefault(a.get("id") or f"?{len(self.tables)}", {"head": [], "rows": []})
            self._body_hidden = None
        elif tag == "thead":
            self._body_hidden = None
        elif tag == "tbody":
            self._body_hidden = "hidden" in a
        elif tag == "tr" and self._table is not None:
            self._row = {"attrs": a, "cells": [], "head": self._body_hidden is None,
                         "hidden": "hidden" in a or bool(self._body_hidden)}
        elif tag in ("td", "th") and self._row is not None:
            self._cell = {"attrs": a, "text": ""}

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row["cells"].append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table["head" if self._row["head"] else "rows"].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "p" and self._p is not None:
            self.paragraphs.append(self._p)
            self._p = None
        elif tag in ("title", "span"):
            self._in = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data
        if self._p is not None:
            self._p += data
        if self._in == "title":
            self.title += data
        elif self._in == "count":
            self.count += data

    def texts(self, tid: str, hidden: bool | None = None) -> list[list[str]]:
        return [[c["text"] for c in r["cells"]] for r in self.tables[tid]["rows"]
                if hidden is None or r["hidden"] == hidden]

    def samples(self) -> list[dict]:
        return [r for r in self.tables["samples-table"]["rows"] if "sample" in r["attrs"].get("class", "")]


def md_tables(md: str) -> list[tuple[list[list[str]], set]]:
    """The tables of a leaderboard.md: (rows of cell texts — header first, the rule dropped, a
    size left blank under the same size filled in —, the (row, column) cells in bold)."""
    out, cur = [], None
    for line in md.splitlines():
        if not line.startswith("|"):
            cur = None
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if all(set(c) <= {"-"} for c in cells):
            continue
        if cur is None:
            cur = ([], set())
            out.append(cur)
        elif cells[0] == "" and len(cur[0]) > 1:
            cells[0] = cur[0][-1][0]
        for j, c in enumerate(cells):
            if c.startswith("**") and c.endswith("**"):
                cur[1].add((len(cur[0]), j))
                cells[j] = c[2:-2]
        cur[0].append(cells)
    return out


def render(page: Path, profile: Path, fragment: str = "") -> Page:
    """The DOM of ``page#fragment`` after its script ran, as headless Chromium dumps it."""
    url = page.resolve().as_uri() + (f"#{fragment}" if fragment else "")
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                           "--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and "<table" in proc.stdout, proc.stderr[-2000:]
    return Page(proc.stdout)


def shown_number(cell: dict) -> float | None:
    """The number a cell shows first (``≤ 363.23 ±44.55`` → 363.23; ``—`` → None): what a
    reader takes the cell's value to be, read from its text."""
    m = re.search(r"-?\d+(?:\.\d+)?", cell["text"].replace(",", ""))
    return None if m is None else float(m.group())


def sorted_by(rows: list[dict], col: int, direction: int) -> bool:
    """Rows with a number in ``col`` first, in ``direction`` (1 ascending, -1 descending) of the
    number shown, then the rows without one."""
    ks = [shown_number(r["cells"][col]) for r in rows]
    nums = [k for k in ks if k is not None]
    return ks[:len(nums)] == nums and all(direction * (b - a) >= 0 for a, b in zip(nums, nums[1:]))


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """A complete tiny suite (AR + MDLM, samples at 4 and 8 steps), then an untrusted sample
    appended to MDLM's file and the report rebuilt by `tdbench report`."""
    tmp = tmp_path_factory.mktemp("report")
    suite = tiny_suite(methods=[{"method": "mdlm", "label": LABEL}], metrics={"mauve": None},
                       eval={"t_samples": 2, "max_blocks": 4, "batch_size": 8, "samples": 10, "sample_steps": [4, 8]})
    o = tmp / "out"
    assert main(["run", str(write_suite(tmp / "s.yaml", suite)), "--out", str(o)]) == 0
    assert (o / "report.html").is_file()       # `tdbench run` writes it beside leaderboard.md
    mdlm = next(p for p in (o / "runs").iterdir() if p.name.startswith("mdlm"))
    with open(mdlm / "samples.jsonl", "a") as f:
        f.write(json.dumps({"text": EVIL, "steps": 8, "index": 10, "nfe": 8.0}) + "\n")
    assert main(["report", str(o)]) == 0
    return o


def sample_texts(o: Path) -> list[dict]:
    return [json.loads(x) for p in sorted((o / "runs").glob("*/samples.jsonl")) for x in p.read_text().splitlines()]


def reordering(rows: list[dict], direction: int) -> int:
    """A numeric column (after Size and Model) whose rows a sort in ``direction`` must reorder,
    so that a sort that does nothing cannot pass."""
    col = next((c for c in range(2, len(rows[0]["cells"])) if not sorted_by(rows, c, direction)), None)
    assert col is not None, "every column is already in this order: the check would prove nothing"
    return col


@needs_chromium
def test_page_shows_every_leaderboard_table_and_sorts_from_the_fragment(out, tmp_path):
    static = Page((out / "report.html").read_text())
    desc, asc = reordering(static.tables["lb-samples"]["rows"], -1), reordering(static.tables["lb-samples"]["rows"], 1)
    runs = reordering(static.tables["runs-table"]["rows"], 1)
    page = render(out / "report.html", tmp_path / "profile", f"sort=lb-samples:{desc}:desc&sort=runs-table:{runs}:asc")
    mds = md_tables((out / "leaderboard.md").read_text())
    lbs = [t for t in page.tables if t.startswith("lb-")]
    assert len(lbs) == len(mds) == 2
    for tid, (md_rows, md_bold) in zip(lbs, mds):
        tb = page.tables[tid]
        assert [c["text"] for c in tb["head"][0]["cells"]] == md_rows[0]
        assert sorted(map(tuple, page.texts(tid))) == sorted(map(tuple, md_rows[1:]))   # same cells, as rows
        bold = {(tuple(c["text"] for c in r["cells"]), j) for r in tb["rows"]
                for j, c in enumerate(r["cells"]) if "best" in c["attrs"].get("class", "")}
        assert bold and bold == {(tuple(md_rows[i]), j) for i, j in md_bold}
    md_notes = [x for x in (out / "leaderboard.md").read_text().splitlines() if x and not x.startswith("|")]
    assert all(n in page.paragraphs for n in md_notes) and any("self-scored" in n for n in md_notes)
    assert LABEL in {r[1] for r in page.texts("lb-samples")}                          # shown literally
    assert sorted_by(page.tables["lb-samples"]["rows"], desc, -1)
    assert sorted_by(page.tables["runs-table"]["rows"], runs, 1)
    head = page.tables["lb-samples"]["head"][0]["cells"]
    assert [c["attrs"]["aria-sort"] for c in head] == ["descending" if j == desc else "none" for j in range(len(head))]
    page = render(out / "report.html", tmp_path / "profile", f"sort=lb-samples:{asc}:asc")
    assert sorted_by(page.tables["lb-samples"]["rows"], asc, 1)


@needs_chromium
def test_sample_browser_filters_hide_exactly_the_rows_that_do_not_match(out, tmp_path):
    from urllib.parse import urlencode

    lines = sample_texts(out)
    page = render(out / "report.html", tmp_path / "profile", urlencode({"method": LABEL, "steps": "8"}))
    rows = page.samples()
    shown = [r for r in rows if not r["hidden"]]
    want = sum(1 for s in lines if s.get("steps") == 8)      # MDLM's, the appended one included (≤ 20 shown)
    assert len(shown) == want and len(rows) == len(lines) and len(shown) < len(rows)
    assert all(r["attrs"]["data-method"] == LABEL and r["attrs"]["data-steps"] == "8" for r in shown)
    assert not any(r["attrs"]["data-method"] == LABEL and r["attrs"]["data-steps"] == "8"
                   for r in rows if r["hidden"])
    assert page.count == f"{want} of {len(rows)} samples shown"
    for group in _groups(page):       # a budget with no sample shown is hidden, header and all
        assert group[0]["hidden"] == all(r["hidden"] for r in group[1:])
    assert {g[0]["hidden"] for g in _groups(page)} == {True, False}

    words = {w for s in lines for w in re.findall(r"[a-z]{3,}", s["text"].lower())}
    word = next(w for w in sorted(words) if 0 < sum(w in s["text"].lower() for s in lines) < len(lines))
    page = render(out / "report.html", tmp_path / "profile", urlencode({"q": word.upper()}))
    rows = page.samples()
    assert {r["hidden"] for r in rows} == {True, False}
    assert all((word in r["cells"][1]["text"].lower()) != r["hidden"] for r in rows)


@needs_chromium
def test_untrusted_text_is_shown_as_text_and_never_run(out, tmp_path):
    page = render(out / "report.html", tmp_path / "profile")
    assert page.scripts == 1 and page.title == "tdbench report: out"      # only the page's own script
    assert [t for t in page.links if t[0] == "img" and not t[2].startswith("data:image/png;base64,")] == []
    evil = [r for r in page.samples() if "document.title" in r["cells"][1]["text"]]
    assert [r["cells"][1]["text"] for r in evil] == [EVIL.replace("\x07", "\u2407")]
    assert LABEL in {r["attrs"]["data-method"] for r in page.samples()}


def test_page_is_self_contained_and_embeds_the_plots(out):
    text = (out / "report.html").read_text()
    page = Page(text)
    assert not page.tags & {"link", "iframe", "object", "embed", "form", "base", "audio", "video", "source"}
    assert page.links and all(v.startswith("#") for t, k, v in page.links if k == "href")
    imgs = [v for t, k, v in page.links if k == "src"]
    files = sorted(p.name for p in out.glob("*.png"))
    assert {"training.png", "frontier.png"} <= set(files)
    assert sorted(imgs) == sorted("data:image/png;base64," + base64.b64encode((out / f).read_bytes()).decode()
                                  for f in files)
    style = re.search(r"<style>(.*?)</style>", text, re.S).group(1)
    assert not re.search(r"(?i)url\(|@import", style)
    script = re.search(r"<script>(.*?)</script>", text, re.S).group(1)
    csp = re.search(r'Content-Security-Policy" content="([^"]*)"', text).group(1)
    assert "default-src 'none'" in csp
    assert f"'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'" in csp


def test_every_number_sorts_by_the_value_it_shows(out):
    """The sort key of each cell (data-v) is the number a reader sees first in it — ``≤ 363.23
    ±44.55`` by 363.23, ``50,656`` by 50656 — and every cell showing a number has one."""
    page = Page((out / "report.html").read_text())
    checked = 0
    for tid in ("lb-samples", "lb-ppl", "runs-table"):
        for r in page.tables[tid]["rows"]:
            for c in r["cells"][2:]:
                if "n" not in c["attrs"].get("class", "").split():
                    continue   # text columns of the runs table (status, dates, run id)
                v = c["attrs"].get("data-v")
                assert (None if v is None else float(v)) == shown_number(c), (tid, c)
                checked += v is not None
    assert checked > 20


def test_sample_cap_and_a_damaged_sample_file(out, tmp_path, capsys):
    o = tmp_path / "copy"
    shutil.copytree(out, o, ignore=shutil.ignore_patterns("ckpt"))
    assert main(["report", str(o), "--samples", "3"]) == 0
    page = Page((o / "report.html").read_text())
    per_group = [len(g) - 1 for g in _groups(page)]
    assert per_group and all(n == 3 for n in per_group)
    assert all(re.search(r"3 of (\d+) samples shown", h) for h in _heads(page))
    ar = next(p for p in (o / "runs").iterdir() if p.name.startswith("ar"))
    (ar / "samples.jsonl").write_text('{"text": "fine"}\nnot json\n')
    assert main(["report", str(o)]) == 0
    page = Page((o / "report.html").read_text())
    assert f"skipped: {ar / 'samples.jsonl'}:2: not JSON (Expecting value)" in page.paragraphs
    assert {r["attrs"]["data-method"] for r in page.samples()} == {LABEL}    # the other run's samples stay


def _groups(page: Page) -> list[list[dict]]:
    """The sample browser's budgets: each its header row, then its sample rows."""
    groups = []
    for r in page.tables["samples-table"]["rows"]:
        if "group" in r["attrs"].get("class", ""):
            groups.append([r])
        else:
            groups[-1].append(r)
    return groups


def _heads(page: Page) -> list[str]:
    return [r["cells"][0]["text"] for r in page.tables["samples-table"]["rows"]
            if "group" in r["attrs"].get("class", "")]


@pytest.mark.parametrize("args,msg", [
    (["--samples", "0"], "--samples: must be a positive integer"),
    (["--compare", "reference/nope"], "--compare: reference/nope: no such published table"),
])
def test_bad_input_is_one_line_and_writes_nothing(out, tmp_path, capsys, args, msg):
    o = tmp_path / "copy"
    shutil.copytree(out, o, ignore=shutil.ignore_patterns("ckpt"))
    before = (o / "report.html").read_bytes()
    capsys.readouterr()
    assert main(["report", str(o), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1 and (o / "report.html").read_bytes() == before
    (o / "metrics.json").write_text("{not json")
    assert main(["report", str(o)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{o / 'metrics.json'}: corrupt metric settings" in err and (o / "report.html").read_bytes() == before
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a tdbench output directory" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists() and not list(o.glob(".report.html.*"))
