"""The ``tdbench`` model of lm-evaluation-harness: ``lm_eval --model tdbench --model_args
run=DIR,K=8,...`` (the model args: bench.lmeval.LMEvalArgs).

Registration. Importing this module registers the class in lm-eval's model registry
(``@register_model``): ``tdbench lm-eval`` and ``import bench.lmeval_model`` before
``lm_eval.simple_evaluate(model="tdbench", ...)`` rely on that. tdbench's package also declares
it as an ``lm_eval.models`` entry point (pyproject.toml), the plugin group through which
lm-eval releases with plugin discovery (EleutherAI/lm-evaluation-harness#4013) find it from the
bare ``lm_eval`` command; lm-eval 0.4.13 scans no entry points, so there the bare command needs
the import first (docs/running.md#lm-evaluation-harness).

Text to token ids: the run's own tokenizer; a (context, continuation) pair is split as lm-eval's
``hf`` model splits it (``TemplateLM._encode_pair``: the whole string encoded, the context's
tokens cut off its front, trailing spaces of the context moved to the continuation); an empty
context is no tokens at all (bench.lmeval's layout: the method's own start conditions it).
The numbers are bench.lmeval.Scorer's. ``is_greedy`` is reported False for every request: the
method contract exposes likelihoods and samplers, not argmax decodes, so metrics built on it
(lambada's ``acc``) do not apply to tdbench rows; perplexity and multiple-choice metrics do.

Each loglikelihood and rolling request's Monte-Carlo standard error is kept in ``mc_se``,
keyed by (task, doc_id, idx), for bench.lmeval_run's Monte-Carlo standard error of each task
metric. generate_until applies the request's stop strings (``until``) and the tokenizer's EOS
to the sampler's draw and keeps at most ``max_gen_toks`` tokens; the sampler is the method's
own (ancestral), so ``do_sample``/``temperature`` and other sampling options are not read
(a warning names them once).
"""
from __future__ import annotations

import logging

import lm_eval.models  # noqa: F401 - lm-eval's own models first: its get_model fills an *empty* registry only
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from bench.lmeval import Scorer, parse_args, stop_at

log = logging.getLogger(__name__)
GEN_KEYS = {"until", "max_gen_toks"}   # the gen_kwargs generate_until reads


def batch_arg(batch_size) -> int | None:
    """lm-eval's ``batch_size`` (int, "8", "auto", "auto:4", None) as the settings' (None: auto)."""
    if batch_size is None or (isinstance(batch_size, str) and batch_size.startswith("auto")):
        return None
    return batch_size


@register_model("tdbench")
class TdbenchLM(TemplateLM):
    """A tdbench run as an lm-eval model (module docstring)."""

    def __init__(self, run: str | None = None, batch_size=None, max_batch_size: int | None = None,
                 device: str | None = None, **model_args):
        super().__init__()
        import torch

        if device and device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("tdbench: device %s is not visible; using cpu (lm-eval's default device is cuda:0)", device)
            device = "cpu"
        given = {"run": run, "batch_size": batch_arg(batch_size), "device": device, **model_args}
        args = parse_args({k: v for k, v in given.items() if v is not None})
        self.scorer = Scorer(args, max_batch_size)
        self.args = args
        self.mc_se: dict[tuple, float] = {}
        self._warned: set[str] = set()

    # --- TemplateLM's tokenization ------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.scorer.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return list(self.scorer.tokenizer.encode_batch([string])[0])

    def tok_decode(self, ids) -> str:
        return self.scorer.tokenizer.decode(ids)

    @property
    def tokenizer_name(self) -> str:
        return self.scorer.protocol.tokenizer

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg)

    # --- the three requests -------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [(((), self.tok_encode(x)) if c == "" else self._encode_pair(c, x)) for c, x in
                 (r.args for r in requests)]
        ll, se = self.scorer.loglikelihood([(list(c), list(x)) for c, x in pairs])
        self._keep_se(requests, se)
        self._warn_once("greedy", "tdbench: is_greedy is False for every request (likelihoods, not argmax "
                                  "decodes): greedy-match metrics such as lambada's acc do not apply")
        for r, v in zip(requests, ll):
            self.cache_hook.add_partial("loglikelihood", r.args, (float(v), False))
        return [(float(v), False) for v in ll]

    def _loglikelihood_tokens(self, requests, **kwargs) -> list[tuple[float, bool]]:
        ll, _ = self.scorer.loglikelihood([(list(c), list(x)) for _, c, x in requests])
        return [(float(v), False) for v in ll]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        ll, se = self.scorer.rolling([self.tok_encode(r.args[0]) for r in requests])
        self._keep_se(requests, se)
        for r, v in zip(requests, ll):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, float(v))
        return [float(v) for v in ll]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        ctxs, caps, stops = [], [], []
        for r in requests:
            context, kw = r.args[0], dict(r.args[1] or {})
            ignored = sorted(set(kw) - GEN_KEYS)
            if ignored:
                self._warn_once("gen", f"tdbench: generate_until draws with the method's own sampler; "
                                       f"{', '.join(ignored)} not read")
            until = kw.get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
            caps.append(int(kw.get("max_gen_toks") or self.scorer.L))
            ctxs.append(self.tok_encode(context) if context else [])
        drawn = self.scorer.generate(ctxs, caps)
        out = [self.cut(ids, stop) for ids, stop in zip(drawn, stops)]
        for r, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", r.args, text)
        return out

    def cut(self, ids: list[int], stop: list[str]) -> str:
        """The text of ``ids`` up to the tokenizer's EOS and the first of the ``stop`` strings."""
        eos = self.scorer.tokenizer.eos_id
        if eos >= 0 and eos in ids:
            ids = ids[:ids.index(eos)]
        return stop_at(self.tok_decode(ids), stop)

    def _keep_se(self, requests, se) -> None:
        for r, s in zip(requests, se):
            self.mc_se[(r.task_name, r.doc_id, r.idx)] = float(s)

    def get_model_info(self) -> dict:
        return {"tdbench": self.scorer.info()}
