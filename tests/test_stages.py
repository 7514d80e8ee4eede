"""Multi-stage methods and frozen parts, on a two-stage test method (tests/stage_plugin.py:
an autoencoder stage, then a diffusion stage over its latents):

(a) each stage trains only its own parameters: the others stay bit for bit what they were;
(b) SIGKILL during stage 2 and a restart resume stage 2 from its checkpoint, with stage 1's
    weights intact, and end bit-identical (CPU, one thread) to an uninterrupted run;
(c) a 2-process DDP run (gloo) equals the 1-process run with the same global batch: every loss
    within 1e-6 relative and every weight within 1e-6 absolute (float summation order differs:
    DDP averages two half-batch gradients where one process accumulates them);
(d) a frozen pretrained module (a tiny BERT, save_pretrained in tmp_path) gets no gradient in
    a whole run, is absent from the checkpoints, and a run whose frozen weights changed on disk
    is refused on reload with one line naming the source.
Also: per-stage settings resolve with the documented precedence and enter the run id.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import stage_plugin
import torch
from conftest import complete_record, run_killed_at, specs_of, start_ranks, subprocess_env, tiny_suite

from bench import registry
from bench.runner import execute

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
REGISTER_TOY = ("import stage_plugin; from bench.registry import register; "
                "register(stage_plugin.NAME)(stage_plugin.TwoStageToy)")
CHILD = (f"import json,sys; {REGISTER_TOY}; from bench.runner import execute; "
         "execute(json.loads(sys.argv[1]), sys.argv[2], 1, "
         "micro_batch=int(sys.argv[3]) if len(sys.argv) > 3 else None)")
AE, DIFF = "1-autoencoder", "2-diffusion"


@pytest.fixture(autouse=True, scope="module")
def toy_registered():
    registry.discover()
    registry.register(stage_plugin.NAME)(stage_plugin.TwoStageToy)
    yield
    registry._METHODS.pop(stage_plugin.NAME, None)


def _suite(stages: dict, params: dict | None = None, launch: dict | None = None, **train) -> dict:
    return tiny_suite(methods=[{"method": stage_plugin.NAME, **(params or {})}], baseline=None,
                      train={"steps": 10, "batch_size": 8, "lr": 3e-3, "warmup": 2, "ckpt_every": 5,
                             "stages": stages, **train}, **({"launch": launch} if launch else {}))


def _spec(tmp_path, stages, params=None, **train):
    return specs_of(_suite(stages, params, **train), tmp_path)[0]


def _final(rd: Path, stage_dir: str) -> Path:
    return sorted((rd / "ckpt" / stage_dir).glob("step_*"))[-1]


def _weights(ck: Path, name: str = "model.safetensors") -> dict:
    from safetensors.torch import load_file

    return load_file(ck / name)


def test_stage_settings_resolve_with_precedence_and_enter_the_run_id(tmp_path):
    """suite per-stage > method stage_defaults > suite top-level > default; a single-stage
    method's run id is unchanged by the (empty) stages."""
    spec = _spec(tmp_path, {"diffusion": {"steps": 7}})
    ae, df = spec.train.for_stage("autoencoder"), spec.train.for_stage("diffusion")
    assert (ae.steps, ae.lr, ae.batch_size, ae.ema) == (10, 1e-2, 8, 0.0)   # lr: the method's default
    assert (df.steps, df.lr) == (7, 3e-3)                                   # steps: the suite's stage value
    assert spec.train.total_steps == 17
    spec_lr = _spec(tmp_path, {"diffusion": {"steps": 7}, "autoencoder": {"lr": 5e-3}})
    assert spec_lr.train.for_stage("autoencoder").lr == 5e-3                # suite stage value > method default
    assert spec_lr.run_id != spec.run_id
    plain = specs_of(tiny_suite(baseline=None), tmp_path)[0]
    assert "stages" not in plain.model_dump(mode="json")["train"]
    again = specs_of(tiny_suite(baseline=None, train={**tiny_suite()["train"], "stages": {"train": {}}}), tmp_path)[0]
    assert again.run_id == plain.run_id


