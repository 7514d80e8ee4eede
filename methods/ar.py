"""Autoregressive baseline: the matching-size "GPT-2" on the shared backbone.

The same DiT blocks with causal attention and t ≡ 0 (MDLM's ``small-ar``). Every counted
token is predicted, including the first of a block: the input is [BOS] x_0 … x_{L−2}
(BOS = the extra id V) and the targets are x_0 … x_{L−1}, so AR and diffusion rows score
exactly the same tokens. −log p(x) = Σ_i −log p_θ(x_i | x_<i) is exact: no t, no bound.

Sampling is ancestral, one token per network call (NFE = L, whatever the step budget); with
the backbone's KV cache (default) each call reads only the new token, not the whole prefix.
Conditioning is on a prefix only (a prompt): the model's exact conditional, the prompt read in
one call; its conditional NLL (bench.evaluate.conditional_nll) is exact too.
"""
from __future__ import annotations

import torch

from bench.backbone import KVCache
from bench.condition import condition
from bench.method import Method, Params, gumbel_argmax
from bench.registry import register


class ARParams(Params):
    float64_sampling: bool = True  # Gumbel in float64 (float32 lowers gen. perplexity)


@register("ar")
class AutoRegressive(Method):
    Params = ARParams
    sampler_steps = False
    likelihood = "exact"
    time = "none"
    causal = True
    display = "GPT-2"
    conditioning = "prefix"

    def nll(self, x0, counted, u=None):
        """Σ_i −log p_θ(x_i | x_<i) over counted tokens, through the backbone's fused head +
        cross-entropy (bench/backbone.py: the logits are never materialised as log-probs)."""
        bos = torch.full_like(x0[:, :1], self.V)
        nll_tok = self.net(torch.cat([bos, x0[:, :-1]], dim=1), targets=x0)
        return (nll_tok * counted).sum(1)

    @torch.no_grad()
    def sample(self, n, steps=None, generator=None, cache: bool = True, *, given=None, keep=None):
        """Ancestral sampling, one token per network call (``steps`` is ignored). ``cache``
        feeds only the newest token to the network (KV cache) instead of the whole prefix.

        ``given``/``keep`` (bench.condition): a prefix only (``conditioning = "prefix"``; any
        other pattern is refused there), of k_i tokens in row i: x ~ p_θ(x_{≥k_i} | x_{<k_i}),
        exactly the model's conditional. The k = min_i k_i leading tokens every row keeps go to
        the network in one call (the prompt's prefill, KV-cached), then one call per position
        as before, a row's kept tokens past k fed in place of its draws: L − k calls."""
        cond = condition(self, n, given, keep)
        k = int(cond.prefix_lengths().min()) if cond is not None else 0
        if k == self.L:
            return cond.given.clone()
        x = torch.full((n, 1), self.V, dtype=torch.long, device=self.device)
        if k:
            x = torch.cat([x, cond.given[:, :k]], dim=1)
        kv = KVCache(len(self.net.blocks)) if cache else None
        fed = 0                                     # tokens of x the KV cache holds
        for i in range(k, self.L):
            logits = self.net(x[:, fed:], cache=kv)[:, -1] if cache else self.net(x)[:, -1]
            fed = x.shape[1]
            new = gumbel_argmax(logits, generator, self.p.float64_sampling)
            if cond is not None:
                new = torch.where(cond.keep[:, i], cond.given[:, i], new)
            x = torch.cat([x, new[:, None]], dim=1)
        return x[:, 1:]
