"""Every bad suite gives exit code 2, ONE line naming the YAML key path (or the file), no
traceback, and creates nothing (no run dir)."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
from conftest import tiny_suite, write_suite

from bench.cli import main


def _set(d: dict, path: str, value):
    d = copy.deepcopy(d)
    keys = path.split(".")
    cur = d
    for k in keys[:-1]:
        cur = cur[int(k)] if isinstance(cur, list) else cur[k]
    last = keys[-1]
    if value is DELETE:
        del cur[last]
    elif isinstance(cur, list):
        cur[int(last)] = value
    else:
        cur[last] = value
    return d


DELETE = object()
CASES = [  # (path to change, new value, text the one-line message must contain)
    ("methods.0.method", "mdml", "methods[0].method: unknown name 'mdml'; did you mean 'mdlm'?"),
    ("data.train.name", "austin", "data.train.name: unknown name 'austin'; did you mean 'austen'?"),
    ("data.eval.1.name", "wikitext", "data.eval[1].name: unknown name 'wikitext'"),
    ("train.steps", "many", "train.steps: Input should be a valid integer"),
    ("train.steps", -5, "train.steps: Input should be greater than 0"),
    ("sizes.tiny.heads", 3, "sizes.tiny.heads: heads (3) must divide hidden (32)"),
    ("sizes.tiny.layers", 0, "sizes.tiny.layers: Input should be greater than 0"),
    ("eval.t_samples", 0, "eval.t_samples: Input should be greater than 0"),
    ("eval.confidence", 1.5, "eval.confidence: Input should be less than 1"),
    ("data.seq_len", "long", "data.seq_len: Input should be a valid integer"),
    ("data.tokenizer.name", "sentencepiece", "data.tokenizer.name: Input should be 'gpt2', 'bpe', 'char' or 'hf'"),
    ("launch.executor", "kubernetes", "launch.executor: Input should be 'local', 'debug' or 'slurm'"),
    ("methods.0", {"method": "mdlm", "float64_samplng": True}, "methods[0].float64_samplng: unknown key"),
    ("methods", [], "methods: List should have at least 1 item"),
    ("data", DELETE, "data: Field required"),
    ("seeds", "zero", "seeds: Input should be a valid list"),
    ("data.train", {"name": "markov", "vocab": 1}, "data.train.vocab: Input should be greater than or equal to 2"),
    ("data.eval.0", {"name": "markov"}, "data.eval: a synthetic source cannot evaluate a model trained on text"),
    ("methods.0", {"method": "mdlm", "variant": "fast"}, "methods[0].variant: unknown name 'fast'"),
    ("sizes", {"huge": None}, "sizes.huge: not a named size"),
    ("train.stages", {"diffusion": {"steps": 5}},
     "train.stages.diffusion: no method of this suite has a stage 'diffusion' "
     "(methods[0] mdlm: train; baseline ar: train)"),
    ("train.stages", {"train": {"lr": -1}}, "train.stages.train.lr: Input should be greater than 0"),
    ("train.stages", {"train": {"step": 5}}, "train.stages.train.step: unknown key"),
]


@pytest.mark.parametrize("path,value,expect", CASES, ids=[c[0] + "=" + str(c[1])[:20] for c in CASES])
def test_bad_suite(tmp_path, capsys, path, value, expect):
    suite = _set(tiny_suite(), path, value)
    f = write_suite(tmp_path / "bad.yaml", suite)
    out = tmp_path / "out"
    rc = main(["run", str(f), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {f}: "), err
    assert expect in err, err
    assert not out.exists()


def test_unknown_top_level_key(tmp_path, capsys):
    suite = tiny_suite()
    suite["trian"] = suite.pop("train")
    rc = main(["run", str(write_suite(tmp_path / "bad.yaml", suite)), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "trian: unknown key" in err and len(err.splitlines()) == 1


def test_missing_file_and_bad_yaml(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope.yaml'}: file not found"
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: x\ndata: [unclosed\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}: invalid YAML (line") and len(err.splitlines()) == 1


def test_no_traceback_from_the_real_command(tmp_path):
    f = write_suite(tmp_path / "bad.yaml", _set(tiny_suite(), "train.steps", -1))
    r = subprocess.run([sys.executable, "-m", "bench.cli", "run", str(f), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("steps", ["4,x", "0", "16,-1", "16,,64"])
def test_bad_sample_step_budgets(tmp_path, capsys, steps):
    (tmp_path / "runs").mkdir()
    assert main(["sample", str(tmp_path), "--steps", steps]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --steps: expected positive integers separated by commas, got '{steps}'"
    assert [p.name for p in tmp_path.iterdir()] == ["runs"] and not any((tmp_path / "runs").iterdir())


def test_bad_sample_step_budgets_without_asserts(tmp_path):
    """python -O strips asserts: the check of a user's input must not be one."""
    (tmp_path / "runs").mkdir()
    r = subprocess.run([sys.executable, "-O", "-m", "bench.cli", "sample", str(tmp_path), "--steps", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --steps: expected positive integers separated by commas, got '0'"], r.stderr


@pytest.mark.parametrize("argv, expect", [
    (["speed", "--sizes", ","], "--sizes: name at least one of"),
    (["speed", "--sizes", "smoke", "--warmup", "-1"], "--warmup: must be 0 or more"),
    (["speed", "--sizes", "smoke", "--threads", "0"], "--threads: must be a positive integer"),
    (["speed", "--sizes", "smoke", "--peak-tflops", "-5"], "--peak-tflops: -5.0: must be positive"),
    (["status", "{out}", "--watch", "--interval", "0"], "--interval: 0.0: must be positive"),
    (["sample", "{out}", "--threads", "0"], "--threads: must be a positive integer"),
])
def test_bad_command_options(tmp_path, capsys, argv, expect):
    """Options the commands used to take silently (an empty size list, a negative warm-up, ...)."""
    (tmp_path / "runs").mkdir()
    json_out = tmp_path / "rows.json"
    argv = [a.replace("{out}", str(tmp_path)) for a in argv]
    assert main(argv + (["--json", str(json_out)] if argv[0] == "speed" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {expect}") and len(err.splitlines()) == 1, err
    assert not json_out.exists() and not any((tmp_path / "runs").iterdir())
