"""The bundled tiny lm-eval tasks' data (``custom_dataset`` of their YAMLs): JSONL files beside
this module, read offline as a ``datasets.DatasetDict`` with one ``test`` split."""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def _jsonl(name: str):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(HERE / name))})


def mc(**_metadata):
    """tdbench_tiny_mc: {context, choices, label} — pick the continuation of a sentence."""
    return _jsonl("tiny_mc.jsonl")


def rolling(**_metadata):
    """tdbench_tiny_rolling: {text} — short paragraphs scored whole (perplexity)."""
    return _jsonl("tiny_rolling.jsonl")


def gen(**_metadata):
    """tdbench_tiny_gen: {prompt, answer} — complete a phrase (generation up to a stop string)."""
    return _jsonl("tiny_gen.jsonl")
