"""lm-evaluation-harness, the harness side: a run's final model answering lm-eval's three
requests on token ids (:class:`Scorer`), with no import of lm_eval (bench/lmeval_model.py is
the registered ``tdbench`` model that turns text into these calls; bench/lmeval_run.py is
``tdbench lm-eval``). Every number comes from the protocol's own estimators:

- ``loglikelihood(context, continuation)`` = −``conditional_nll`` (bench/evaluate.py): the
  method's conditional bound of the continuation given the context, K stratified time draws per
  request (two replicates of K/2 strata: each request's Monte-Carlo standard error is
  ``per_sequence_se``); exact and draw-free for an exact method (AR, hf-causal-lm).
- ``loglikelihood_rolling(text)`` = −Σ over the text's blocks of ``per_sequence_nll``: the
  document packed as the protocol packs a split (bench.data.packing.pack, the run's seq_len and
  packing), its tokens counted and nothing else — no appended EOS, no injected BOS, no padding
  — so Σ is the protocol's bound on −log p(text) block by block, each block starting afresh as
  the protocol's blocks do; its standard error is √Σ of the blocks' squared ones.
- ``generate_until(context)``: ``conditional_sample`` (bench/condition.py) with the context
  kept as a prefix and the rest of the block generated in the run's step budget.

Layout of a conditional request (``layout``). The conditional NLL has no padding category:
every position is context (kept) or continuation (scored). A request is
``[BOS] context continuation``, BOS (the EOS id) only where the run's packing injects one per
block (``bos_eos_per_block``), the context cut from the left when the whole exceeds the block
(as lm-eval's ``hf`` model cuts at its max length). A method that conditions on a prefix only
("prefix": AR, hf-causal-lm) reads the request at its own length — a left-to-right model's
likelihood of a position never depends on what follows, so no padding is needed — and requests
are batched by length. A method that conditions on any pattern ("any": the diffusion methods)
reads a full block of the run's seq_len, the positions after the continuation filled with the
protocol's pad id (EOS, or 0 without one) and kept as clean context, exactly as the protocol
fills the last block of a split. An empty context keeps nothing: the method's own start
conditions the continuation (AR's [BOS], hf-causal-lm's BOS), where lm-eval's ``hf`` model
feeds the tokenizer's BOS as a text token.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import Field, PositiveInt, ValidationError, field_validator

from bench.config import MAX_BATCH, MAX_T_SAMPLES, Seed, Strict
from bench.errors import UserError


class ScorerSettings(Strict):
    """How a run answers lm-eval's requests (``tdbench lm-eval``'s options; lm-eval's
    ``--model_args`` with ``run``)."""

    K: int = Field(8, ge=2, le=MAX_T_SAMPLES, description="time draws per loglikelihood request of a bound method: "
                                                           "two replicates of K/2 strata (even, ≥ 2)")
    seed: Seed = Field(0, description="seed of the time draws and of the sampler")
    batch_size: Optional[PositiveInt] = Field(None, le=MAX_BATCH, description="sequences per forward (default: the "
                                                                              "run's eval.batch_size)")
    steps: Optional[PositiveInt] = Field(None, le=1_000_000,
                                         description="generate_until: the sampler's step budget (default: the "
                                                     "run's largest eval.sample_steps)")
    device: Optional[str] = Field(None, min_length=1, max_length=64,
                                  description="torch device (default: cuda when visible, else cpu)")

    @field_validator("K")
    @classmethod
    def _even(cls, v):
        if v % 2:
            raise ValueError(f"{v}: must be even (two replicates of K/2 strata give each request's Monte-Carlo "
                             f"standard error)")
        return v


class LMEvalArgs(ScorerSettings):
    """lm-eval's ``--model_args`` of the ``tdbench`` model: ``run=DIR`` and the settings above."""

    run: str = Field(min_length=1, max_length=4096, description="a complete tdbench run directory")


