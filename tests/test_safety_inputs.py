"""Inputs that must never escape ``--out``, crash, or run away (issue 24, points 1, 6 and 7).

Names that become paths are checked (sizes, suite name) and every run directory must lie inside
``<out>/runs``; malformed YAML / JSON (alias bombs, wrong types, deep nesting, huge integers)
gives one line and exit code 2; labels are shown literally in every output format; the schema
bounds the knobs that size a run, and a suite of more than MAX_RUNS runs needs ``--yes``.
"""
from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
from conftest import tiny_suite, write_suite

from bench.cli import main
from bench.errors import UserError

FAST = tiny_suite(baseline=None)
FAST["train"].update(steps=2, ckpt_every=2)
FAST["data"]["eval"] = [{"name": "austen"}]


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


def _one_line_exit_2(rc, capsys) -> str:
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 2, cap.err[-2000:]
    assert len(lines) == 1, cap.err[-2000:]
    assert "Traceback" not in cap.err + cap.out
    return lines[0]


# ----------------------------------------------------------------------------- 1: names and paths
def test_size_name_cannot_escape_out(tmp_path, capsys):
    suite = copy.deepcopy(FAST)
    suite["sizes"] = {"x/../../../../escaped": suite["sizes"]["tiny"]}
    f = write_suite(tmp_path / "s.yaml", suite)
    before = _tree(tmp_path)
    rc = main(["run", str(f), "--out", str(tmp_path / "a" / "b" / "out")])
    line = _one_line_exit_2(rc, capsys)
    assert line.startswith(f"error: {f}: sizes.x/../../../../escaped: ") and "[A-Za-z0-9_]" in line, line
    assert _tree(tmp_path) == before, "something was written"


def test_suite_name_dotdot_cannot_make_cwd_the_output(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = write_suite(tmp_path / "s.yaml", {**FAST, "name": ".."})
    before = _tree(tmp_path)
    line = _one_line_exit_2(main(["run", str(f)]), capsys)
    assert line.startswith(f"error: {f}: name: "), line
    assert _tree(tmp_path) == before, "something was written"


BAD_NAMES = ["..", ".", ".hidden", "-rf", "a/b", "a\\b", "a\x00b", "a\nb", "a\tb", "a b", "x" * 101, ""]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n)[:12] for n in BAD_NAMES])
def test_bad_size_and_suite_names(tmp_path, capsys, name):
    cases = (("sizes.", {**FAST, "sizes": {name: FAST["sizes"]["tiny"]}}), ("name: ", {**FAST, "name": name}))
    for where, suite in cases:
        f = write_suite(tmp_path / "s.yaml", suite)
        line = _one_line_exit_2(main(["run", str(f), "--out", str(tmp_path / "o")]), capsys)
        assert line.startswith(f"error: {f}: {where}"), line
        assert not (tmp_path / "o").exists()


def test_run_dir_stays_inside_out_runs(tmp_path):
    """Defence in depth: a spec whose run id is not one plain name never gets a directory."""
    from bench.rundir import run_dir
    from bench.suite import load_suite

    (spec,) = load_suite(write_suite(tmp_path / "s.yaml", FAST))[1]
    assert run_dir(tmp_path, spec) == tmp_path / "runs" / spec.run_id
    for size in ("x/../../../escaped", "../x", "/abs"):
        bad = spec.model_copy(update={"size": size})
        with pytest.raises(UserError, match="outside"):
            run_dir(tmp_path, bad)


# ----------------------------------------------------------------------------- 6: malformed input
def test_yaml_alias_bomb_gives_a_bounded_message(tmp_path, capsys):
    """Under 1 KB of YAML whose aliases expand to 10^6 values, where a message quotes the value."""
    def level(i):
        if i == 0:
            return "&a0 [" + ", ".join(["tiny"] * 10) + "]"
        return f"&a{i} [{level(i - 1)}, " + ", ".join([f"*a{i - 1}"] * 9) + "]"

    text = write_suite(tmp_path / "s.yaml", FAST).read_text()
    f = tmp_path / "bomb.yaml"
    f.write_text(text.replace("methods:\n- method: mdlm", f"methods:\n- method: mdlm\n  sizes: {{x: {level(5)}}}"))
    assert len(f.read_bytes()) < 1500
    line = _one_line_exit_2(main(["run", str(f), "--out", str(tmp_path / "o")]), capsys)
    assert len(line) < 1000, f"{len(line)} characters"
    assert line.startswith(f"error: {f}: ")
    assert not (tmp_path / "o").exists()


