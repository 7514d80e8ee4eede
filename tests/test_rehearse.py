"""``tdbench rehearse``: every run of a suite at its real shapes through the real training loop,
checkpoint, resume, evaluation and sampling, one child process at a time; a failing or killed
run is a failed row and the others go on; runs of one shape are rehearsed once; the GPU
projection's state term is the bytes of the real training state."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from conftest import REPO, tiny_suite, write_suite

from bench.cli import main

KILLER = """
import os, signal
import torch
from bench.method import Method
from bench.registry import register


@register("test-unused")
class Unused(Method):
    '''A causal model trained on AR's loss, with one parameter (1,000 entries) no loss reaches.'''
    likelihood = "none"
    time = "none"
    causal = True

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.unused = torch.nn.Parameter(torch.zeros(1000))

    def loss(self, x0, counted, u):
        return (self.net(x0, targets=x0) * counted).sum() / counted.sum()


@register("test-killed")
class Killed(Method):
    '''Trains like any method until its first loss, where the kernel kills it (as out of memory would).'''
    likelihood = "none"

    def loss(self, x0, counted, u):
        os.kill(os.getpid(), signal.SIGKILL)


@register("test-sleeper")
class Sleeper(Killed):
    '''Trains until its first loss, where it waits (for a signal).'''

    def loss(self, x0, counted, u):
        signal.pause()
"""


def write_plugin(root: Path) -> Path:
    """The ``test-unused``, ``test-killed`` and ``test-sleeper`` methods as a plugin (a module and a
    dist-info declaring it in the ``tdbench.methods`` entry-point group) in ``root``."""
    root.mkdir()
    (root / "rehearse_killer.py").write_text(KILLER)
    dist = root / "rehearse_killer-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rehearse-killer\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[tdbench.methods]\nrehearse_killer = rehearse_killer\n")
    return root


def install_killer(tmp_path, monkeypatch) -> None:
    """The plugin, seen by this process and by the rehearsal's children (through PYTHONPATH)."""
    from bench import registry

    root = write_plugin(tmp_path / "plugin")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", str(root))
    monkeypatch.setattr(registry, "_discovered", False)


def rows_of(out: Path) -> dict[str, dict]:
    with open(out / "rehearsal.csv") as f:
        return {r["label"]: r for r in csv.DictReader(f)}


