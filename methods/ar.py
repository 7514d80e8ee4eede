"""Autoregressive baseline: the matching-size "GPT-2" on the shared backbone.

The same DiT blocks with causal attention and t ≡ 0 (MDLM's ``small-ar``). Every counted
token is predicted, including the first of a block: the input is [BOS] x_0 … x_{L−2}
(BOS = the extra id V) and the targets are x_0 … x_{L−1}, so AR and diffusion rows score
exactly the same tokens. −log p(x) = Σ_i −log p_θ(x_i | x_<i) is exact: no t, no bound.

Sampling is ancestral, one token per network call (NFE = L, whatever the step budget); with
the backbone's KV cache (default) each call reads only the new token, not the whole prefix.
"""
from __future__ import annotations

import torch

from bench.backbone import KVCache
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

    def nll(self, x0, counted, u=None):
        """Σ_i −log p_θ(x_i | x_<i) over counted tokens, through the backbone's fused head +
        cross-entropy (bench/backbone.py: the logits are never materialised as log-probs)."""
        bos = torch.full_like(x0[:, :1], self.V)
        nll_tok = self.net(torch.cat([bos, x0[:, :-1]], dim=1), targets=x0)
        return (nll_tok * counted).sum(1)

    @torch.no_grad()
    def sample(self, n, steps=None, generator=None, cache: bool = True):
        """Ancestral sampling, one token per network call (``steps`` is ignored). ``cache``
        feeds only the newest token to the network (KV cache) instead of the whole prefix."""
        x = torch.full((n, 1), self.V, dtype=torch.long, device=self.device)
        kv = KVCache(len(self.net.blocks)) if cache else None
        for _ in range(self.L):
            logits = self.net(x[:, -1:], cache=kv)[:, -1] if cache else self.net(x)[:, -1]
            x = torch.cat([x, gumbel_argmax(logits, generator, self.p.float64_sampling)[:, None]], dim=1)
        return x[:, 1:]