WRONG_TYPES = [
    ({"method": "mdlm", "sizes": [["tiny"]]}, "methods[0].sizes"),
    ({"method": "mdlm", "sizes": [{"a": 1}]}, "methods[0].sizes"),
    ({"method": "sedd", "variant": ["absorb"]}, "methods[0].variant"),
    ({"method": "sedd", "variant": {"absorb": 1}}, "methods[0].variant"),
    ({"method": ["mdlm"]}, "methods[0].method"),
    ({"method": "mdlm", "label": ["x"]}, "methods[0].label"),
    ({"method": "mdlm", "label": "a\nb"}, "methods[0].label"),
    ({"method": "mdlm", "label": "x" * 101}, "methods[0].label"),
]


@pytest.mark.parametrize("row,key", WRONG_TYPES, ids=[str(r)[:40] for r, _ in WRONG_TYPES])
def test_wrong_types_in_a_method_row(tmp_path, capsys, row, key):
    f = write_suite(tmp_path / "s.yaml", {**FAST, "methods": [row]})
    line = _one_line_exit_2(main(["run", str(f), "--out", str(tmp_path / "o")]), capsys)
    assert line.startswith(f"error: {f}: {key}: "), line
    assert not (tmp_path / "o").exists()


def deep_json(p: Path):
    p.write_text("[" * 100_000 + "]" * 100_000)


def huge_int(p: Path):
    p.write_text('{"status": "complete", "spec": {}, "x": ' + "9" * 5000 + "}")


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """An output dir with two complete runs (seeds 0 and 1)."""
    d = tmp_path_factory.mktemp("done")
    write_suite(d / "s.yaml", {**FAST, "seeds": [0, 1]})
    assert main(["run", str(d / "s.yaml"), "--out", str(d / "out")]) == 0
    return d


@pytest.mark.parametrize("damage", [deep_json, huge_int])
def test_one_malformed_record_is_skipped_by_leaderboard_and_status(done, tmp_path, capsys, damage):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(done, d)
    bad, good = sorted((d / "out" / "runs").iterdir())
    damage(bad / "result.json")
    capsys.readouterr()
    rc = main(["leaderboard", str(d / "out")])
    cap = capsys.readouterr()
    assert rc == 2 and "Traceback" not in cap.err, cap.err[-2000:]
    (line,) = cap.err.strip().splitlines()
    kind = "RecursionError" if damage is deep_json else "ValueError"
    assert line.startswith(f"error: {bad / 'result.json'}: corrupt run record ({kind}: "), line
    assert f"- skipped: {bad / 'result.json'}: corrupt run record" in cap.out
    assert "| tiny | MDLM |" in cap.out  # the other run is still on the board
    rc = main(["status", str(d / "out")])
    cap = capsys.readouterr()
    assert rc == 0 and "Traceback" not in cap.err, cap.err[-2000:]
    assert f"failed    {bad.name}" in cap.out and "corrupt record" in cap.out
    assert f"completed {good.name}" in cap.out


@pytest.mark.parametrize("damage", [deep_json, huge_int])
def test_score_of_a_malformed_samples_file_or_record(done, tmp_path, capsys, damage):
    f = tmp_path / "samples.jsonl"
    damage(f)
    line = _one_line_exit_2(main(["score", str(f)]), capsys)
    assert line.startswith(f"error: {f}:1: not JSON ("), line
    import shutil

    d = tmp_path / "d"
    shutil.copytree(done, d)
    rd = sorted((d / "out" / "runs").iterdir())[0]
    (rd / "samples.jsonl").write_text('{"text": "hello"}\n')
    damage(rd / "result.json")
    line = _one_line_exit_2(main(["score", str(rd)]), capsys)
    assert line.startswith(f"error: {rd / 'result.json'}: corrupt run record ("), line


