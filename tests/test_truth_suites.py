"""The truth suite (suites/truth.yaml; issue 26): every method the issue names as training on
tokens, on a stream of each of the three synthetic sources, scored on the source it learns,
with ≥ 3 seeds, a learning curve and several sampling budgets."""
from __future__ import annotations

from bench.suite import load_suite
from tests.conftest import REPO

# The list of methods that train on tokens (method, its graph/transition if any).
TOKEN_TRAINED = {("ar", None), ("mdlm", None), ("sedd", "absorb"), ("sedd", "uniform"), ("d3pm", "absorb"),
                 ("d3pm", "uniform"), ("csm", "absorb"), ("diffusion-lm", None), ("plaid", None), ("ssd-lm", None)}


def test_truth_suite_trains_every_token_method_on_a_stream_of_each_source():
    suite, specs = load_suite(REPO / "suites" / "truth.yaml")
    assert suite.data.eval is None and [t.name for t in suite.data.trains] == ["markov", "hmm", "dyck"]
    assert all(t.train_blocks == "stream" for t in suite.data.trains)
    for src in suite.data.trains:
        mine = [s for s in specs if s.data.train == src]
        assert all(s.data.eval == [src] for s in mine)             # scored on the source it learns
        assert {(s.method, s.params.get("graph", s.params.get("transition"))) for s in mine} == TOKEN_TRAINED
        seeds: dict = {}
        for s in mine:
            seeds.setdefault(s.label, set()).add(s.seed)
        assert all(len(v) >= 3 for v in seeds.values())
    assert suite.eval.curve_every > 0 and suite.eval.samples > 0 and len(suite.eval.sample_steps) >= 2
    # samples are drawn in batches of min(batch_size, samples): one batch per budget
    assert suite.eval.batch_size >= suite.eval.samples