@pytest.mark.slow
def test_rehearsal_runs_every_shape_through_resume_and_isolates_failures(tmp_path, monkeypatch, capsys):
    """A suite of 6 rows × 2 seeds, trained on a hub dataset, offline: one rehearsal per shape
    (6), each sharing its row with the other seed's run. MDLM and AR train 3 steps, are killed
    after their checkpoint at step 2 and resumed from it (the record says so), evaluate the first
    block of the one (substituted) evaluation set with the suite's K draws and draw one sample of
    2 steps; a GPT-2 the hub cache lacks is a random-init stand-in; a run whose model directory is
    missing fails with its error and one killed by SIGKILL is reported killed — and the runs after
    them still pass."""
    from bench import hf, registry, rehearse
    from bench.records import read_record
    from bench.suite import load_suite

    install_killer(tmp_path, monkeypatch)
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setattr(hf, "hub_revision", lambda *a, **k: None)   # as on a machine whose hub cache lacks it
    monkeypatch.setitem(rehearse.GPT2_SHAPES, "gpt2", (32, 1, 2))   # a small stand-in here
    K = 4
    suite = tiny_suite(
        data={"train": {"name": "wikitext2"}, "eval": [{"name": "ptb"}, {"name": "austen"}], "tokenizer": "gpt2",
              "seq_len": 32},
        methods=[{"method": "hf-causal-lm", "model": "gpt2", "label": "OpenAI GPT-2"},
                 {"method": "hf-causal-lm", "model": "./no-such-dir", "label": "broken"},
                 {"method": "test-killed", "label": "killed"}, {"method": "mdlm"},
                 {"method": "test-unused", "label": "unused"}],
        eval={"t_samples": K, "max_blocks": 8, "batch_size": 8}, seeds=[0, 1])
    f = write_suite(tmp_path / "s.yaml", suite)
    try:
        _, specs = load_suite(f)
        out = tmp_path / "out"
        code = main(["rehearse", str(f), "--out", str(out), "--threads", "1"])
    finally:
        registry._METHODS.pop("test-killed", None)
        registry._METHODS.pop("test-sleeper", None)
        registry._METHODS.pop("test-unused", None)
        sys.modules.pop("rehearse_killer", None)
    rows = rows_of(out)
    assert set(rows) == {s.label for s in specs} and len(specs) == 12
    assert code == 1   # some rows failed
    for label, r in rows.items():   # one rehearsal per shape, naming the other seed's run
        ids = {s.run_id for s in specs if s.label == label}
        assert {r["run_id"], *r["shared_with"].split()} == ids, label
    assert "killed by SIGKILL" in rows["killed"]["error"] and rows["killed"]["status"] == "failed"
    assert "no-such-dir" in rows["broken"]["error"] and rows["broken"]["status"] == "failed"
    assert rows["OpenAI GPT-2"]["status"] == "ok" and "random-init stand-in" in rows["OpenAI GPT-2"]["notes"]
    by_label = {s.label: s for s in specs}
    for label in ("MDLM", "GPT-2"):   # (GPT-2: the AR baseline's label)
        r = rows[label]
        assert r["status"] == "ok", r["error"]
        assert r["resumed_from"] == "step 2" and "wikitext2, ptb → austen" in r["notes"]
        rd = out / "runs" / r["run_id"]
        rec = read_record(rd / "result.json")
        orig, ran = by_label[label], rec["spec"]
        assert rec["train"]["steps"] == 3 and rec["train"]["resumed_from_step"] == 2
        assert (ran["backbone"], ran["params"], ran["data"]["seq_len"]) == \
            (orig.backbone.model_dump(), orig.params, orig.data.seq_len)   # the real shapes
        assert [d["name"] for d in ran["data"]["eval"]] == ["austen"] and ran["train"]["batch_size"] == 1
        ppl = [m for m in rec["metrics"] if m["metric"] == "ppl"]
        assert len(ppl) == 1 and ppl[0]["n_seqs"] == 1
        assert ppl[0]["t_samples"] == (1 if label == "GPT-2" else K)
        samples = [json.loads(x) for x in (rd / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 1 and samples[0]["steps"] == (None if label == "GPT-2" else 2)
        assert not (rd / "ckpt").exists()   # deleted after the run
        assert 0 < float(r["train_step_work_bytes"]) < float(r["train_step_peak_bytes"]) <= float(r["peak_rss_bytes"])
        assert 0 < float(r["train_forward_saved_bytes"]) <= float(r["train_step_work_bytes"])
        assert float(r["train_s_per_step"]) > 0 and float(r["sample_s_per_call"]) > 0
    assert float(rows["GPT-2"]["gpu_train_x_ar"]) == 1.0
    steps = json.loads((out / "runs" / rows["unused"]["run_id"] / "probe-finish.json").read_text())["steps"]
    assert rows["unused"]["status"] == "ok" and steps   # a step updates every parameter but the unreached one
    assert all(c["updated"] == c["trained"] - 1000 == c["params"] - 1000 for c in steps)
    text = (out / "rehearsal.md").read_text()
    assert capsys.readouterr().out == text and all(r["run_id"] in text for r in rows.values())


def test_rehearsal_specs_keep_every_shape_and_change_only_what_a_rehearsal_must(monkeypatch):
    """suites/sedd-table.yaml with two seeds: one rehearsal per shape (each standing for the other
    seed's run); each keeps its method, params, backbone, L and tokenizer, trains at batch 1 for
    `steps` steps with a checkpoint at steps − 1 (every stage), evaluates one block with the
    suite's K and draws one sample; hub data become the embedded corpus; a GPT-2 the hub cache
    lacks becomes a stand-in of the shape of the suite's size it sits in (the suite's sizes are
    GPT-2's)."""
    from bench import hf
    from bench.rehearse import RehearsalSettings, by_shape, rehearsal_spec, shape_key
    from bench.suite import load_suite

    monkeypatch.setattr(hf, "hub_revision", lambda *a, **k: None)
    _, specs = load_suite(REPO / "suites" / "sedd-table.yaml", seeds=[0, 1])
    groups = by_shape(specs)
    assert sorted(s.run_id for rep, rest in groups for s in [rep, *rest]) == sorted(s.run_id for s in specs)
    assert len(groups) == len(specs) // 2
    for rep, rest in groups:
        assert len(rest) == 1 and rest[0].seed != rep.seed and shape_key(rest[0]) == shape_key(rep)
    st = RehearsalSettings(steps=4, sample_steps=3)
    for rep, _ in groups:
        r, notes, todo = rehearsal_spec(rep, st, Path("/standins"))
        keep = lambda s: (s.method, s.backbone, s.data.seq_len, s.data.tokenizer, s.seed,  # noqa: E731
                          {k: v for k, v in s.params.items() if k != "model"})
        assert keep(r) == keep(rep)
        for cfg in [r.train.for_stage(k) for k in r.train.stages] or [r.train]:
            assert (cfg.steps, cfg.batch_size, cfg.ckpt_every) == (4, 1, 3)
        assert (r.eval.max_blocks, r.eval.batch_size, r.eval.samples, r.eval.sample_steps) == (1, 1, 1, [3])
        assert r.eval.t_samples == rep.eval.t_samples and r.eval.protocol == rep.eval.protocol
        assert [d.name for d in (r.data.train, *r.data.eval)] == ["austen", "austen"]
        assert any("openwebtext" in n and "→ austen" in n for n in notes)
        if rep.method == "hf-causal-lm":
            (path, (name, shape)), = todo.items()
            assert r.params["model"] == path and name == rep.params["model"]
            assert shape == (rep.backbone.hidden, rep.backbone.layers, rep.backbone.heads)
        else:
            assert not todo


def test_projected_training_state_is_the_bytes_of_the_real_training_state():
    """The projection's state term, 4·(N + N_frozen) + 12·N_u + 4·N_ema bytes, equals the
    bytes of the weights, gradients, AdamW moments and EMA copy that bench.train holds after a
    step (activations set to zero, so the term stands alone) — N_u the parameters the step
    updated: one that no loss reaches has a weight and an EMA entry but no gradient or moments."""
    import torch

    from bench.config import BackboneConfig
    from bench.registry import get_method
    from bench.rehearse_table import Row, train_gpu
    from bench.train import EMA

    cls = get_method("mdlm")
    m = cls(cls.Params(), BackboneConfig(layers=1, hidden=32, heads=2, cond_dim=16), 97, 16)
    m.unused = torch.nn.Parameter(torch.zeros(1000))   # trained by the stage, reached by no loss
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    ema = EMA(m, 0.999)
    x = torch.randint(0, 97, (2, 16))
    m.loss(x, torch.ones_like(x, dtype=torch.bool), torch.full((2,), 0.5)).backward()
    opt.step()
    ema.update(m)
    real = sum(p.nbytes + (p.grad.nbytes if p.grad is not None else 0) for p in m.parameters()) + \
        sum(v.nbytes for v in ema.shadow.values()) + \
        sum(s[k].nbytes for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
    n, u = sum(p.numel() for p in m.parameters()), sum(p.numel() for p in m.parameters() if p.grad is not None)
    assert u == n - 1000
    row = Row("r", "MDLM", "tiny", "mdlm", 16, [], [], params=n)
    row.stages = [{"stage": "train", "updated": u, "ema": sum(v.numel() for v in ema.shadow.values()),
                   "work": 4 * u, "saved": 0, "b": 7, "per_rank": 7, "steps": 1, "peak": 0, "s": 0.0}]
    assert train_gpu(row) == (real, 7)


@pytest.mark.parametrize("args, says", [
    (["--steps", "1"], "--steps: Input should be greater than or equal to 2"),
    (["--corpus", "austin"], "--corpus: austin: not an embedded corpus"),
    (["--only", "nothing-like-it"], "--only: nothing-like-it: no run of the suite"),
    (["--mfu", "2"], "--mfu: Input should be less than or equal to 1"),
])
def test_bad_options_are_one_line_and_write_nothing(tmp_path, capsys, args, says):
    f = write_suite(tmp_path / "s.yaml", tiny_suite())
    out = tmp_path / "out"
    assert main(["rehearse", str(f), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {says}") and err.count("\n") == 1
    assert not out.exists()


def test_a_directory_that_is_no_rehearsal_is_never_replaced(tmp_path, capsys):
    """A run directory under --out that a rehearsal did not make (a real run's, say) is refused
    before anything is written, and left as it was."""
    from bench.suite import load_suite

    f = write_suite(tmp_path / "s.yaml", tiny_suite())
    _, specs = load_suite(f)
    rd = tmp_path / "out" / "runs" / specs[-1].run_id
    rd.mkdir(parents=True)
    (rd / "result.json").write_text("{}")
    assert main(["rehearse", str(f), "--out", str(tmp_path / "out")]) == 2
    assert "is not a rehearsal's run directory" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == sorted(["runs", rd.name, "result.json"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_calls_working_memory_is_its_own_not_the_process_peak():
    """The probe's working memory of a call is the peak above the RSS before it, with the
    kernel's high-water mark reset first: a call that touches 64 MiB after the process touched
    256 MiB (and gave it back) measures ~64 MiB, not the earlier 256. Tolerance: ± 16 MiB for
    the interpreter's own allocations and page-table rounding.

    The memory is an anonymous mapping written page by page and unmapped after, not a tensor:
    in a long test process the allocator may serve a tensor from pages it already holds, and
    then no RSS moves at all (seen in CI: peak == rss_before)."""
    import mmap

    from bench.rehearse_child import Probe

    def touch(mib: int) -> None:
        with mmap.mmap(-1, mib * 2 ** 20) as m:
            for off in range(0, len(m), mmap.PAGESIZE):
                m[off] = 1

    touch(256)
    probe = Probe(False, Path("unused"))
    _, m = probe.measure(touch, 64)
    assert probe.reset
    assert abs((m["peak"] - m["rss_before"]) / 2 ** 20 - 64) <= 16, m


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc")
@pytest.mark.parametrize("sig, code", [("SIGTERM", 128 + 15), ("SIGKILL", -9)])
def test_a_stopped_rehearsal_leaves_no_run_training(tmp_path, sig, code):
    """SIGTERM: the rehearsal kills the run it is rehearsing (one waiting in its first training
    step) and exits 143; SIGKILL (nothing of it runs): the kernel kills that run (the child's
    parent-death signal). Either way the child — the process that holds the run's lease — is
    gone within seconds."""
    import os
    import signal
    import subprocess
    import time

    from conftest import subprocess_env

    plugin = write_plugin(tmp_path / "plugin")   # (seen by the rehearsal's processes only)
    f = write_suite(tmp_path / "s.yaml", tiny_suite(methods=[{"method": "test-sleeper"}], baseline=None))
    env = {**subprocess_env(), "PYTHONPATH": f"{plugin}:{subprocess_env()['PYTHONPATH']}"}
    p = subprocess.Popen([sys.executable, "-m", "bench.cli", "rehearse", str(f), "--out", str(tmp_path / "out")],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def holder():
        try:
            return json.loads(next((tmp_path / "out" / "runs").glob("*/lease.json")).read_text())["pid"]
        except (StopIteration, OSError, ValueError, KeyError):
            return None
    deadline, child = time.monotonic() + 240, None
    while child is None and time.monotonic() < deadline and p.poll() is None:
        child = holder()
        time.sleep(0.2)
    assert child is not None, "no run started"
    p.send_signal(getattr(signal, sig))
    assert p.wait(timeout=60) == code

    def alive(pid):
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] not in "ZX"
        except OSError:
            return False
    gone = time.monotonic() + 30
    while alive(child) and time.monotonic() < gone:
        time.sleep(0.2)
    if alive(child):
        os.kill(child, signal.SIGKILL)   # (not left behind by a failing test)
        pytest.fail(f"the run's process {child} outlived the rehearsal stopped by {sig}")
