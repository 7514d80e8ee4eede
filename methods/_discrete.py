"""Math shared by the discrete-diffusion family (methods/d3pm.py, methods/sedd.py).

- The two corruption graphs as small objects, ``ABSORB`` and ``UNIFORM`` (``GRAPHS[name]``).
  Both corrupt a token independently, keeping it with probability α (D3PM's ᾱ_t, SEDD's e^{−σ}):

    absorb:   x_t = x_0 w.p. α, else [MASK] (id V);  p_base = (1−α_end)·δ_[MASK] + α_end·Uniform
    uniform:  x_t = x_0 w.p. α, else a uniform token; p_base = Uniform

  and each knows its forward sample, the positions a denoising loss scores, the prior term
  KL(q(x_end|x_0) ‖ p_base) per token, the reconstruction term of the fixed decoder
  p_dec(x_0|x) ∝ q(x|x_0) (absorb: (1−α_0)·log|V|; uniform: the entropy of q(·|x_0)), and a
  sample of p_base.
- The fused, chunked reductions over the vocabulary with hand-written backward passes
  (``softmax_stats`` for D3PM's KLs, ``logit_stats`` for SEDD's score entropy and CSM): besides
  the input only its gradient is ever a full (B, L, V) tensor.
- ``safe_log``: log clamped at the smallest normal of its dtype.
- ``clamp``: conditioning (bench/condition.py) in the samplers of both graphs — absorbing: the
  kept positions start unmasked and stay; uniform: they are redrawn from q(x_s | given) after
  every step (the replacement method).
"""
from __future__ import annotations

import math

import torch


def safe_log(x):
    return torch.log(x.clamp_min(1e-300 if x.dtype == torch.float64 else 1e-37))


# ----------------------------------------------------------------------------- graphs
class Graph:
    """A per-token corruption graph; see the module docstring."""

    name: str = "?"
    absorbing: bool = False

    def corrupt(self, x0, counted, keep, V: int, generator=None):
        """x_t: each counted token kept w.p. ``keep`` (B,), else replaced; others stay clean."""
        hit = (torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)
               >= keep.to(x0.device)[:, None]) & counted
        return torch.where(hit, self._replacement(x0, V, generator), x0)

    def _replacement(self, x0, V, generator):
        raise NotImplementedError

    def scored(self, x_t, counted, mask_id: int):
        """Positions a denoising cross-entropy scores."""
        raise NotImplementedError

    def prior_kl(self, a_end: torch.Tensor, V: int) -> torch.Tensor:
        """KL(q(x_end|x_0) ‖ p_base) per token (nats, float64); a_end = α at the last time."""
        raise NotImplementedError

    def recon(self, a0: torch.Tensor, V: int) -> torch.Tensor:
        """E_{x|x_0}[−log p_dec(x_0|x)] per token at the first time, a0 = α there (float64)."""
        raise NotImplementedError

    def prior_sample(self, n: int, L: int, a_end: float, V: int, mask_id: int, generator, device):
        """(n, L) draws from p_base."""
        raise NotImplementedError

    def __repr__(self):
        return self.name.upper()


class Absorb(Graph):
    name, absorbing = "absorb", True

    def _replacement(self, x0, V, generator):
        return torch.full_like(x0, V)

    def scored(self, x_t, counted, mask_id):
        return (x_t == mask_id) & counted

    def prior_kl(self, a_end, V):
        return a_end.double() * math.log(V)

    def recon(self, a0, V):
        return (1 - a0.double()) * math.log(V)

    def prior_sample(self, n, L, a_end, V, mask_id, generator, device):
        rnd = torch.randint(0, V, (n, L), generator=generator, device=device)
        keep = torch.rand((n, L), generator=generator, device=device, dtype=torch.float64) < a_end
        return torch.where(keep, rnd, torch.full_like(rnd, mask_id))


class Uniform(Graph):
    name = "uniform"

    def _replacement(self, x0, V, generator):
        return torch.randint(0, V, x0.shape, generator=generator, device=x0.device)

    def scored(self, x_t, counted, mask_id):
        return counted  # every counted token is a noised (scored) one

    def prior_kl(self, a_end, V):
        # q_hit = a + (1−a)/V, q_other = (1−a)/V, p = 1/V
        a = a_end.double()
        return torch.xlogy(a + (1 - a) / V, 1 + a * (V - 1)) + \
            (V - 1) * (1 - a) / V * torch.log1p(-a.clamp(max=1 - 1e-16))

    def recon(self, a0, V):
        a = a0.double()
        b = (1 - a) / V
        return -torch.xlogy(a + b, a + b) - (V - 1) * torch.xlogy(b, b)

    def prior_sample(self, n, L, a_end, V, mask_id, generator, device):
        return torch.randint(0, V, (n, L), generator=generator, device=device)


ABSORB, UNIFORM = Absorb(), Uniform()
GRAPHS: dict[str, Graph] = {"absorb": ABSORB, "uniform": UNIFORM}


