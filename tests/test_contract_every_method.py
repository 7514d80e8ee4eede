"""The method contract (bench/method.py), checked on every registered method and variant —
the in-repo ones and any plugin installed through the ``tdbench.methods`` entry point — with no
list of names to keep up to date: a new plugin is held to the contract the moment it registers.

Each method is built offline from ``Method.example_params`` (default: its schema's defaults) on
a 1-layer backbone, GPT-2's vocabulary and L = 12, and must:
- have no 0-dim parameter (DeepSpeed's start-up broadcast cannot take one);
- declare valid ``stage_defaults`` (stages it has, TrainConfig stage fields that validate); with
  one stage, train every parameter and have forward = loss, bit for bit;
- take its training set (``fit_training_set``, as the harness does before the first stage)
  and say how many of its blocks that pass encodes (0..B);
- in every stage it trains: give a finite scalar loss whose gradient reaches the stage's
  parameters (finite, and not all zero);
- with a likelihood: give a finite, non-negative per-sequence NLL of shape (B,) that, when
  exact, does not depend on the time draw u;
- with a sampler: return (n, L) integer ids in [0, V) in at most ``steps`` network calls per
  sequence when it takes a step budget (NFE counted as the harness counts it);
- declare ``float64_sampling`` as a bool or None, and give ``self_condition_chain`` as None or
  (K floats, one float).
The last test makes a plugin with ``tdbench new-method``, installs it as an entry point of a
temporary package and shows this file picks it up.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

from bench.config import STAGE_FIELDS, BackboneConfig, StageSettings
from bench.data import Blocks
from bench.data.tokenizers import gpt2
from bench.method import Context, Method
from bench.registry import all_methods
from bench.samples import count_calls

BB = BackboneConfig(layers=1, hidden=32, heads=2, cond_dim=16)
L, B, N_SAMPLES, STEPS = 12, 3, 2, 3


def _cases() -> list[tuple[str, str | None]]:
    return [(name, v) for name, cls in all_methods().items() for v in [None, *cls.variants]]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("contract")


def _build(name: str, variant: str | None, workdir: Path) -> Method:
    cls = all_methods()[name]
    params = {**cls.example_params(workdir), **(cls.variants[variant] if variant else {})}
    tok = gpt2()
    torch.manual_seed(0)
    m = cls(cls.Params(**params), BB, tok.vocab_size, L, context=Context(tokenizer=tok))
    with torch.no_grad():   # away from zero-initialised layers (adaLN-zero heads, a VAE's μ head),
        for p in m.parameters():   # behind which a broken gradient path would not show
            p.add_(0.02 * torch.randn_like(p))
    m.eval()
    return m


def _batch(V: int):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (B, L), generator=g)
    counted = torch.ones_like(x, dtype=torch.bool)
    counted[0, :2] = False   # some context that is never scored
    return x, counted, torch.rand(B, generator=g)


@pytest.mark.parametrize("name,variant", _cases(), ids=lambda v: v or "default")
def test_method_meets_the_contract(name, variant, workdir):
    m = _build(name, variant, workdir)
    cls = type(m)
    x, counted, u = _batch(m.V)

    zero_dim = [n for n, p in m.named_parameters() if p.dim() == 0]
    assert not zero_dim, f"0-dim parameters: {zero_dim}"

    assert m.stages and len(set(m.stages)) == len(m.stages)
    for stage, defaults in cls.stage_defaults.items():
        assert stage in m.stages, f"stage_defaults names '{stage}', not one of {m.stages}"
        assert set(defaults) <= set(STAGE_FIELDS), set(defaults) - set(STAGE_FIELDS)
        StageSettings(**defaults)   # validates

    if cls.trains and m.stages == ("train",):   # the defaults keep a single-stage method as it was
        assert cls.stage_defaults == {} and m.current_stage == "train"
        assert [id(p) for p in m.stage_parameters("train")] == [id(p) for p in m.parameters() if p.requires_grad]
        with torch.no_grad():
            torch.manual_seed(5)
            a = m(x, counted, u)
            torch.manual_seed(5)
            assert torch.equal(a, m.loss(x, counted, u)), "forward is not the loss of its one stage"

    if cls.trains:
        with torch.no_grad():   # as the harness does before the first stage of a fresh run
            note = m.fit_training_set(Blocks(x.numpy().astype(np.int32), counted.numpy()))
        assert note is None or isinstance(note, str)
        assert 0 <= m.training_set_encodes(B) <= B
        for stage in m.stages:
            m.current_stage = stage
            m.train()
            params = m.stage_parameters(stage)
            for p in params:
                p.grad = None
            torch.manual_seed(2)
            loss = m(x, counted, u)
            assert loss.dim() == 0 and math.isfinite(float(loss.detach())), f"stage {stage}: loss {loss}"
            loss.backward()
            grads = [p.grad for p in params if p.grad is not None]
            assert grads, f"stage {stage}: no gradient reaches its parameters"
            assert all(torch.isfinite(g).all() for g in grads), f"stage {stage}: non-finite gradient"
            assert any(g.abs().sum() > 0 for g in grads), f"stage {stage}: every gradient is zero"
        m.current_stage = m.stages[0]
        m.eval()

    if cls.likelihood != "none":
        with torch.no_grad():
            torch.manual_seed(3)
            nll = m.nll(x, counted, u)
            assert nll.shape == (B,), nll.shape
            assert torch.isfinite(nll).all() and (nll >= 0).all(), nll
            if cls.likelihood == "exact":
                assert torch.allclose(m.nll(x, counted, 1 - u), nll), "an exact NLL depends on u"

    if "sampling" in cls.supports():
        calls, handle = count_calls(m.net)
        try:
            with torch.no_grad():
                s = m.sample(N_SAMPLES, STEPS, generator=torch.Generator().manual_seed(4))
        finally:
            handle.remove()
        assert s.shape == (N_SAMPLES, L) and not s.dtype.is_floating_point, (s.shape, s.dtype)
        assert int(s.min()) >= 0 and int(s.max()) < m.V
        if cls.sampler_steps:
            assert calls[0] / N_SAMPLES <= STEPS, f"NFE {calls[0] / N_SAMPLES} > {STEPS} steps"

    assert m.float64_sampling in (None, True, False)
    chain = m.self_condition_chain(x, counted, 0.5, 2)
    if chain is not None:
        norms, ref = chain
        assert len(norms) == 2 and all(math.isfinite(float(v)) for v in [*norms, ref])


def test_every_builtin_method_is_checked():
    """The cases come from the registry: every in-repo family is among them."""
    names = {n for n, _ in _cases()}
    assert {"ar", "mdlm", "bd3lm", "sedd", "d3pm", "csm", "diffusion-lm", "plaid", "ssd-lm", "tencdm", "ld4lg",
            "planner", "hf-causal-lm"} <= names


def _install_plugin(root: Path, module: str) -> None:
    """A temporary package ``tdbench_contract_demo`` holding ``module``, with dist-info metadata
    that registers it under the ``tdbench.methods`` entry-point group (what pip would write)."""
    dist = root / "tdbench_contract_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tdbench-contract-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[tdbench.methods]\n{module} = tdbench_contract_demo.{module}\n")


@pytest.mark.parametrize("family,outcome", [("discrete", "failed"), ("continuous", "passed")])
def test_a_new_plugin_is_checked_without_editing_a_list(tmp_path, family, outcome):
    """``tdbench new-method demo`` writes a plugin; installed through the entry point of a
    temporary package, the contract test above collects it by itself. The discrete skeleton
    (its nll and sample still to be written) fails the contract naming what is missing; the
    continuous skeleton (a working Gaussian-embedding method) passes it."""
    pkg = tmp_path / "tdbench_contract_demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    args = ["new-method", "demo", "--dir", str(pkg)] + (["--family", "continuous"] if family == "continuous" else [])
    made = subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    _install_plugin(tmp_path, "demo")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--rootdir", str(REPO),
                          str(Path(__file__)), "-k", "test_method_meets_the_contract and demo"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    out = run.stdout + run.stderr
    assert "test_method_meets_the_contract[demo-default]" in out, out[-3000:]
    assert f"1 {outcome}" in out, out[-3000:]
    if outcome == "failed":
        assert "write the bound of demo" in out, out[-3000:]