def parse_args(given: dict) -> LMEvalArgs:
    """The model args, or a one-line UserError naming the bad one."""
    from bench.config_io import first_error

    try:
        return LMEvalArgs(**given)
    except ValidationError as e:
        raise UserError(f"model_args: {first_error(e)}") from None


def layout(context: list[int], continuation: list[int], L: int, bos: int, pad: int,
           fill: bool) -> tuple[list[int], list[bool]]:
    """(ids, keep) of one conditional request (module docstring): ``[pad]·bos context
    continuation``, the context cut from the left to fit L, kept; the continuation not kept;
    with ``fill`` (a method that conditions on any pattern) the rest of the L positions
    ``pad``, kept. UserError when the continuation alone does not fit."""
    cap = L - bos
    if len(continuation) > cap:
        raise UserError(f"continuation of {len(continuation)} tokens does not fit in the run's block "
                        f"(seq_len {L}{', less its BOS' if bos else ''})")
    context = list(context)[max(0, len(context) + len(continuation) - cap):]
    ids = [pad] * bos + context + list(continuation)
    keep = [True] * (bos + len(context)) + [False] * len(continuation)
    if fill:
        ids += [pad] * (L - len(ids))
        keep += [True] * (L - len(keep))
    return ids, keep


def stop_at(text: str, stops: list[str]) -> str:
    """``text`` up to the earliest occurrence of any of the ``stops`` strings (empty ones
    ignored): the longest prefix that holds none of them whole, lm-eval's ``until``."""
    ends = [text.find(s) for s in stops if s and s in text]
    return text[:min(ends)] if ends else text