def clamp(graph: Graph, x: torch.Tensor, cond, alpha: float, V: int, generator=None) -> torch.Tensor:
    """x (n, L) at a time whose keep probability is ``alpha`` (ᾱ_s, e^{−σ(s)}), with the kept
    positions of ``cond`` (a bench.condition.Condition) conditioned on:

    - absorb: set to the given ids. The reverse process never changes an unmasked token, so
      called on the prior sample they stay given to the end, and every step's p_θ(x_0 | x_t)
      sees them: the any-order conditional of the model (MDLM, LLaDA and SEDD infill this way).
    - uniform: redrawn from the forward process q(x_s | x_0 = given) — x_s = given w.p. α, else a
      uniform token — the "replacement" method of Song et al. 2021 (score SDE, App. I.2) in the
      discrete state space, RePaint's known-region step (Lugmayr et al. 2022, eq. 8): the
      network sees the given tokens at the noise level it was trained on, and at α = 1 (the last
      step) they are the given ids. An approximation of the conditional: the unkept positions
      are never corrected for what the kept ones became."""
    if graph.absorbing:
        return cond.fix(x)
    a = torch.full((x.shape[0],), float(alpha), dtype=torch.float64, device=x.device)
    return torch.where(cond.keep, graph.corrupt(cond.given, cond.keep, a, V, generator), x)


# ----------------------------------------------------------------------------- fused reductions
CHUNK = 1 << 22  # elements per chunk of rows in the fused reductions (16 MiB of float32)


