"""What every sample-quality metric shares: a frozen pydantic settings model whose ``id`` (a
hash of the settings *as resolved for the numbers they produced*) is recorded beside each value
and keys its leaderboard column, as :class:`bench.config.Protocol` does for likelihoods."""
from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict

EOT = "<|endoftext|>"  # the document separator in decoded samples (GPT-2 / trained BPE)


class MetricSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def settings_id(resolved: dict) -> str:
    """8 hex digits naming a resolved settings dict (the column key)."""
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:8]


def words(text: str) -> list[str]:
    """Whitespace-separated words of a sample; document separators count as whitespace."""
    return text.replace(EOT, " ").split()


def floor_note(metric: str, floor: int, why: str) -> str:
    """Why a metric has no value for a set smaller than its ``min_samples`` (recorded as its note)."""
    return f"not computed: fewer than {floor} samples per set (metrics.{metric}.min_samples; {why})"
