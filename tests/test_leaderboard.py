"""Suite end to end (debug executor, in-process): records, skip-on-rerun, leaderboard shape,
corrupt records reported (not aggregated, not crashing), failed runs isolated."""
from __future__ import annotations

import json

import pandas as pd
from conftest import tiny_suite, write_suite

from bench.cli import main


def test_suite_records_leaderboard_and_rerun(tmp_path, capsys):
    f = write_suite(tmp_path / "s.yaml", tiny_suite())
    out = tmp_path / "out"
    assert main(["run", str(f), "--out", str(out)]) == 0
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 2
    for rd in runs:
        rec = json.loads((rd / "result.json").read_text())
        assert rec["status"] == "complete"
        assert rec["train"]["steps"] == 12 and rec["train"]["params"] > 0
        assert rec["env"]["world_size"] == 1 and rec["protocol"]["version"].startswith("tdbench")
        assert (rd / "spec.json").is_file()
    csv = pd.read_csv(out / "leaderboard.csv")
    for col in ["size", "model", "dataset", "metric", "value", "ci_low", "ci_high", "bound", "n_seeds"]:
        assert col in csv.columns
    ar = csv[csv.model == "GPT-2"]
    mdlm = csv[csv.model == "MDLM"]
    assert set(ar.dataset) == {"austen", "kjv"} and (~ar.bound).all() and (ar.ci_low == ar.value).all()
    assert mdlm.bound.all() and (mdlm.ci_low < mdlm.value).all() and (mdlm.value < mdlm.ci_high).all()
    md = (out / "leaderboard.md").read_text()
    assert "| Size | Model | austen | kjv |" in md and "≤ " in md and "**" in md
    assert (out / "training.png").read_bytes()[:4] == b"\x89PNG"

    mtimes = {rd: (rd / "result.json").stat().st_mtime_ns for rd in runs}
    capsys.readouterr()
    assert main(["run", str(f), "--out", str(out)]) == 0
    assert "2 complete, 0 to run" in capsys.readouterr().err
    assert all((rd / "result.json").stat().st_mtime_ns == m for rd, m in mtimes.items())

    # a corrupt record is reported by name, skipped, and the rest still aggregates
    bad = runs[0] / "result.json"
    bad.write_text('{"status": "complete", "spec": ')
    capsys.readouterr()
    assert main(["leaderboard", str(out), "--format", "csv"]) == 2
    cap = capsys.readouterr()
    assert f"error: {bad}: corrupt run record" in cap.err
    assert len(pd.read_csv(out / "leaderboard.csv")) == 2  # the other run's two datasets
    assert f"skipped: {bad}" in (out / "leaderboard.md").read_text()
    assert main(["status", str(out)]) == 0
    assert "corrupt" in capsys.readouterr().out


def test_one_failed_run_does_not_stop_the_suite(tmp_path, capsys):
    suite = tiny_suite(methods=[{"method": "mdlm"}])
    suite["train"]["steps"] = 4
    f = write_suite(tmp_path / "s.yaml", suite)
    out = tmp_path / "out"
    from bench.rundir import run_dir
    from bench.suite import load_suite
    spec = [s for s in load_suite(f)[1] if s.method == "mdlm"][0]
    ck = run_dir(out, spec) / "ckpt" / "step_0000004"  # poison this run only
    ck.mkdir(parents=True)
    (ck / "state.json").write_text("{}")
    from bench.checkpoint import write_manifest
    write_manifest(ck)  # intact as a file set (passes the pre-flight), wrong inside: fails in the run
    assert main(["run", str(f), "--out", str(out)]) == 1
    md = (out / "leaderboard.md").read_text()
    assert "GPT-2" in md and "failed: MDLM" in md and "corrupt checkpoint" in md


def test_methods_and_new_method(tmp_path, capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert "ar  (GPT-2; exact likelihood" in text and "mdlm  (MDLM; bound likelihood" in text
    assert "float64_sampling: bool = True" in text
    assert main(["new-method", "my_method", "--dir", str(tmp_path)]) == 0
    src = (tmp_path / "my_method.py").read_text()
    compile(src, "my_method.py", "exec")
    assert '@register("my_method")' in src
    assert main(["new-method", "mdlm", "--dir", str(tmp_path)]) == 2


def test_two_writers_of_one_plot_at_once_both_succeed(tmp_path, monkeypatch):
    """Two commands writing one results directory's plot at the same time (two `tdbench run`
    on one --out) each write their own temp file and rename it: neither renames the other's
    away (the fixed temp name did: FileNotFoundError in the second rename)."""
    import threading

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.figure

    from bench.plots import save_figure

    real = matplotlib.figure.Figure.savefig
    both_saved = threading.Barrier(2)

    def savefig(self, *a, **k):   # both writers have saved before either renames
        real(self, *a, **k)
        both_saved.wait(timeout=30)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    errors = []

    def write():
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1])
        try:
            save_figure(fig, tmp_path / "training.png")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert (tmp_path / "training.png").stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir()] == ["training.png"], "no temp file left behind"