def _rows(f):
    """(f as (N, V), chunk slices over N): the fused reductions work on a few rows at a time so
    that, besides f, only its gradient is ever a full (B, L, V) tensor."""
    V = f.shape[-1]
    F2 = f.reshape(-1, V)
    step = max(1, CHUNK // V)
    return F2, [slice(s, s + step) for s in range(0, F2.shape[0], step)]


def _flat(i):
    return None if i is None else i.reshape(-1, 1)


class _LogitStats(torch.autograd.Function):
    """Fused reductions of f (..., V) over its last axis, for each k in ``ks``:

        lse_k = log Σ_{y ∉ excluded} e^{k·f_y}   (excluded: the entries at e1 and e2, if given)
        tot   = Σ_y f_y,     f0 = f[i0],     f1 = f[i1]

    computed over chunks of rows; backward assembles Σ_k k·g_k·softmax_excl(k f) + g_tot +
    g0·e_{i0} + g1·e_{i1} chunk by chunk into the one full-size gradient. Saves only f."""

    @staticmethod
    def _shifted_exp(fc, k, e1, e2):
        kf = fc * k
        if e1 is not None:
            kf.scatter_(-1, e1, float("-inf")).scatter_(-1, e2, float("-inf"))
        m = torch.nan_to_num(kf.amax(-1, keepdim=True), neginf=0.0)
        return kf.sub_(m).exp_(), m[:, 0]

    @staticmethod
    def forward(ctx, f, ks, i0, i1, e1, e2):
        F2, chunks = _rows(f)
        I0, I1, E1, E2 = _flat(i0), _flat(i1), _flat(e1), _flat(e2)
        lses = [F2.new_empty(F2.shape[0]) for _ in ks]
        for sl in chunks:
            for lse, k in zip(lses, ks):
                ex, m = _LogitStats._shifted_exp(F2[sl], k, None if E1 is None else E1[sl],
                                                 None if E2 is None else E2[sl])
                lse[sl] = ex.sum(-1).log_() + m
        ctx.ks = ks
        ctx.save_for_backward(f, i0, i1, e1, e2, *lses)
        shape = f.shape[:-1]
        return (*(x.view(shape) for x in lses), f.sum(-1),
                F2.gather(-1, I0)[:, 0].view(shape), F2.gather(-1, I1)[:, 0].view(shape))

    @staticmethod
    def backward(ctx, *grads):
        f, i0, i1, e1, e2, *lses = ctx.saved_tensors
        ks = ctx.ks
        g_lse, (g_tot, g0, g1) = grads[:len(ks)], grads[len(ks):]
        F2, chunks = _rows(f)
        I0, I1, E1, E2 = _flat(i0), _flat(i1), _flat(e1), _flat(e2)
        G = torch.empty_like(F2)
        g_tot, g0, g1 = g_tot.reshape(-1, 1), g0.reshape(-1, 1), g1.reshape(-1, 1)
        for sl in chunks:
            gc = G[sl]
            gc.copy_(g_tot[sl].expand_as(gc))
            for k, gl, lse in zip(ks, g_lse, lses):
                ex, m = _LogitStats._shifted_exp(F2[sl], k, None if E1 is None else E1[sl],
                                                 None if E2 is None else E2[sl])
                ls = lse[sl]
                scale = torch.where(torch.isfinite(ls), k * gl.reshape(-1)[sl] * torch.exp(m - ls),
                                    torch.zeros_like(ls))
                gc.add_(ex.mul_(scale[:, None]))
            gc.scatter_add_(-1, I0[sl], g0[sl]).scatter_add_(-1, I1[sl], g1[sl])
        return G.view(f.shape), None, None, None, None, None


def logit_stats(f, i0, i1=None, ks: tuple = (1.0,), exclude: tuple | None = None):
    """(lse_k for k in ks..., Σ_y f_y, f[i0], f[i1]) over the last axis (see _LogitStats)."""
    e1, e2 = exclude if exclude is not None else (None, None)
    return _LogitStats.apply(f, tuple(ks), i0, i0 if i1 is None else i1, e1, e2)


class _SoftmaxStats(torch.autograd.Function):
    """Fused reductions of logits z (..., V), π = softmax(z), over the last axis:

        lse = log Σ_y e^{z_y},   z0 = z[i0],   z1 = z[i1],
        mix = Σ_y log(c₁·π_y + c₂),   c₂ = α + β·π_{i1}        (only when c₁ is given)

    with per-row constants c₁ > 0, α, β (schedule-derived, no gradient). Rows are processed in
    chunks, so besides z only its gradient is ever a full (B, L, V) tensor; the backward is
    written out: with w_y = c₁π_y/M_y, M = c₁π + c₂ and γ = β·π_{i1}·Σ_y 1/M_y,
    ∂mix/∂z = w − π(Σw + γ) + γ·e_{i1}, ∂lse/∂z = π, ∂z_i/∂z = e_i."""

    @staticmethod
    def forward(ctx, z, i0, i1, c1, alpha, beta):
        Z, chunks = _rows(z)
        I0, I1 = i0.reshape(-1, 1), i1.reshape(-1, 1)
        lse = torch.cat([torch.logsumexp(Z[sl], -1) for sl in chunks])
        z0, z1 = Z.gather(-1, I0)[:, 0], Z.gather(-1, I1)[:, 0]
        mix = None
        if c1 is not None:
            lc1 = torch.log(c1.reshape(-1, 1))
            lc2 = torch.log(alpha.reshape(-1) + beta.reshape(-1) * torch.exp(z1 - lse))[:, None]
            mix = torch.cat([torch.logaddexp(Z[sl] - lse[sl, None] + lc1[sl], lc2[sl]).sum(-1)
                             for sl in chunks])
        ctx.save_for_backward(z, i0, i1, c1, alpha, beta, lse)
        shape = z.shape[:-1]
        out = (lse.view(shape), z0.view(shape), z1.view(shape))
        return out + ((mix.view(shape),) if mix is not None else (torch.zeros(shape, dtype=z.dtype),))

    @staticmethod
    def backward(ctx, g_lse, g0, g1, g_mix):
        z, i0, i1, c1, alpha, beta, lse = ctx.saved_tensors
        Z, chunks = _rows(z)
        I0, I1 = i0.reshape(-1, 1), i1.reshape(-1, 1)
        g_lse, g0, g1, g_mix = (g.reshape(-1, 1) for g in (g_lse, g0, g1, g_mix))
        lse = lse[:, None]
        G = torch.empty_like(Z)
        if c1 is not None:
            lc1 = torch.log(c1.reshape(-1, 1))
            p1 = torch.exp(Z.gather(-1, I1) - lse)
            c2 = alpha.reshape(-1, 1) + beta.reshape(-1, 1) * p1
            lc2 = torch.log(c2)
        for sl in chunks:
            lp = Z[sl] - lse[sl]
            pi = lp.exp()
            gc = pi * g_lse[sl]
            if c1 is not None:
                u = lp + lc1[sl] - lc2[sl]
                w = torch.sigmoid(u)
                inv_M = torch.sigmoid(-u).sum(-1, keepdim=True) / c2[sl]   # Σ_y 1/M_y = Σ (1 − w_y)/c₂
                gamma = torch.where(c2[sl] > 0, beta.reshape(-1, 1)[sl] * p1[sl] * inv_M, torch.zeros_like(inv_M))
                gc += g_mix[sl] * (w - pi * (w.sum(-1, keepdim=True) + gamma))
                gc.scatter_add_(-1, I1[sl], g_mix[sl] * gamma)
            gc.scatter_add_(-1, I0[sl], g0[sl]).scatter_add_(-1, I1[sl], g1[sl])
            G[sl] = gc
        return G.view(z.shape), None, None, None, None, None


def softmax_stats(z, i0, i1=None, mix: tuple | None = None):
    """(lse, z[i0], z[i1], Σ_y log(c₁π_y + α + β·π_{i1})) for mix = (c₁, α, β); see _SoftmaxStats."""
    c1, alpha, beta = mix if mix is not None else (None, None, None)
    return _SoftmaxStats.apply(z, i0, i0 if i1 is None else i1, c1, alpha, beta)
