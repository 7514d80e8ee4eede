"""The GPT-2 tokenizer (the default of the real benchmark suites) end to end: packing with
EOS 50256, a 50,257-way output, training and evaluation on a tiny model."""
from __future__ import annotations

import json

from conftest import tiny_suite, write_suite

from bench.cli import main


def test_gpt2_tokenizer_run(tmp_path):
    suite = tiny_suite(methods=[{"method": "mdlm"}])
    suite["data"]["tokenizer"] = "gpt2"
    suite["data"]["eval"] = [{"name": "kjv"}]
    suite["train"].update(steps=3, ckpt_every=3)
    out = tmp_path / "out"
    assert main(["run", str(write_suite(tmp_path / "s.yaml", suite)), "--out", str(out)]) == 0
    for rd in (out / "runs").iterdir():
        rec = json.loads((rd / "result.json").read_text())
        assert rec["protocol"]["tokenizer"] == "gpt2"
        (m,) = rec["metrics"]
        # a nearly untrained model is close to uniform over 50,257 tokens
        assert 5_000 < m["value"] < 200_000
