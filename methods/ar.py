"""Autoregressive baseline: the matching-size "GPT-2" on the shared backbone.

The same DiT blocks with causal attention and t ≡ 0 (MDLM's ``small-ar``). Every counted
token is predicted, including the first of a block: the input is [BOS] x_0 … x_{L−2}
(BOS = the extra id V) and the targets are x_0 … x_{L−1}, so AR and diffusion rows score
exactly the same tokens. −log p(x) = Σ_i −log p_θ(x_i | x_<i) is exact: no t, no bound.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.method import Method, gumbel_argmax
from bench.registry import register


@register("ar")
class AutoRegressive(Method):
    likelihood = "exact"
    time = "none"
    causal = True
    display = "GPT-2"

    def _logits(self, x0: torch.Tensor) -> torch.Tensor:
        bos = torch.full_like(x0[:, :1], self.V)
        return self.net(torch.cat([bos, x0[:, :-1]], dim=1))

    def nll(self, x0, counted, u=None):
        logp = F.log_softmax(self._logits(x0).float(), dim=-1)
        nll_tok = -logp.gather(-1, x0[..., None])[..., 0]
        return (nll_tok * counted).sum(1)

    @torch.no_grad()
    def sample(self, n, steps=None, generator=None, float64=False):
        """Ancestral sampling, one token per network call (NFE = L; ``steps`` is ignored)."""
        x = torch.full((n, 1), self.V, dtype=torch.long, device=self.device)
        for _ in range(self.L):
            logits = self.net(x)[:, -1]
            x = torch.cat([x, gumbel_argmax(logits, generator, float64)[:, None]], dim=1)
        return x[:, 1:]