def test_each_stage_trains_only_its_parameters(tmp_path):
    """(a) Stage 1 leaves the denoiser as initialised; stage 2 leaves E and D as stage 1 ended."""
    from bench.data import get_tokenizer
    from bench.runner import build_method

    spec = _spec(tmp_path, {"autoencoder": {"steps": 6}, "diffusion": {"steps": 6}})
    rd = tmp_path / "run"
    assert execute(spec.model_dump(mode="json"), rd, 1) == "complete"
    rec = complete_record(rd)
    torch.manual_seed(spec.seed)
    init = build_method(spec, get_tokenizer(spec.data).vocab_size).state_dict()
    w1, w2 = _weights(_final(rd, AE)), _weights(_final(rd, DIFF))
    net = [k for k in init if k.startswith("net.")]
    ae = [k for k in init if k.startswith(("E.", "D."))]
    assert net and ae and set(init) == set(w1) == set(w2)
    assert all(torch.equal(w1[k], init[k]) for k in net)                 # untouched in stage 1
    assert all(not torch.equal(w1[k], init[k]) for k in ae)              # trained in stage 1
    assert all(torch.equal(w2[k], w1[k]) for k in ae)                    # untouched in stage 2
    assert any(not torch.equal(w2[k], w1[k]) for k in net)               # trained in stage 2
    st = rec["train"]["stages"]
    assert list(st) == ["autoencoder", "diffusion"] and st["autoencoder"]["steps"] == 6
    assert rec["train"]["steps"] == 12 and (
        rec["train"]["tokens"] == st["autoencoder"]["tokens"] + st["diffusion"]["tokens"])
    assert all(math.isfinite(s["final_loss"]) for s in st.values())
    assert json.loads((_final(rd, AE) / "state.json").read_text())["stage_complete"] is True
    progress = json.loads((rd / "progress.json").read_text())
    assert progress["phase"] == "eval" and progress["total"] == 12


def test_sigkill_in_stage_two_then_resume_equals_uninterrupted(tmp_path):
    """(b) with EMA in both stages: each its own, over its own parameters; stage 2 starts from
    stage 1's averaged weights."""
    spec = _spec(tmp_path, {"autoencoder": {"steps": 20, "ema": 0.5},
                            "diffusion": {"steps": 40, "ema": 0.9, "ckpt_every": 10}})
    spec_json = json.dumps(spec.model_dump(mode="json"))
    ref_dir = tmp_path / "uninterrupted"
    assert execute(json.loads(spec_json), ref_dir, 1) == "complete"
    ref = complete_record(ref_dir)

    rd = tmp_path / "killed"
    run_killed_at(spec_json, rd, 20, stage=DIFF, env=subprocess_env(), prelude=REGISTER_TOY)
    killed_at = 20
    stage1 = _weights(_final(rd, AE), "ema.safetensors")   # stage 1's result: its averaged E and D
    assert set(stage1) == {k for k in _weights(_final(rd, AE)) if k.startswith(("E.", "D."))}
    assert execute(json.loads(spec_json), rd, 1) == "complete"
    got = complete_record(rd)
    log = (rd / "log.txt").read_text()
    assert f"resuming stage diffusion (2/2) from step_{killed_at:07d} (step {killed_at})" in log
    assert got["train"]["resumed_from_step"] == killed_at and got["train"]["resumed_in_stage"] == "diffusion"
    assert got["metrics"] == [{**m, "eval_s": g["eval_s"]} for m, g in zip(ref["metrics"], got["metrics"])]
    assert got["train"]["loss_curve"] == ref["train"]["loss_curve"]
    drop = lambda d: {k: v for k, v in d.items() if k != "wall_s"}  # noqa: E731
    assert drop(got["train"]["stages"]["autoencoder"]) == drop(ref["train"]["stages"]["autoencoder"])
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = _weights(_final(rd, DIFF), name), _weights(_final(ref_dir, DIFF), name)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    final = _weights(_final(rd, DIFF))
    assert all(torch.equal(final[k], stage1[k]) for k in stage1)
    ema = _weights(_final(rd, DIFF), "ema.safetensors")
    assert ema and all(k.startswith("net.") for k in ema)   # stage 2's EMA covers its parameters only
    from bench.samples import load_final_method

    m, _ = load_final_method(rd)   # model weights with stage 2's EMA over them
    sd = m.state_dict()
    assert all(torch.equal(sd[k], ema[k]) for k in ema) and all(torch.equal(sd[k], stage1[k]) for k in stage1)