class Scorer:
    """A complete run's final model (bench.samples.load_final_method) answering requests on the
    run's token ids; see the module docstring for what each answer is."""

    def __init__(self, args: LMEvalArgs, max_batch_size: int | None = None):
        import torch

        from bench.data.tokenizers import IdentityTokenizer
        from bench.samples import load_final_method

        self.args = args
        if not (Path(args.run) / "result.json").is_file():
            raise UserError(f"run: {args.run}: not a run directory (no result.json)")
        method, spec = load_final_method(Path(args.run))
        self.spec, self.tokenizer = spec, method.context.tokenizer
        if isinstance(self.tokenizer, IdentityTokenizer):
            raise UserError(f"run: {args.run} reads token ids of a synthetic source (tokenizer "
                            f"{self.tokenizer.key}), not text; lm-eval's tasks are text")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.method = method.to(device).eval()
        except (RuntimeError, ValueError) as e:
            raise UserError(f"device: {device}: {str(e).splitlines()[0][:200]}") from None
        self.device = device
        self.L = spec.data.seq_len
        self.protocol = spec.protocol().model_copy(update={"t_samples": args.K, "t_sampling": "stratified"})
        self.bos = 1 if self.protocol.packing == "bos_eos_per_block" else 0
        self.pad = max(self.tokenizer.eos_id, 0)
        bs = args.batch_size or spec.eval.batch_size
        self.batch_size = min(bs, max_batch_size) if args.batch_size is None and max_batch_size else bs
        self.exact = method.likelihood == "exact"

    # --- what lm-eval asks ------------------------------------------------------------------
    def layout(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[bool]]:
        """(ids, keep) of one conditional request of this run (:func:`layout`)."""
        return layout(context, continuation, self.L, self.bos, self.pad, self.method.conditioning == "any")

    def loglikelihood(self, pairs: list[tuple[list[int], list[int]]]) -> tuple[np.ndarray, np.ndarray]:
        """(log p(continuation | context), its Monte-Carlo standard error) per (context,
        continuation) pair of token ids; the standard error is 0 for an exact method."""
        from bench.evaluate import conditional_nll
        from bench.train import seed_of

        rows = [self.layout(c, x) for c, x in pairs]
        ll, se = np.zeros(len(rows)), np.zeros(len(rows))
        by_len: dict[int, list[int]] = {}
        for i, (ids, _) in enumerate(rows):
            by_len.setdefault(len(ids), []).append(i)
        for n, idx in sorted(by_len.items()):
            tokens = np.array([rows[i][0] for i in idx], dtype=np.int64)
            keep = np.array([rows[i][1] for i in idx], dtype=bool)
            r = conditional_nll(self.method, tokens, keep, self.protocol, self.batch_size,
                                seed_of(self.args.seed, n), self.device, desc="lm-eval loglikelihood")
            ll[idx], se[idx] = -r.nll, r.se
        return ll, se

    def rolling(self, docs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(log p(document), its Monte-Carlo standard error) per document of token ids, from
        the protocol's bound over the document's blocks."""
        from bench.data.packing import pack
        from bench.evaluate import per_sequence_nll, per_sequence_se
        from bench.train import seed_of

        if self.method.likelihood == "none":
            raise UserError(f"{self.method.name}: has no likelihood (loglikelihood_rolling); its rows show —")
        toks, counted, owner = [], [], []
        for d, ids in enumerate(docs):
            t, c = pack([np.asarray(ids, dtype=np.int32)], self.L, self.protocol.packing, self.tokenizer.eos_id,
                        count_bos=False, count_eos=False)
            toks.append(t)
            counted.append(c)
            owner += [d] * len(t)
        draws, _ = per_sequence_nll(self.method, np.concatenate(toks), np.concatenate(counted), self.protocol,
                                    self.batch_size, seed_of(self.args.seed, 1), self.device,
                                    desc="lm-eval loglikelihood_rolling")
        se2 = per_sequence_se(draws, self.protocol.t_sampling, self.exact) ** 2
        owner = np.asarray(owner)
        ll = -np.bincount(owner, weights=draws.mean(1), minlength=len(docs))
        return ll, np.sqrt(np.bincount(owner, weights=se2, minlength=len(docs)))

    def generate(self, contexts: list[list[int]], max_new: list[int]) -> list[list[int]]:
        """Per context, the ids the conditional sampler draws after it (at most ``max_new``):
        the context kept as a prefix (cut from the left to leave room for at least
        min(max_new, what the block holds) new tokens), the rest of the block generated."""
        import torch

        from bench.condition import conditional_sample
        from bench.method import Method
        from bench.train import seed_of

        m = self.method
        if type(m).sample is Method.sample:
            raise UserError(f"{m.name}: has no sampler; generate_until tasks are unsupported for this row")
        steps = (self.args.steps or max(self.spec.eval.sample_steps)) if m.sampler_steps else None
        out: list[list[int]] = []
        for b, s in enumerate(range(0, len(contexts), self.batch_size)):
            given, keep, starts = [], [], []
            for ctx, k in zip(contexts[s:s + self.batch_size], max_new[s:s + self.batch_size]):
                room = max(1, min(k, self.L - self.bos - 1))
                prefix = [self.pad] * self.bos + list(ctx)[max(0, len(ctx) - (self.L - self.bos - room)):]
                given.append(prefix + [0] * (self.L - len(prefix)))
                keep.append([True] * len(prefix) + [False] * (self.L - len(prefix)))
                starts.append(len(prefix))
            g = torch.Generator(device=m.device).manual_seed(seed_of(self.args.seed, b))
            with torch.no_grad():
                x = conditional_sample(m, len(given), steps, g, torch.tensor(given), torch.tensor(keep)).cpu()
            out += [x[i, a:a + k].tolist() for i, (a, k) in enumerate(zip(starts, max_new[s:s + self.batch_size]))]
        return out

    def info(self) -> dict:
        """What the results JSON records of the model (lm-eval's ``config``)."""
        s = self.spec
        return {"run": str(self.args.run), "run_id": s.run_id, "method": s.method, "label": s.label,
                "likelihood": self.method.likelihood, "conditioning": self.method.conditioning,
                "seq_len": self.L, "packing": self.protocol.packing, "tokenizer": self.protocol.tokenizer,
                "K": None if self.exact else self.args.K, "t_sampling": "stratified", "t_min": self.protocol.t_min,
                "seed": self.args.seed, "batch_size": self.batch_size, "device": self.device}
