"""Why MAUVE has a sample floor (metrics.mauve.min_samples, docs/protocol.md): MAUVE of human
text against human text, and of shuffled-word gibberish against human text, at n texts per set,
over several random draws of the sets (MiniLM features, the default MAUVE settings: 3 k-means
seeds, num_buckets = n/10). A score means something where the human-vs-human values sit high and
tight and clear of the gibberish ones. A script, not a test: figures are printed, never asserted.

    python benchmarks/mauve_floor.py [--n 4 10 25 50 100 200] [--draws 5]
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

WORDS = 60   # words per text (about the length of a 64-token sample)


def texts(n_chunks: int, seed: int) -> list[str]:
    from bench.data import corpora

    ws = " ".join(corpora.documents("austen", "test")).split()
    start = np.random.default_rng(seed).permutation(len(ws) // WORDS)[:n_chunks] * WORDS   # disjoint chunks
    return [" ".join(ws[i:i + WORDS]) for i in start]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[4, 10, 25, 50, 100, 200])
    ap.add_argument("--draws", type=int, default=5)
    a = ap.parse_args()
    import torch

    from bench.metrics.mauve import Featurizer, MauveSettings, mauve_score

    torch.set_num_threads(1)
    st = MauveSettings()
    f = Featurizer("minilm", st.max_text_length)
    pool = texts(3 * max(a.n), 0)
    feats = f(pool)
    words = " ".join(pool).split()
    np.random.default_rng(1).shuffle(words)
    gib = f([" ".join(words[i * WORDS:(i + 1) * WORDS]) for i in range(max(a.n))])
    print(f"MAUVE (mean over its {len(st.seeds)} k-means seeds) per random draw of the sets; "
          f"{a.draws} draws per n; Austen test chunks of {WORDS} words, MiniLM features")
    for n in a.n:
        human, gibberish = [], []
        for d in range(a.draws):
            idx = np.random.default_rng(100 + d).permutation(len(pool))
            ref, other = feats[idx[:n]], feats[idx[n:2 * n]]
            human.append(mauve_score(other, ref, st)["value"])
            gibberish.append(mauve_score(gib[np.random.default_rng(200 + d).permutation(len(gib))[:n]], ref,
                                         st)["value"])
        h, g = np.array(human), np.array(gibberish)
        print(f"n = {n:4d}: human vs human {h.mean():.3f} (sd {h.std(ddof=1):.3f}, range {h.min():.3f}-{h.max():.3f}); "
              f"gibberish vs human {g.mean():.3f} (sd {g.std(ddof=1):.3f}, range {g.min():.3f}-{g.max():.3f}); "
              f"draws where gibberish scored at least as high as human text: {int((g >= h).sum())}/{a.draws}")


if __name__ == "__main__":
    main()
