"""The suite's ``experiment:`` key: validated like every other key, run after the suite's
runs, its JSON holds the measured numbers and its PNG is written; ``tdbench experiment DIR``
reruns it without training."""
from __future__ import annotations

import json

from conftest import tiny_suite, write_suite

from bench.cli import main


def test_bad_experiment_key_exits_2_naming_it(tmp_path, capsys):
    s = tiny_suite(experiment={"kind": "selfcond-magnitude", "t": [0.5, 1.5]})
    rc = main(["run", str(write_suite(tmp_path / "bad.yaml", s)), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "experiment" in err and "(0, 1)" in err, err
    assert not (tmp_path / "out").exists()
    s = tiny_suite(experiment={"kind": "nope"})
    assert main(["run", str(write_suite(tmp_path / "bad2.yaml", s)), "--out", str(tmp_path / "o2")]) == 2


def test_magnitude_experiment_runs_on_the_trained_runs_and_reruns_without_training(tmp_path):
    s = tiny_suite(methods=[{"method": "diffusion-lm", "self_condition": True, "label": "SC"},
                            {"method": "mdlm"}],          # mdlm has no self-conditioning: skipped
                   baseline=None, train={"steps": 4, "batch_size": 8, "lr": 3e-3, "warmup": 1, "ckpt_every": 4},
                   experiment={"kind": "selfcond-magnitude", "t": [0.3, 0.8], "iterations": 3, "sequences": 4})
    out = tmp_path / "out"
    assert main(["run", str(write_suite(tmp_path / "s.yaml", s)), "--out", str(out)]) == 0
    res = json.loads((out / "selfcond-magnitude.json").read_text())
    assert [r["t"] for r in res["rows"]] == [0.3, 0.8] and {r["label"] for r in res["rows"]} == {"SC"}
    assert all(len(r["x0_norm"]) == 3 and r["embedding_norm"] > 0 for r in res["rows"])
    png = out / "selfcond-magnitude.png"
    assert png.stat().st_size > 10_000
    png.unlink()
    mtime = (out / "runs").stat().st_mtime
    assert main(["experiment", str(out)]) == 0 and png.is_file()
    assert (out / "runs").stat().st_mtime == mtime
    assert json.loads((out / "selfcond-magnitude.json").read_text())["rows"] == res["rows"]  # deterministic


def test_steps_experiment_plots_sample_metrics_against_steps(tmp_path):
    s = tiny_suite(methods=[{"method": "diffusion-lm"}, {"method": "ssd-lm"}],
                   train={"steps": 4, "batch_size": 8, "lr": 3e-3, "warmup": 1, "ckpt_every": 4},
                   eval={"t_samples": 2, "max_blocks": 8, "batch_size": 8, "samples": 4, "sample_steps": [2, 5]},
                   metrics={"mauve": None, "source_text": False},
                   experiment={"kind": "steps"})
    out = tmp_path / "out"
    assert main(["run", str(write_suite(tmp_path / "s.yaml", s)), "--out", str(out)]) == 0
    res = json.loads((out / "steps.json").read_text())
    curves = {(c["model"], c["metric"]): c for c in res["curves"]}
    for model in ("Diffusion-LM", "SSD-LM"):
        assert curves[(model, "gen_ppl")]["steps"] == [2, 5]
        assert len(curves[(model, "entropy")]["value"]) == 2
    assert {r["model"] for r in res["ppl"]} >= {"Diffusion-LM", "GPT-2"}   # SSD-LM has no bound
    assert (out / "steps.png").stat().st_size > 10_000


def test_steps_plot_is_a_curve_over_budgets_and_points_per_model_at_one_budget(tmp_path, monkeypatch):
    """Several step budgets: one line per model on a log step axis. One budget (the x0-vs-eps
    suite): one point per model on a categorical axis named by the models and the budget."""
    import bench.experiments as ex
    from bench.config import StepsCurve

    figs = []
    monkeypatch.setattr(ex, "save_figure", lambda fig, path: figs.append(fig) or path)
    exp = StepsCurve(kind="steps", metrics=["gen_ppl"])

    def res(budgets):
        return {"curves": [{"model": m, "metric": "gen_ppl", "size": "tiny", "steps": budgets,
                            "value": [float(v + i) for i in range(len(budgets))]} for v, m in [(10, "a"), (20, "b")]],
                "source_text": {"gen_ppl": 5.0}, "ppl": []}

    ex.plot_steps(res([10, 50]), exp, tmp_path / "many.png")
    ax = figs[-1].axes[0]
    assert ax.get_xscale() == "log" and [len(line.get_xdata()) for line in ax.lines[:2]] == [2, 2]
    ex.plot_steps(res([50]), exp, tmp_path / "one.png")
    ax = figs[-1].axes[0]
    assert ax.get_xscale() == "linear" and "50 steps" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    assert [(float(line.get_xdata()[0]), float(line.get_ydata()[0])) for line in ax.lines[:2]] == [(0, 10), (1, 20)]