def _render(table) -> str:
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=250, color_system=None).print(table)
    return buf.getvalue()


def test_labels_with_brackets_in_the_live_view(tmp_path):
    from bench import live

    rs = [live.Row("r1", "MDLM [/]", "tiny", 0, "running", detail="[red]x"),
          live.Row("r2", "SEDD [x0]", "tiny", 0, "completed")]
    text = _render(live.table(rs, title="out [/]"))
    assert "MDLM [/] tiny seed=0" in text and "SEDD [x0] tiny seed=0" in text and "[red]x" in text
    stream = io.StringIO()
    with live.Monitor(tmp_path, [], live=True, stream=stream) as mon:
        mon.event("[1/2] MDLM [/] tiny seed=0: complete")
        mon.event("[2/2] SEDD [x0] tiny seed=0: complete")
    assert "MDLM [/] tiny seed=0: complete" in stream.getvalue()
    assert "SEDD [x0] tiny seed=0: complete" in stream.getvalue()


def _recs(label: str) -> list[dict]:
    m = {"dataset": "austen", "metric": "ppl", "value": 12.5, "ci_low": 12.0, "ci_high": 13.0, "bound": True,
         "protocol_id": "p1"}
    neg = {**m, "metric": "gap", "value": -0.25, "ci_low": -0.3, "ci_high": -0.2, "bound": False}
    return [{"run_id": "r1", "status": "complete", "spec": {}, "size": "tiny", "label": label, "seed": 0,
             "metrics": [m, neg], "train": {"params": 10}},
            {"run_id": "r2", "status": "complete", "spec": {}, "size": "tiny", "label": "AR", "seed": 0,
             "metrics": [{**m, "value": 20.0}], "train": {"params": 10}}]


def _board(tmp_path: Path, label: str, fmt: str) -> str:
    """The leaderboard of two records (one labelled ``label``) as written by ``write``."""
    from bench import leaderboard
    from bench.records import write_record

    out = tmp_path / f"out{abs(hash((label, fmt)))}"
    for r in _recs(label):
        write_record(out / "runs" / r["run_id"] / "result.json", r)
    text, problems = leaderboard.write(out, fmt)
    assert problems == []
    return text


def test_markdown_escapes_pipes_and_line_breaks_in_labels(tmp_path):
    md = _board(tmp_path, "A|B\nC", "md")
    lines = md.splitlines()
    table = lines[:lines.index("")]
    assert len(table) == 4, md  # header, rule, two rows: the label did not break its row
    assert all(ln.replace("\\|", "").count("|") == 4 for ln in table), md
    assert "| A\\|B C |" in md


def test_latex_escapes_angles_bars_and_blank_lines(tmp_path):
    from bench import tables

    assert tables.tex_escape("a<b>c|d") == r"a\textless{}b\textgreater{}c\textbar{}d"
    tex = _board(tmp_path, "x<y>|z\n\nw", "latex")
    body = tex.split(r"\begin{tabular}")[1].split(r"\end{tabular}")[0]
    assert "\n\n" not in body and "<" not in body and ">" not in body, body
    assert r"x\textless{}y\textgreater{}\textbar{}z w" in body, body


def test_csv_label_cells_cannot_be_formulas(tmp_path):
    import csv

    rows = list(csv.DictReader(io.StringIO(_board(tmp_path, '=HYPERLINK("http://x")', "csv"))))
    assert {r["model"] for r in rows} == {"'=HYPERLINK(\"http://x\")", "AR"}
    gap = next(r for r in rows if r["metric"] == "gap")
    assert gap["value"] == "-0.25" and gap["ci_low"] == "-0.3"  # numbers are never touched
    for lab in ("+1", "-x", "@SUM(A1)", "\tx"):
        rows = csv.DictReader(io.StringIO(_board(tmp_path, lab, "csv")))
        assert {r["model"] for r in rows} == {"'" + lab, "AR"}, lab


