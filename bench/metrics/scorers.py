"""Generative-perplexity scorers: causal LMs that read token sequences (bench.metrics.genppl).

- :class:`RunScorer`: a tdbench ``ar`` run, its final weights (EMA if it trained with one); the
  default scorer is the suite's own matching-size AR baseline (bench.metrics.score finds it).
  Samples longer than its seq_len are scored in consecutive windows, each restarted from BOS.
- :class:`HFScorer`: a Hugging Face causal LM by hub name or local path (bench.hf's rule: a
  path-like name must exist locally, it never reaches the hub) or a named model (bench.models:
  ``smollm2``, converted once from its installed file), first token conditioned on the
  tokenizer's BOS (GPT-2 and smollm2: <|endoftext|>), sliding windows beyond its context. A
  named model's key carries its weights' sha256 and ``identity`` says what it is (both recorded).
"""
from __future__ import annotations

from pathlib import Path

import torch

from bench.errors import UserError


class Scorer:
    """A causal LM that scores token sequences. ``key`` names it (recorded); ``tokenizer_key``
    says which tokenizer its ids are in; ``encode``/``eos_id`` re-tokenize text."""

    key: str
    tokenizer_key: str
    eos_id: int | None
    identity: dict | None = None   # a named model's (bench.models.identity), recorded with the settings

    def encode(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def nll_sums(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,) float64 Σ_{i: mask} −log p(x_i | x_<i), the first token conditioned on the
        scorer's start token."""
        raise NotImplementedError


class RunScorer(Scorer):
    """A tdbench ``ar`` run (its final weights, EMA if it trained with one)."""

    def __init__(self, run_dir: Path):
        from bench.data import get_tokenizer
        from bench.samples import load_final_method

        self.run_dir = Path(run_dir)
        self.method, self.spec = load_final_method(self.run_dir)
        if self.spec.method != "ar":
            raise UserError(f"{run_dir}: a scorer run must be of method 'ar' (this is '{self.spec.method}')")
        self.tok = get_tokenizer(self.spec.data)
        self.key = f"tdbench-ar:{self.spec.run_id}"
        self.tokenizer_key = self.tok.key
        self.eos_id = self.tok.eos_id if self.tok.eos_id >= 0 else None
        self.L = self.spec.data.seq_len

    def encode(self, texts):
        return self.tok.encode_batch(texts)

    @torch.no_grad()
    def nll_sums(self, ids, mask):
        out = torch.zeros(ids.shape[0], dtype=torch.float64)
        dev = self.method.device
        for lo in range(0, ids.shape[1], self.L):   # windows of seq_len, each from BOS
            x, m = ids[:, lo:lo + self.L].to(dev), mask[:, lo:lo + self.L].to(dev)
            u = torch.zeros(x.shape[0], device=dev)
            out += self.method.nll(x, m, u).double().cpu()   # exact for an AR method
        return out


class HFScorer(Scorer):
    """A Hugging Face causal LM by hub name or local path (bench.hf)."""

    def __init__(self, name_or_path: str, stride: int | None = None):
        from transformers import AutoTokenizer

        from bench import models
        from bench.hf import load_causal_lm, resolve_pretrained

        where = "metrics.gen_ppl.scorer"
        self.model = load_causal_lm(name_or_path, where=where)
        src, local = resolve_pretrained(name_or_path, where, "a scorer")
        try:
            self.tok = AutoTokenizer.from_pretrained(src, local_files_only=local)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{name_or_path}: cannot load its tokenizer: {str(e).splitlines()[0][:200]}") from None
        self.identity = models.identity(name_or_path)   # None unless a named model
        self.key = (f"{name_or_path}@sha256:{self.identity['weights_sha256'][:12]}" if self.identity
                    else f"hf:{name_or_path}")
        self.tokenizer_key = self.key
        self.eos_id = self.tok.eos_token_id
        self.start_id = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        if self.start_id is None:
            raise UserError(f"{name_or_path}: its tokenizer has no BOS/EOS token to condition the first token on")
        self.stride = stride

    def encode(self, texts):
        return [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    def nll_sums(self, ids, mask):
        from bench.hf import causal_lm_token_nll

        return (causal_lm_token_nll(self.model, ids, self.start_id, self.stride).cpu() * mask).sum(1)


def make_scorer(spec: str, stride: int | None = None) -> Scorer:
    """``spec``: a tdbench run directory (has result.json) or an HF causal LM name/path."""
    p = Path(spec)
    if (p / "spec.json").is_file() and (p / "result.json").is_file():
        return RunScorer(p)
    return HFScorer(spec, stride)


