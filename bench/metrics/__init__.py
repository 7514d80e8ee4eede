"""Sample-quality metrics: harness code, never a method's (methods only sample).

One module per metric family, each with a pydantic settings model recorded beside its value
(as :class:`bench.config.Protocol` is for likelihoods); a value's column key is the id of its
*resolved* settings (the user's settings + what they were resolved to: scorer run, reference
set, tokenizer), so numbers under different settings never share a leaderboard column.

- ``genppl``   generative perplexity (+ the scorer conventions), ``scorers`` the scorer LMs
- ``ngrams``   diversity, memorization (cached hashed 4-gram index), unigram entropy
- ``mauve``    MAUVE on MiniLM (offline) or any HF model's features, mean ± std over seeds
- ``reference`` held-out human sets: the MAUVE reference, the Source-text row, the mem corpus
- ``truth``    a synthetic source scoring its models' samples (true_nll, valid, ngram_tv)
- ``score``    scoring a sample set, a run directory or a suite output directory

The suite's top-level ``metrics:`` key is a :class:`MetricsConfig`; it is not part of any run id
(changing how samples are scored never retrains a model).
"""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, model_serializer

from bench.metrics.base import floor_note
from bench.metrics.genppl import GenPPLSettings
from bench.metrics.mauve import MIN_SAMPLES_WHY, MauveSettings
from bench.metrics.ngrams import NgramSettings
from bench.metrics.truth import TruthSettings

# every metric with a sample floor: (its default min_samples, why). gen_ppl, entropy, mem and div
# have none: they are averages over samples or n-grams (bench.metrics.ngrams says why).
FLOORS = {"mauve": (MauveSettings().min_samples, MIN_SAMPLES_WHY)}


class ReferenceSettings(BaseModel):
    """Where the human text comes from: ``dataset`` (default: the suite's training dataset);
    memorization against its train split; the MAUVE reference and the Source-text set are
    disjoint random sets of held-out blocks of its ``split``, the same count and length as the
    samples, drawn with ``seed``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    dataset: Optional[str] = None
    split: str = "test"
    seed: int = 0


class MetricsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    gen_ppl: GenPPLSettings = GenPPLSettings()
    mauve: Optional[MauveSettings] = MauveSettings()   # null: skip MAUVE
    ngrams: NgramSettings = NgramSettings()
    truth: TruthSettings = TruthSettings()              # synthetic sources: in place of gen_ppl and MAUVE
    reference: ReferenceSettings = ReferenceSettings()
    source_text: bool = True                            # the Source-text row

    @model_serializer(mode="wrap")
    def _drop_default_truth(self, handler):
        # `truth` came later: at its default it leaves the dump (metrics.json, the head of every
        # scores.json, hence their reuse) what it was before it existed
        d = handler(self)
        if isinstance(d, dict) and self.truth == TruthSettings():
            d.pop("truth", None)
        return d


__all__ = ["FLOORS", "MetricsConfig", "GenPPLSettings", "MauveSettings", "NgramSettings", "ReferenceSettings",
           "TruthSettings", "floor_note"]
