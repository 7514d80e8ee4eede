"""Typed configuration of the data a suite trains and evaluates on (re-exported by
:mod:`bench.config`, the single source of every schema): a dataset reference, the tokenizer, a
run's data block and the suite's, whose ``train`` may list several datasets (one more axis of
the suite, like sizes and seeds). Also :class:`Strict`, the base of every schema.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_serializer, model_validator

from bench.config_io import drop_defaults

MAX_SEQ_LEN = 131_072      # 128 Ki tokens per sequence (SEDD/MDLM use 1024; long-context LMs 32-128 Ki)


class Strict(BaseModel):
    """Every schema's base: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetRef(BaseModel):
    """A dataset by registry name plus its parameters, e.g. ``{name: markov, vocab: 32}``."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def key(self) -> str:
        """Display name: ``markov(order=1,seed=7,vocab=32)``, or just ``austen``. A hub
        dataset's ``path`` (where a local copy lives) is not part of what it is:
        ``{name: ptb, path: /data/ptb}`` is ``ptb``; a textfile is named by its file:
        ``textfile(notes.txt)``."""
        p = self.params
        if self.name == "textfile" and isinstance(p.get("path"), str):
            rest = {k: v for k, v in p.items() if k != "path"}
            return f"textfile({Path(p['path']).name}" + "".join(f",{k}={rest[k]}" for k in sorted(rest)) + ")"
        p = {k: v for k, v in p.items() if k != "path"}
        return self.name if not p else self.name + "(" + ",".join(f"{k}={p[k]}" for k in sorted(p)) + ")"


class TokenizerConfig(Strict):
    """``gpt2`` (offline, OpenAI ids), ``bpe`` (byte-level BPE trained on the train split),
    ``char`` (text8's 27 characters; needs ``eval.packing: none``) or ``hf`` (a pretrained
    model's own tokenizer, ``model``: a named model such as ``smollm2``, a hub name or a
    save_pretrained directory, resolved as every pretrained model is, bench.hf; its EOS
    separates documents) — the tokenizer a row started from a causal LM (``mdlm``'s
    ``init_from``) trains and is evaluated in."""

    name: Literal["gpt2", "bpe", "char", "hf"] = "gpt2"
    vocab_size: Optional[PositiveInt] = None  # bpe only; default 8000
    model: Optional[str] = Field(None, min_length=1, max_length=500)   # hf only: whose tokenizer

    @model_validator(mode="after")
    def _check(self):
        if self.name in ("gpt2", "char") and self.vocab_size is not None:
            raise ValueError(f"vocab_size is fixed ({50257 if self.name == 'gpt2' else 27}) "
                             f"for the {self.name} tokenizer")
        if self.name == "bpe" and self.vocab_size is not None and self.vocab_size < 260:
            raise ValueError("a byte-level BPE needs vocab_size >= 260")
        if self.name == "hf" and (self.model is None or self.vocab_size is not None):
            raise ValueError("the hf tokenizer is a pretrained model's: give its model (e.g. smollm2), no vocab_size")
        if self.name != "hf" and self.model is not None:
            raise ValueError(f"model applies to the hf tokenizer only (this is {self.name})")
        return self

    @model_serializer(mode="wrap")
    def _drop_unset_model(self, handler):
        # ``model`` came later: absent from the spec (and the run id) of every other tokenizer
        return drop_defaults(handler(self), model=None)


class DataConfig(Strict):
    train: DatasetRef
    eval: list[DatasetRef] = Field(min_length=1)
    tokenizer: TokenizerConfig = TokenizerConfig()
    seq_len: int = Field(128, gt=0, le=MAX_SEQ_LEN)

    @field_validator("train", mode="before")
    @classmethod
    def _str_ref(cls, v):
        return _named(v)

    @field_validator("eval", mode="before")
    @classmethod
    def _str_refs(cls, v):
        return _named_list(v)

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _str_tok(cls, v):
        return _named(v)


def tokenizer_key(tok: TokenizerConfig) -> str:
    if tok.name == "hf":
        return f"hf:{tok.model}"
    return {"gpt2": "gpt2", "char": "char-text8"}.get(tok.name) or f"bpe-{tok.vocab_size or 8000}"


class SuiteData(Strict):
    """The suite's ``data:`` block. As a run's :class:`DataConfig`, except that ``train`` may
    list several datasets — one more axis of the suite: every size × method × dataset × seed is a
    run, trained on that one dataset (``suites/truth.yaml``: markov, hmm and dyck) — and that
    ``eval`` may be left out: each run is then evaluated on its own training dataset's test
    split (the only choice for a synthetic source, which is scored against itself)."""

    train: Union[DatasetRef, list[DatasetRef]]
    eval: Optional[list[DatasetRef]] = Field(None, min_length=1)
    tokenizer: TokenizerConfig = TokenizerConfig()
    seq_len: int = Field(128, gt=0, le=MAX_SEQ_LEN)

    @field_validator("train", mode="before")
    @classmethod
    def _str_train(cls, v):
        return [_named(x) for x in v] if isinstance(v, list) else _named(v)

    @field_validator("eval", mode="before")
    @classmethod
    def _str_refs(cls, v):
        return None if v is None else _named_list(v)

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _str_tok(cls, v):
        return _named(v)

    @field_validator("train")
    @classmethod
    def _distinct(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("list at least one dataset")
            keys = [r.key for r in v]
            dup = sorted({k for k in keys if keys.count(k) > 1})
            if dup:
                raise ValueError(f"each dataset once; {', '.join(dup)} is listed twice")
        return v

    @property
    def trains(self) -> list[DatasetRef]:
        return self.train if isinstance(self.train, list) else [self.train]

    def per_run(self) -> list[tuple[str, DataConfig]]:
        """(where, data block) per training dataset: each run's :class:`DataConfig` (``where``
        names its ``train`` entry in error messages: ``data.train`` or ``data.train[i]``)."""
        several = isinstance(self.train, list)
        return [(f"data.train[{i}]" if several else "data.train",
                 DataConfig(train=ref, eval=self.eval or [ref], tokenizer=self.tokenizer, seq_len=self.seq_len))
                for i, ref in enumerate(self.trains)]


def _named(v):
    return {"name": v} if isinstance(v, str) else v


def _named_list(v):
    """One reference or a list of them (a bare name for ``{name: ...}``)."""
    if isinstance(v, (str, dict)):
        v = [v]
    return [_named(x) for x in v] if isinstance(v, list) else v