def test_ddp_two_processes_equal_one_process(tmp_path):
    """(c) DDP registers only the stage's parameters (find_unused_parameters=False would fail
    otherwise: stage 1 never uses the denoiser, stage 2 never gives E or D a gradient)."""
    spec = _spec(tmp_path, {"autoencoder": {"steps": 6}, "diffusion": {"steps": 8}})
    spec_json = json.dumps(spec.model_dump(mode="json"))
    one = tmp_path / "one"
    assert execute(json.loads(spec_json), one, 1, micro_batch=4) == "complete"
    two = tmp_path / "two"
    procs = start_ranks([sys.executable, "-c", CHILD, spec_json, str(two), "4"])
    try:
        errs = [p.communicate(timeout=300)[1].decode()[-3000:] for p in procs]
    finally:
        for p in procs:   # a rank left waiting in a collective must not outlive the test
            if p.poll() is None:
                p.kill()
                p.wait()
    r2, r1 = complete_record(two), complete_record(one)
    assert [p.returncode for p in procs] == [0, 0], errs
    t2, t1 = r2["train"], r1["train"]
    assert (t2["world_size"], t2["engine"], t2["grad_accum"]) == (2, "ddp", 1) and t1["grad_accum"] == 2
    assert t2["param_checksums"][0] == t2["param_checksums"][1]
    assert len(t2["loss_curve"]) == 8   # the last stage's curve
    for s in ("autoencoder", "diffusion"):
        assert math.isclose(t2["stages"][s]["final_loss"], t1["stages"][s]["final_loss"], rel_tol=1e-6), s
    for a, b in zip(t2["loss_curve"], t1["loss_curve"]):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    for a, b in zip(r2["metrics"], r1["metrics"]):
        assert math.isclose(a["value"], b["value"], rel_tol=1e-6), (a, b)
    for sd in (AE, DIFF):
        w2, w1 = _weights(_final(two, sd)), _weights(_final(one, sd))
        assert max(float((w2[k] - w1[k]).abs().max()) for k in w1) <= 1e-6, sd