# ----------------------------------------------------------------------------- 7: limits
def _set(suite: dict, path: str, value) -> dict:
    suite = copy.deepcopy(suite)
    keys = path.split(".")
    cur = suite
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
    cur[keys[-1]] = value
    return suite


LIMITS = [
    ("data.seq_len", 10**9, "data.seq_len: Input should be less than or equal to 131072"),
    ("train.batch_size", 10**9, "train.batch_size: Input should be less than or equal to 65536"),
    ("train.stages", {"train": {"batch_size": 10**9}},
     "train.stages.train.batch_size: Input should be less than or equal to 65536"),
    ("eval.batch_size", 10**9, "eval.batch_size: Input should be less than or equal to 65536"),
    ("eval.t_samples", 10**9, "eval.t_samples: Input should be less than or equal to 4096"),
    ("eval.samples", 10**9, "eval.samples: Input should be less than or equal to 1000000"),
    ("seeds", [-1], "seeds[0]: Input should be greater than or equal to 0"),
    ("seeds", [0, 2**31], "seeds[1]: Input should be less than 2147483648"),
    ("eval.seed", -1, "eval.seed: Input should be greater than or equal to 0"),
    ("sizes.tiny.layers", 1025, "sizes.tiny.layers: Input should be less than or equal to 1024"),
    ("sizes.tiny.hidden", 2**17, "sizes.tiny.hidden: Input should be less than or equal to 65536"),
    ("sizes.tiny", {"layers": 1, "hidden": 2**12, "heads": 2**11},
     "sizes.tiny.heads: Input should be less than or equal to 1024"),
]


@pytest.mark.parametrize("path,value,expect", LIMITS, ids=[f"{p}={str(v)[:12]}" for p, v, _ in LIMITS])
def test_limits_are_in_the_schema(tmp_path, capsys, path, value, expect):
    f = write_suite(tmp_path / "s.yaml", _set(FAST, path, value))
    line = _one_line_exit_2(main(["run", str(f), "--dry-run"]), capsys)
    assert line.startswith(f"error: {f}: ") and expect in line, line


def test_seeds_option_has_the_same_bounds(tmp_path, capsys):
    f = write_suite(tmp_path / "s.yaml", FAST)
    line = _one_line_exit_2(main(["run", str(f), "--dry-run", "--seeds", "0", "-1"]), capsys)
    assert line.startswith("error: --seeds: ") and "greater than or equal to 0" in line, line


def test_a_huge_suite_needs_yes_and_is_refused_before_expansion(tmp_path, capsys, monkeypatch):
    import bench.cli.run as cli_run
    import bench.suite as suite_mod

    calls = []
    monkeypatch.setattr(cli_run, "run_suite", lambda *a, **k: calls.append(len(a[1])) or {})
    real_expand = suite_mod.expand
    monkeypatch.setattr(suite_mod, "expand", lambda s: pytest.fail("expanded before the count was checked"))
    big = {**FAST, "seeds": list(range(10_000)),
           "methods": [{"method": "mdlm"}, {"method": "ar"}, {"method": "sedd", "variant": "absorb"}]}
    f = write_suite(tmp_path / "big.yaml", big)
    line = _one_line_exit_2(main(["run", str(f), "--out", str(tmp_path / "o")]), capsys)
    assert line == f"error: {f}: expands to 30,000 runs (more than 1,000): pass --yes to run them all", line
    assert calls == [] and not (tmp_path / "o").exists()
    line = _one_line_exit_2(main(["submit", str(f), "--cluster", "x", "--out", str(tmp_path / "o")]), capsys)
    assert "expands to 30,000 runs" in line and "--yes" in line
    # just over the cap: --yes (or --dry-run) lets it through
    monkeypatch.setattr(suite_mod, "expand", real_expand)
    over = write_suite(tmp_path / "over.yaml", {**FAST, "seeds": list(range(1001))})
    assert "1,001 runs" in _one_line_exit_2(main(["run", str(over), "--out", str(tmp_path / "o")]), capsys)
    assert main(["run", str(over), "--out", str(tmp_path / "o"), "--yes"]) == 0
    assert calls == [1001]
    assert main(["run", str(over), "--dry-run"]) == 0
