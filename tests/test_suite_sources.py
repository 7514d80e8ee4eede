"""Several training datasets in one suite (``data.train: [a, b, ...]``, bench.config_data.SuiteData):
one more axis of the suite. Each run trains on one dataset and, with ``data.eval`` left out, is
evaluated on that dataset alone; a single dataset keeps the run ids it always had; the
leaderboard gives each dataset its column, its sample table and its panels, and learning.png
draws a synthetic source's entropy as the line every model should approach."""
from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import dry_run_error, specs_of, tiny_suite, write_suite

from bench.suite import count_runs, load_suite

MARKOV = {"name": "markov", "vocab": 6, "order": 1, "seed": 3, "train_blocks": "stream"}
DYCK = {"name": "dyck", "types": 2, "max_depth": 4, "seed": 1, "train_blocks": "stream"}


def _two_sources(**over):
    data = {"train": [MARKOV, DYCK], "seq_len": 16}
    return tiny_suite(data=data, **{"seeds": [0, 1], **over})


def test_each_run_trains_on_one_dataset_and_is_evaluated_on_it(tmp_path):
    specs = specs_of(_two_sources(), tmp_path)
    # size × method (MDLM, AR) × dataset × seed, each run scored only on the source it learns
    assert len(specs) == 2 * 2 * 2 == count_runs(load_suite(write_suite(tmp_path / "s.yaml", _two_sources()))[0])
    got = {(s.method, s.data.train.name, s.seed) for s in specs}
    assert got == {(m, d, k) for m in ("mdlm", "ar") for d in ("markov", "dyck") for k in (0, 1)}
    assert all(s.data.eval == [s.data.train] for s in specs)
    assert len({s.run_id for s in specs}) == len(specs)


def test_one_dataset_keeps_its_run_ids_whether_listed_or_not(tmp_path):
    """A list of one, or ``eval`` left out, is the very suite it was: same specs, same run ids
    (the run id hashes the run's own data block, which these spell identically)."""
    bare = {"train": MARKOV, "eval": [MARKOV], "seq_len": 16}
    ids = [s.run_id for s in specs_of(tiny_suite(data=bare), tmp_path)]
    assert ids == [s.run_id for s in specs_of(tiny_suite(data={"train": [MARKOV], "seq_len": 16}), tmp_path)]
    assert ids == [s.run_id for s in specs_of(tiny_suite(data={"train": MARKOV, "seq_len": 16}), tmp_path)]


@pytest.mark.parametrize("data,msg", [
    ({"train": [MARKOV, DYCK], "eval": [MARKOV], "seq_len": 16},
     "data.eval: a synthetic source is scored against itself; with several training datasets leave data.eval out"),
    ({"train": [MARKOV, MARKOV], "seq_len": 16},
     "data.train: each dataset once; markov(order=1,seed=3,train_blocks=stream,vocab=6) is listed twice"),
    ({"train": [MARKOV, {**DYCK, "types": 0}], "seq_len": 16}, "data.train[1].types"),
    ({"train": [MARKOV, DYCK], "seq_len": 15}, "data.seq_len: dyck blocks are complete bracket strings"),
    ({"train": [], "seq_len": 16}, "data.train"),
])
def test_bad_source_lists_are_one_line_errors(tmp_path, capsys, data, msg):
    err = dry_run_error(tmp_path, capsys, tiny_suite(data=data))
    assert msg in err, err


def test_two_sources_end_to_end_tables_and_learning_panels(tmp_path, monkeypatch):
    """`tdbench run` of MDLM + AR on markov and dyck (one seed): one ppl column and one sample
    table per source, and learning.png with one panel per source holding the source's exact
    entropy as a horizontal line at h (read back from the figure before it is saved)."""
    from bench import plots
    from bench.cli import main
    from bench.config import DataConfig, DatasetRef
    from bench.data import load_blocks, synthetic_source

    suite = _two_sources(seeds=[0], train={"steps": 20, "batch_size": 16, "lr": 3e-3, "warmup": 2, "ckpt_every": 20},
                         eval={"t_samples": 2, "packing": "none", "max_blocks": 32, "batch_size": 16,
                               "samples": 8, "sample_steps": [4], "curve_every": 10, "curve_blocks": 16})
    figs = {}
    real_save = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, fp=None: (figs.__setitem__(path.name, fig),
                                                                          real_save(fig, path, fp))[1])
    out = tmp_path / "out"
    assert main(["run", str(write_suite(tmp_path / "s.yaml", suite)), "--out", str(out)]) == 0
    keys = {d["name"]: DatasetRef(**d).key for d in (MARKOV, DYCK)}
    md = (out / "leaderboard.md").read_text()
    header = next(x for x in md.splitlines() if x.startswith("| Size | Model |") and "Steps" not in x)
    assert all(k in header for k in keys.values())
    lines = md.splitlines()
    for k in keys.values():
        assert f"Samples of the runs on {k}" in md
        heads = [i for i, x in enumerate(lines) if x.startswith("| Size | Model | Steps | ppl (" + k)]
        assert len(heads) == 1
        rows = [x for x in lines[heads[0] + 2:] if x.startswith("|")]
        rows = rows[:next((i for i, x in enumerate(rows) if x.startswith("| Size |")), len(rows))]
        # each source's table: both models' samples and that source's own fresh true blocks
        assert any("| MDLM |" in x for x in rows) and any("| GPT-2 |" in x for x in rows)
        assert any("| Source text |" in x for x in rows)
    axes = [ax for ax in figs["learning.png"].axes if ax.get_visible()]
    assert len(axes) == 2
    for name, key in keys.items():
        ax = next(a for a in axes if key in a.get_title())
        ref = DatasetRef(**{"markov": MARKOV, "dyck": DYCK}[name])
        # the line: the source's exact NLL per token of the probe's own 16 blocks (not h, from
        # which 16 blocks differ by their sampling error), recomputed here from the source
        blocks = load_blocks(ref, "test", DataConfig(train=ref, eval=[ref], seq_len=16), "none").head(16)
        want = -synthetic_source(ref).log_prob(np.asarray(blocks.tokens)).sum() / np.asarray(blocks.counted).sum()
        truth = [ln for ln in ax.lines if ln.get_label().startswith("truth")]
        assert len(truth) == 1 and list(truth[0].get_ydata()) == [pytest.approx(want, abs=1e-6)] * 2
        h = synthetic_source(ref).entropy(16)["value"]
        assert f"h = {h:.4f}" in truth[0].get_label() and abs(want - h) > 1e-4   # the two differ
        assert ax.get_ylabel().startswith("nats per token")
        assert {t.get_text().split(" (")[0] for t in ax.get_legend().get_texts()} >= {"MDLM", "GPT-2"}
        assert math.isfinite(want) and ax.get_ylim()[0] < want < ax.get_ylim()[1]
    train_titles = [ax.get_title() for ax in figs["training.png"].axes if ax.get_visible()]
    assert len(train_titles) == 2 and all(any(k in t for t in train_titles) for k in keys.values())
    front = [ax.get_title() for ax in figs["frontier.png"].axes if ax.axison]
    assert all(any(k in t for t in front) for k in keys.values())
    # well-formedness is drawn for dyck only (every markov string has p > 0)
    assert any(keys["dyck"] in t and ": valid vs NFE" in t for t in front)
    assert not any(keys["markov"] in t and ": valid vs NFE" in t for t in front)
    assert all(t.startswith("size tiny: ") for t in front)
