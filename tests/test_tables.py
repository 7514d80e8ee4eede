"""Full-size suites validate and dry-run (nothing written, the 6·N·D arithmetic), the paper
table in LaTeX, and ours beside a published table (matched cells, relative differences,
cells without a counterpart) on a small suite's real output."""
from __future__ import annotations

import re

import pandas as pd
import pytest

from bench.cli import main
from bench.suite import load_suite
from tests import hub_fixtures as H
from tests.conftest import REPO, write_suite

FULL = ["sedd-table", "mdlm-table", "mdlm-lm1b", "text8", "every-method-full-size", "tencdm-table"]


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.mark.parametrize("name", FULL)
def test_full_suites_dry_run_write_nothing(name, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("TDBENCH_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # default out dir would be ./runs/<name>
    before = _tree(tmp_path)
    suite, specs = load_suite(REPO / "suites" / f"{name}.yaml")
    assert main(["run", str(REPO / "suites" / f"{name}.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert _tree(tmp_path) == before  # no runs/, no cache, no tokenizer: nothing written
    for s in specs:
        assert s.run_id in out
    assert "assumed MFU 40% of 312 TFLOP/s" in out and "GPU-hours" in out


def test_dry_run_gpu_hours_follow_6ND(tmp_path, capsys):
    from bench.plan import n_params

    suite, specs = load_suite(REPO / "suites" / "sedd-table.yaml")
    assert main(["run", str(REPO / "suites" / "sedd-table.yaml"), "--dry-run", "--mfu", "0.5",
                 "--peak-tflops", "1000"]) == 0
    out = capsys.readouterr().out
    s = next(x for x in specs if x.method == "sedd" and x.size == "medium")
    N = n_params(s)
    assert 400e6 < N < 450e6  # 24 blocks × 1024 wide + two 50257-row embeddings
    D = s.train.steps * s.train.batch_size * s.data.seq_len
    want = 6 * N * D / (0.5 * 1000e12 * 3600)
    line = next(x for x in out.splitlines() if x.startswith(s.run_id))
    assert f"{want:,.1f}" in line
    # rows restricted with sizes: are where they belong
    assert [x.size for x in specs if x.method == "hf-causal-lm"] == ["small", "medium"]
    assert not any(x.method == "d3pm" and x.size == "medium" for x in specs)
    assert [x.size for x in specs if x.method == "plaid"] == ["small"]  # the table's PLAID row


def test_dry_run_bad_flags_are_one_line(capsys):
    assert main(["run", str(REPO / "suites" / "text8.yaml"), "--dry-run", "--mfu", "1.5"]) == 2
    assert capsys.readouterr().err.strip() == "error: --mfu: 1.5: a fraction in (0, 1]"


def _tidy():
    return pd.DataFrame([
        dict(size="small", model="GPT-2", dataset="ptb_x", metric="ppl", value=50.0, ci_low=50.0, ci_high=50.0,
             bound=False, protocol="p"),
        dict(size="small", model="SEDD Absorb", dataset="ptb_x", metric="ppl", value=40.0, ci_low=39.0,
             ci_high=41.0, bound=True, protocol="p"),
        dict(size="medium", model="GPT-2", dataset="ptb_x", metric="ppl", value=30.0, ci_low=30.0, ci_high=30.0,
             bound=False, protocol="p"),
    ])


def test_latex_is_the_paper_table():
    from bench.tables import latex

    tex = latex(_tidy())
    assert "\\toprule" in tex and "\\bottomrule" in tex and "\\begin{tabular}{llr}" in tex
    assert "Size & Model & ptb\\_x \\\\" in tex  # escaped
    rows = [x for x in tex.splitlines() if x.count("&") == 2 and "Model" not in x]
    assert rows[0] == "Small & GPT-2 & 50.00 \\\\"
    assert rows[1] == " & SEDD Absorb & $\\leq$ 40.00$_{\\pm 1.00}$ \\\\"
    assert rows[2] == "Medium & GPT-2 & \\textbf{30.00} \\\\"  # best of the column
    assert tex.count("\\midrule") == 2  # after the header and between sizes


def test_compare_cells_and_counterparts(tmp_path):
    from bench.tables import compare

    ref = tmp_path / "pub.csv"
    ref.write_text("# Some paper, Table 9\nsize,model,dataset,metric,value,bound,protocol\n"
                   "small,GPT-2,ptb_x,ppl,40,false,sedd\nsmall,MDLM,ptb_x,ppl,33.3,true,sedd\n")
    md = compare(_tidy(), ref, our_presets=["sedd"])
    assert "| small | GPT-2 | 50.00 / 40.00 (+25.0%) |" in md
    assert "|  | SEDD Absorb | ≤ 40.00 / — |" in md and "|  | MDLM | — / ≤ 33.30 |" in md
    assert "1 cell(s) matched" in md and "No published counterpart (2)" in md
    assert "Published, not in this leaderboard (1): small MDLM ptb_x" in md
    assert "Source: Some paper, Table 9" in md and "NOT the same protocol" not in md
    assert "NOT the same protocol" in compare(_tidy(), ref, our_presets=["mdlm"])


def test_compare_size_free_rows_and_every_metric(tmp_path):
    """A published row without a size (text8's one model size) is matched to our row of that
    model at every size; with no metric given, each metric of the reference gets its section."""
    from bench.tables import compare

    ref = tmp_path / "pub.csv"
    ref.write_text("# Paper X\nsize,model,dataset,metric,value,bound\n"
                   ",GPT-2,ptb_x,ppl,40,false\n,GPT-2,ptb_x,bpc,1.5,false\n,MD4,text8,bpc,1.37,true\n")
    t = pd.concat([_tidy(), _tidy().assign(metric="bpc", value=lambda d: d["value"] / 20)], ignore_index=True)
    md = compare(t, ref)
    ppl, bpc = md.split("Ours vs published: pub.csv (bpc")
    assert "| small | GPT-2 | 50.00 / 40.00 (+25.0%) |" in ppl and "| medium | GPT-2 | 30.00 / 40.00 (-25.0%) |" in ppl
    assert "| small | GPT-2 | 2.50 / 1.50 (+66.7%) |" in bpc
    assert "Published, not in this leaderboard (1):  MD4 text8" in bpc  # no size of ours to match it


def test_compare_on_a_small_suite(tmp_path, capsys):
    """A pretrained tiny GPT-2 labelled as the table's GPT-2 row, evaluated zero-shot on
    hub-shaped local copies of WikiText2 and PTB, against results/reference/sedd.csv."""
    from tests.test_hf_causal_lm import tiny_gpt2

    tiny_gpt2(tmp_path / "gpt2-tiny")
    paths = {n: str(H.make(n, tmp_path / "hub")) for n in ("wikitext2", "ptb")}
    suite = {"name": "cmp", "data": {"train": {"name": "wikitext2", "path": paths["wikitext2"]},
                                     "eval": [{"name": n, "path": p} for n, p in paths.items()],
                                     "tokenizer": "gpt2", "seq_len": 64},
             "sizes": {"small": {"layers": 1, "hidden": 32, "heads": 2}},
             "methods": [{"method": "hf-causal-lm", "model": str(tmp_path / "gpt2-tiny"), "label": "GPT-2"},
                         {"method": "hf-causal-lm", "model": str(tmp_path / "gpt2-tiny"), "label": "Tiny"}],
             "baseline": None, "eval": {"protocol": "sedd"}, "launch": {"executor": "debug", "threads": 1}}
    out = tmp_path / "out"
    assert main(["run", str(write_suite(tmp_path / "s.yaml", suite)), "--out", str(out)]) == 0
    from bench import leaderboard, tables
    recs = leaderboard.collect(out)[0]
    md = tables.compare(leaderboard.tidy(recs), tables.resolve_reference("reference/sedd"),
                        our_presets=[r["protocol"].get("preset", "custom") for r in recs])
    row = next(x for x in md.splitlines() if x.startswith("| small | GPT-2 |"))
    cells = [c.strip() for c in row.split("|")[3:-1]]
    assert cells[0] == "— / 45.04"                         # lambada: published only
    assert re.fullmatch(r"[\d.]+ / 42\.43 \([+-][\d.]+%\)", cells[1])  # wikitext2: ours / published (rel.)
    assert re.fullmatch(r"[\d.]+ / 138\.43 \([+-][\d.]+%\)", cells[2])  # ptb
    assert "2 cell(s) matched" in md and "No published counterpart (2): small Tiny wikitext2; small Tiny ptb" in md
    assert "Published protocol: sedd; ours: sedd" in md
    # the CLI renders the same comparison into leaderboard.md; a bad name exits 2 writing nothing
    assert main(["leaderboard", str(out), "--compare", "reference/sedd"]) == 0
    assert md in (out / "leaderboard.md").read_text()
    before = (out / "leaderboard.md").read_text()
    assert main(["leaderboard", str(out), "--compare", "reference/sed"]) == 2
    assert "did you mean 'sedd'" in capsys.readouterr().err
    assert (out / "leaderboard.md").read_text() == before
    # bad names and malformed tables: one-line UserErrors
    from bench.errors import UserError
    with pytest.raises(UserError, match="did you mean 'sedd'"):
        tables.resolve_reference("reference/sed")
    bad = tmp_path / "bad.csv"
    bad.write_text("size,model,dataset,metric,value\nsmall,GPT-2,ptb,ppl,abc\n")
    with pytest.raises(UserError, match="row 1: value 'abc' is not a number"):
        tables.read_reference(bad)


def test_reference_tables_are_well_formed():
    from bench.tables import read_reference

    for p in [REPO / "results" / "reference" / f"{n}.csv" for n in ("sedd", "mdlm-owt", "mdlm-lm1b", "duo", "text8")]:
        ref, source = read_reference(p)
        assert source and len(ref) and not ref.duplicated(["size", "model", "dataset", "metric"]).any(), p


def test_method_sizes_restrict_rows(tmp_path, capsys):
    from tests.conftest import specs_of, tiny_suite

    sizes = {"a": {"layers": 1, "hidden": 32, "heads": 2}, "b": {"layers": 1, "hidden": 64, "heads": 2}}
    s = tiny_suite(sizes=sizes, methods=[{"method": "mdlm", "label": "X", "sizes": ["a"]},
                                         {"method": "mdlm", "label": "X", "sizes": ["b"], "estimator": "time"}])
    got = sorted((x.size, x.label, x.params["estimator"]) for x in specs_of(s, tmp_path) if x.method == "mdlm")
    assert [g[:2] for g in got] == [("a", "X"), ("b", "X")] and got[0][2] != "time" and got[1][2] == "time"
    s["methods"][1]["sizes"] = ["c"]
    assert main(["run", str(write_suite(tmp_path / "bad.yaml", s)), "--dry-run"]) == 2
    assert "methods[1].sizes: must be a list of the suite's sizes (a, b), got ['c']" in capsys.readouterr().err


def test_seeds_flag_overrides_the_suites_seeds(capsys):
    """`tdbench run SUITE --seeds 0 1 2` expands the suite with those seeds (here through the
    dry run: every (method, size) row three times, one run id per seed)."""
    suite, specs = load_suite(REPO / "suites" / "sedd-table-mini.yaml")
    rows = len(specs) // len(suite.seeds)
    assert main(["run", str(REPO / "suites" / "sedd-table-mini.yaml"), "--seeds", "7", "8", "9", "10",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"sedd-table-mini: {4 * rows} runs" in out
    for s in (7, 8, 9, 10):
        assert f"-s{s}-" in out
    for s in suite.seeds:
        assert f"-s{s}-" not in out        # the suite's own seeds are replaced, not added to
