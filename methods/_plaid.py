"""PLAID's parameterisation (Gulrajani & Hashimoto 2023; reference code igul222/plaid): the pieces
of its network's input and output that are not the shared Gaussian machinery (methods/_gaussian.py).
Each cites the reference line it follows; methods/continuous.py's ``PLAID`` puts them together,
and every one but the float64 arithmetic is an option of ``PLAIDParams`` (docs/methods.md#plaid).

- :class:`UnitEmbedding`: E with rows of unit length, E_v = M_v / (‖M_v‖ + 10⁻⁸)
  (lib/models.py:91–98, ``EmbeddingMatrix``).
- :func:`logit_bias_scale`: the output prior. With unit rows, log N(z_t; α e_v, σ² I) =
  (α/σ²)·z_t·e_v + (a constant in v), so adding (α/σ²)·z_t·Eᵀ to the logits (lib/models.py:194–209,
  ``z_scaled_for_bias``) makes a network with zero logits the exact posterior q(v | z_t) of one
  position under a uniform token prior; the network learns the rest.
- :func:`input_scale`: the network reads z_t/√(α²/d + σ²), of unit variance per coordinate for
  unit rows (each row's d squares sum to 1), and x̃0·√d (lib/models.py:169–177).
- :func:`gamma_condition`: the network is conditioned on γ(t), not t (lib/models.py:179–183).
- :func:`biased_readout`, :func:`argmax_logits`, :func:`decoder_draw`: the logits with the bias, in fp32 outside
  autocast (the reference's logits ``addmm`` runs in fp32, lib/models.py:190–209), through the
  backbone's fused head; and their argmax in row chunks (no (n, L, V) buffer).
- :func:`sample_to_zero`: the ancestral / DDIM chain from t = 1 down to t = 0 in the dtype of
  z (float64 for PLAID; sample.py:44–47, 87, 103–174), whose z_0 is decoded by the argmax of
  the logits at t = 0 (sample.py:176–183).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from methods import _vlb
from methods._gaussian import Replacement, bcast

# The backbone embeds 1000·c with frequencies 1 … 10⁻⁴ (bench.backbone.timestep_embedding);
# c = γ·e⁵/1000 puts its highest frequency at e⁵ per unit of γ, the highest of PLAID's Fourier
# features exp(linspace(−5, 5))·γ (lib/models.py:179–181).
GAMMA_TIME = math.exp(5.0) / 1000.0
ARGMAX_BYTES = 64 << 20      # argmax_logits: fp32 logits of at most 64 MiB at a time


class UnitEmbedding(nn.Module):
    """Token embeddings with rows of unit length: ``weight`` = M / (‖M_v‖ + 10⁻⁸) row by row,
    M the trained matrix, initialised N(0, 1) and normalised (lib/models.py:91–98). A drop-in
    for nn.Embedding where the caller reads ``weight`` and calls the module on ids."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        m = torch.randn(vocab_size, dim)
        self.matrix = nn.Parameter(m / m.norm(dim=1, keepdim=True))

    @property
    def weight(self) -> torch.Tensor:
        return self.matrix / (self.matrix.norm(dim=1, keepdim=True) + 1e-8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def gamma_condition(gamma: torch.Tensor) -> torch.Tensor:
    """What the backbone is given in place of t: c = γ·e⁵/1000 (``GAMMA_TIME``), an injective
    function of γ alone, so the network is the same function of (z_t, γ) whatever the schedule's
    shape in t — the form in which VDM's continuous-time loss depends on the schedule only through
    its endpoints (Kingma et al. 2021); PLAID conditions on γ (lib/models.py:179–183)."""
    return gamma * GAMMA_TIME


def input_scale(gamma: torch.Tensor, d: int) -> torch.Tensor:
    """1/√(α²/d + σ²), α² = sigmoid(−γ), σ² = sigmoid(γ): the factor that gives z_t = α e + σ ε
    unit variance per coordinate when ‖e‖ = 1 (lib/models.py:169–171)."""
    return torch.rsqrt(torch.sigmoid(-gamma) / d + torch.sigmoid(gamma))


def logit_bias_scale(gamma: torch.Tensor) -> torch.Tensor:
    """α/σ² = √sigmoid(−γ)/sigmoid(γ), the factor of z_t·Eᵀ in the logits (lib/models.py:199)."""
    return torch.sigmoid(-gamma).sqrt() / torch.sigmoid(gamma)


def network_inputs(p, z: torch.Tensor, t: torch.Tensor, gamma: torch.Tensor, x_sc: Optional[torch.Tensor]):
    """What PLAID's network reads at z_t (B, L, d), t and γ(t) (B,), x̃0 (B, L, d) or None, under
    the options of ``p`` (PLAIDParams), all fp32: (z_t·input_scale, x̃0·√d) with ``rescale_input``
    (else z_t, x̃0); the condition gamma_condition(γ) (``condition: gamma``) or t; and the logit
    bias's input (α/σ²)·z_t with ``logit_bias`` (else None)."""
    g = bcast(gamma, z)
    z_in, sc = z, x_sc
    if p.rescale_input:
        z_in, sc = z * input_scale(g, p.embed_dim), None if x_sc is None else x_sc * math.sqrt(p.embed_dim)
    side = (logit_bias_scale(g) * z).float() if p.logit_bias else None
    cond = gamma_condition(gamma) if p.condition == "gamma" else t
    return z_in.float(), None if sc is None else sc.float(), cond.float(), side


def _augmented(head: nn.Linear, h: torch.Tensor, side: Optional[torch.Tensor], E: torch.Tensor):
    """[h, side] and {weight: [W, E], bias: b} in fp32, so that [h, side]·[W, E]ᵀ + b =
    h Wᵀ + b + side·Eᵀ (the reference concatenates the same way, lib/models.py:194–209)."""
    params = {"weight": head.weight.float()}
    if head.bias is not None:
        params["bias"] = head.bias.float()
    if side is None:
        return h.float(), params
    params["weight"] = torch.cat([params["weight"], E.float()], 1)
    return torch.cat([h.float(), side.float()], -1), params


def biased_readout(head: nn.Linear, h: torch.Tensor, side: Optional[torch.Tensor], E: torch.Tensor,
                   targets: Optional[torch.Tensor] = None):
    """softmax(ℓ)·E (B, L, d), and with ``targets`` also −log softmax(ℓ)[targets] (B, L), for the
    logits ℓ = h Wᵀ + b + side·Eᵀ (``side`` = (α/σ²)·z_t, or None for no bias), through ``head``'s
    fused path (bench.backbone.Head: one (N, V) buffer) with its weight and bias swapped for the
    augmented ones, in fp32 with autocast off: the bias (α/σ²)·z·e_v reaches ~e^{−γ_0} ≈ 20 at
    PLAID's initial γ_0 = −3 and more as γ_0 falls, where bf16's 8 bits would err by ≳ 0.1 nat."""
    with torch.autocast(h.device.type, enabled=False):
        x, params = _augmented(head, h, side, E)
        return functional_call(head, params, (x,), {"targets": targets, "expect": E.float()})


@torch.no_grad()
def decoder_draw(head: nn.Linear, h: torch.Tensor, side: Optional[torch.Tensor], E: torch.Tensor,
                 generator=None) -> torch.Tensor:
    """w ~ softmax(ℓ) per position (B, L), ℓ the logits of :func:`biased_readout`: the bounded
    sampler's draw from the decoder the bound scores (_vlb.decoder_draw, in row blocks)."""
    with torch.autocast(h.device.type, enabled=False):
        x, params = _augmented(head, h, side, E)
        return _vlb.decoder_draw(x, params["weight"], params.get("bias"), generator)


@torch.no_grad()
def argmax_logits(head: nn.Linear, h: torch.Tensor, side: Optional[torch.Tensor], E: torch.Tensor) -> torch.Tensor:
    """argmax_v ℓ_v (B, L) for the logits of :func:`biased_readout`, ARGMAX_BYTES of fp32 logits
    at a time (sample.py:183 decodes by ``logits.argmax``)."""
    with torch.autocast(h.device.type, enabled=False):
        x, params = _augmented(head, h, side, E)
        W, b = params["weight"], params.get("bias")
        flat = x.reshape(-1, x.shape[-1])
        out = torch.empty(flat.shape[0], dtype=torch.long, device=x.device)
        rows = max(1, ARGMAX_BYTES // (4 * W.shape[0]))
        for s in range(0, flat.shape[0], rows):
            out[s:s + rows] = F.linear(flat[s:s + rows], W, b).argmax(-1)
        return out.view(x.shape[:-1])


@torch.no_grad()
def sample_to_zero(predict: Callable, z: torch.Tensor, gamma: Callable[[torch.Tensor], torch.Tensor], steps: int,
                   step_fn: Callable, generator=None, snap: Optional[Callable] = None,
                   self_condition: bool = False,
                   replace: Optional[Replacement] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """From z at t = 1 down to t = 0 in ``steps`` equal steps: at t_k = k/steps (k = steps … 1)
    x̂0 = predict(z, t_k, x̃0), then z ← step_fn(z, x̂0, γ(t_k), γ(t_{k−1})), all in z's dtype
    (float64 for PLAID: sample.py works in float64, "Needs float64 to work", sample.py:44–47, 87).
    ``snap`` replaces each x̂0 (clamping); with ``self_condition`` x̃0 is the previous x̂0 (None at
    the first step). Returns (z_0, the last x̂0 or None): ``steps`` calls of ``predict``, and the
    caller decodes z_0 with one more (sample.py:176–183). ``replace`` (conditioning): the kept
    positions drawn from q(z_t | e) at t = 1 and after every step (_gaussian.Replacement)."""
    B, dt = z.shape[0], z.dtype
    x_sc = None
    if replace is not None:
        z = replace(z, bcast(gamma(torch.ones(B, device=z.device, dtype=dt)).to(dt), z), generator)
    for k in range(steps, 0, -1):
        t = torch.full((B,), k / steps, device=z.device, dtype=dt)
        s = torch.full((B,), (k - 1) / steps, device=z.device, dtype=dt)
        x0_hat = predict(z, t, x_sc).to(dt)
        if snap is not None:
            x0_hat = snap(x0_hat)
        if self_condition:
            x_sc = x0_hat
        g_s = bcast(gamma(s).to(dt), z)
        z = step_fn(z, x0_hat, bcast(gamma(t).to(dt), z), g_s, generator)
        if replace is not None:
            z = replace(z, g_s, generator)
    return z, x_sc
