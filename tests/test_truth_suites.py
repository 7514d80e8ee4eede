"""The truth suites (suites/truth.yaml, truth-hmm.yaml, truth-dyck.yaml; issue 26): one suite
per synthetic source, because a suite trains on one source. They are one experiment, so they
must stay in step: identical but for `name` and `data`, each training every token-trained
method the issue names on a stream of its own source, scored on that same source."""
from __future__ import annotations

import yaml

from bench.suite import load_suite
from tests.conftest import REPO

SUITES = {"markov": "truth", "hmm": "truth-hmm", "dyck": "truth-dyck"}
# The list of methods that train on tokens (method, its graph/transition if any).
TOKEN_TRAINED = {("ar", None), ("mdlm", None), ("sedd", "absorb"), ("sedd", "uniform"), ("d3pm", "absorb"),
                 ("d3pm", "uniform"), ("csm", "absorb"), ("diffusion-lm", None), ("plaid", None), ("ssd-lm", None)}


def _raw(name):
    return yaml.safe_load((REPO / "suites" / f"{name}.yaml").read_text())


def test_truth_suites_differ_only_in_name_and_data():
    raws = {src: _raw(name) for src, name in SUITES.items()}
    strip = [{k: v for k, v in r.items() if k not in ("name", "data")} for r in raws.values()]
    assert all(s == strip[0] for s in strip[1:])
    assert len({r["data"]["seq_len"] for r in raws.values()}) == 1
    assert len({r["name"] for r in raws.values()}) == len(raws)   # distinct output directories


def test_truth_suites_cover_every_token_method_on_a_stream_of_their_source():
    for src, name in SUITES.items():
        suite, specs = load_suite(REPO / "suites" / f"{name}.yaml")
        train = suite.data.train
        assert train.name == src and train.train_blocks == "stream"
        assert [e for e in suite.data.eval] == [train]           # scored on the source it learns
        got = {(s.method, s.params.get("graph", s.params.get("transition"))) for s in specs}
        assert got == TOKEN_TRAINED
        seeds = {(s.method, s.label): set() for s in specs}
        for s in specs:
            seeds[(s.method, s.label)].add(s.seed)
        assert all(len(v) >= 3 for v in seeds.values())
        assert suite.eval.curve_every > 0 and suite.eval.samples > 0 and len(suite.eval.sample_steps) >= 2