@pytest.fixture
def tiny_bert(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=512, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(path)
    return path


def test_frozen_encoder_gets_no_gradient_is_not_checkpointed_and_is_checked(tmp_path, tiny_bert, monkeypatch):
    """(d)"""
    from transformers import BertModel

    from bench.errors import UserError
    from bench.method import weights_sha256
    from bench.samples import load_final_method

    seen = []
    real = stage_plugin.TwoStageToy.stage_loss

    def spy(self, stage, x0, counted, u):   # after every backward of the run: no .grad on the encoder
        if seen:
            assert all(p.grad is None for p in self.encoder.parameters())
        seen.append(stage)
        return real(self, stage, x0, counted, u)

    monkeypatch.setattr(stage_plugin.TwoStageToy, "stage_loss", spy)
    spec = _spec(tmp_path, {"autoencoder": {"steps": 4}, "diffusion": {"steps": 4}}, {"encoder": str(tiny_bert)})
    rd = tmp_path / "out" / "runs" / spec.run_id
    before = weights_sha256(BertModel.from_pretrained(tiny_bert))
    assert execute(spec.model_dump(mode="json"), rd, 1) == "complete"
    rec = complete_record(rd)
    assert seen.count("autoencoder") == 4 and seen.count("diffusion") == 4
    assert rec["method_info"]["frozen"] == {"encoder": {"source": str(tiny_bert), "sha256": before}}
    crossing = "suite ids fed to the encoder as its own ids (test method)"
    assert rec["protocol"]["text_crossing"] == crossing and rec["protocol"]["id"] == spec.protocol().id
    from bench.leaderboard import write

    md, _ = write(tmp_path / "out")
    assert f"- text crossing, {spec.label}: {crossing}" in md
    bert_keys = set(BertModel.from_pretrained(tiny_bert).state_dict())
    for sd in (AE, DIFF):
        ck = _final(rd, sd)
        keys = set(_weights(ck))
        assert keys and not any(k.startswith("encoder") or k in bert_keys for k in keys)
        assert json.loads((ck / "state.json").read_text())["frozen"]["encoder"]["sha256"] == before
    assert rec["train"]["params"] == sum(v.numel() for v in _weights(_final(rd, DIFF)).values())
    assert rec["train"]["params_frozen"] == sum(p.numel() for p in BertModel.from_pretrained(tiny_bert).parameters())
    m, _ = load_final_method(rd)   # same weights on disk: fine
    assert all(p.grad is None and not p.requires_grad for p in m.encoder.parameters())

    changed = BertModel.from_pretrained(tiny_bert)
    with torch.no_grad():
        changed.pooler.dense.bias.add_(1e-3)
    changed.save_pretrained(tiny_bert)
    with pytest.raises(UserError,
                       match=rf"^{tiny_bert}: frozen module 'encoder' changed since the run recorded it") as e:
        load_final_method(rd)
    assert "\n" not in str(e.value)
    (rd / "result.json").unlink()   # rerun: it resumes from its last checkpoint, and refuses
    assert execute(spec.model_dump(mode="json"), rd, 1) == "failed"
    err = json.loads((rd / "result.json").read_text())["error"]
    assert err.startswith(f"{tiny_bert}: frozen module 'encoder' changed") and "\n" not in err


def test_methods_lists_stages_and_new_method_offers_them(tmp_path, capsys):
    from bench.cli import main

    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert "stages (trained in order; suite train.stages.<stage> sets steps, lr, ...): " \
           "autoencoder (lr=0.01) → diffusion" in text
    after = text.split("\nmdlm  (")[1].split("\n")[1:]
    mdlm = after[:next(i for i, line in enumerate(after) if not line.startswith("    "))]
    assert mdlm and not any("stages" in line for line in mdlm)   # a single-stage method shows none
    assert main(["new-method", "two_st", "--stages", "autoencoder,diffusion", "--dir", str(tmp_path)]) == 0
    src = (tmp_path / "two_st.py").read_text()
    compile(src, "two_st.py", "exec")
    assert "stages = ('autoencoder', 'diffusion')" in src and "def stage_parameters" in src and "def stage_loss" in src
    assert main(["new-method", "one_st", "--dir", str(tmp_path)]) == 0
    assert "stages = (" not in (tmp_path / "one_st.py").read_text()
    assert main(["new-method", "bad_st", "--stages", "diffusion", "--dir", str(tmp_path)]) == 2
    assert "new-method --stages: 'diffusion' must name two or more" in capsys.readouterr().err
    assert not (tmp_path / "bad_st.py").exists()


def test_live_view_shows_the_stage():
    from bench import live

    r = live.Row("r1", "LD", "tiny", 0, "running", step=5, total=40, phase="train:diffusion", loss=1.0)
    assert live.plain_line(r) == "LD tiny seed=0: running, stage diffusion, step 5/40, loss 1.000"
    assert live.stage_of("train") is None and live.stage_of("eval") is None


def test_a_stage_batch_that_does_not_split_is_named(tmp_path):
    from conftest import write_suite

    from bench.errors import UserError
    from bench.launch import check_launch
    from bench.suite import load_suite

    s = _suite({"diffusion": {"batch_size": 6}}, launch={"executor": "local", "tasks_per_node": 4})
    suite, specs = load_suite(write_suite(tmp_path / "s.yaml", s))
    with pytest.raises(UserError,
                       match=r"^train\.stages\.diffusion\.batch_size: 6 is not divisible by the world size 4"):
        check_launch(suite, specs, "local")
