"""BD3-LM: block discrete denoising diffusion (Arriola et al., ICLR 2025, "Block Diffusion").

The L tokens are B = L/L′ blocks x^1 … x^B of L′ tokens (``block_size``). The likelihood is
autoregressive over blocks and a masked diffusion model inside each (§3.1):

    log p_θ(x) = Σ_b log p_θ(x^b | x^{<b}),
    −log p_θ(x) ≤ L_BD(x; θ) = Σ_b E_{t~U[0,1]} E_q [ (1/t) Σ_{ℓ : x_t^{b,ℓ} = MASK} −log p_θ(x^{b,ℓ} | x_t^b, x^{<b}) ]

— MDLM's NELBO (MDLM eq. 10; SUBS, log-linear α_t = 1 − t, methods/_masked.py) per block,
conditioned on the clean previous blocks. As in the paper's recipe the denoiser is not
conditioned on t (``time_conditioning: False`` there): the number of masks carries it.

Vectorised training (§3.2): one pass over the concatenation [x_t, x_0] (2L tokens, both
halves at rotary positions 0 … L−1) under the block-diff attention mask
M = [[M_BD, M_OBC], [0, M_BC]]: x_t block b sees its own block (block-diagonal M_BD) and the
clean blocks < b (offset block-causal M_OBC); x_0 block b sees the clean blocks ≤ b
(block-causal M_BC), so its keys are exactly those a KV cache holds when block b+1 is drawn.
Every block's −log p_θ(x^{b,ℓ} | x_t^b, x^{<b}) comes out of the one pass (the head only over x_t).

Evaluation (``nll``): the harness's one draw u per sequence becomes one per block,
u_b = (u + b/B) mod 1 (a rotation of the block grid: each u_b is U(0, 1), so each block's term is
unbiased, and a stratified u stratifies every block). ``estimator: beta`` (default) is MDLM's
bounded-weight form per block — m_b = ⌈u_b·n_b⌉ of the block's n_b counted tokens masked as a
uniform subset, weight n_b/m_b (docs/methods.md#mdlm; the denoiser ignores t, so no t is drawn);
``time`` is t_b = u_b with weight 1/t_b. L′ = 1: the block's one token is always masked
(m_b = 1, weight 1), so the estimate is Σ_i −log p_θ(x_i | x_<i), an exact AR likelihood; L′ = L
is MDLM. Training (``loss``) is the time form; ``clip: [β, ω]`` draws the training mask rates from
U[β, ω] instead (§5.2, clipped schedules: a biased, lower-variance estimator of the same
objective), and ``clip_search`` picks [β, ω] from the data (§5): every ``clip_search_every``
training batches, the window of least variance of the per-block loss on that batch among windows
of the given widths (step ``clip_search_delta``) and [0, 1]. The evaluated bound is always the
full one.

Sampling (§3.2, Algorithm 2): block by block, MDLM's ancestral sampler inside the block (each
[MASK] revealed w.p. (t − s)/t from p_θ(x_0 | x_t^b, x^{<b})), the clean blocks through the
backbone's KV cache (each fed once, together with the next block's first denoising call). The
step budget is spread over the blocks; a call whose input did not change since the last one is
skipped (exact: the denoiser ignores t). ``length`` beyond L continues block by block in a
sliding window of the last L − L′ clean tokens, re-encoded from position 0 when it slides (the
network never sees more than L tokens or a position ≥ L), so the cached sampler gives exactly the
uncached one's tokens.

Derivation and choices: docs/methods.md#bd3-lm.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from bench.backbone import KVCache
from bench.condition import condition
from bench.errors import UserError
from bench.method import Method, Params
from bench.registry import register
from methods._masked import block_ancestral, block_steps, block_times, elbo_weight, mask_tokens, nelbo_blocks

PPM = 1_000_000   # the searched clip window is held in an int64 buffer in millionths (EMA leaves it alone)


# ----------------------------------------------------------------------------- attention masks
def block_diff_mask(L: int, size: int, device=None) -> torch.Tensor:
    """(2L, 2L) bool over [x_t, x_0], True where a query may attend a key (§3.2):
    [[M_BD, M_OBC], [0, M_BC]] — x_t block b: its own block of x_t and x_0 blocks < b; x_0 block
    b: x_0 blocks ≤ b."""
    blk = torch.arange(L, device=device) // size
    q, k = blk[:, None], blk[None, :]
    noisy = torch.cat([q == k, k < q], 1)
    clean = torch.cat([torch.zeros(L, L, dtype=torch.bool, device=device), k <= q], 1)
    return torch.cat([noisy, clean], 0)


def prefix_mask(P: int, n_clean: int, size: int, device=None) -> torch.Tensor:
    """(n_clean + size, P + n_clean + size) bool for a sampling call fed [new clean blocks, x_t
    block] after P cached clean tokens: the new clean tokens see the cache and the new clean
    blocks up to their own (block-causal, as M_BC), not x_t; the x_t block sees everything."""
    blk = torch.arange(n_clean, device=device) // size
    clean = torch.cat([torch.ones(n_clean, P, dtype=torch.bool, device=device), blk[:, None] >= blk[None, :],
                       torch.zeros(n_clean, size, dtype=torch.bool, device=device)], 1)
    return torch.cat([clean, torch.ones(size, P + n_clean + size, dtype=torch.bool, device=device)], 0)


def clip_grid(widths, delta: float) -> list[tuple[float, float]]:
    """[0, 1] and every window [β, β + w] inside it, β = 0, δ, 2δ, … (the search's candidates)."""
    out = [(0.0, 1.0)]
    for w in widths:
        k = 0
        while k * delta + w <= 1 + 1e-9:
            out.append((round(k * delta, 9), min(1.0, round(k * delta + w, 9))))
            k += 1
    return list(dict.fromkeys(out))


class BD3LMParams(Params):
    block_size: int = Field(4, ge=1, description="L′: tokens per block (divides seq_len); 1 = AR, seq_len = MDLM")
    estimator: Literal["beta", "time"] = Field(
        "beta", description="eval form per block: beta (m = ⌈u·n⌉ masked, weight n/m) or time (t = u, weight 1/t)")
    clip: tuple[float, float] = Field((0.0, 1.0), description="[β, ω]: training mask rates ~ U[β, ω] (§5.2)")
    clip_search: tuple[float, ...] = Field(
        (), description="window widths ω − β to search for the least-variance [β, ω] (empty: off)")
    clip_search_every: int = Field(100, gt=0, description="training batches between clip searches")
    clip_search_delta: float = Field(0.05, gt=0, le=0.5, description="step of β in the clip search")
    float64_sampling: bool = True  # Gumbel in float64 (float32 lowers gen. perplexity)

    @model_validator(mode="after")
    def _windows(self):
        lo, hi = self.clip
        if not 0 <= lo <= hi <= 1 or hi == 0:
            raise ValueError(f"clip: [{lo}, {hi}] must satisfy 0 ≤ β ≤ ω ≤ 1 and ω > 0")
        if any(not 0 < w <= 1 for w in self.clip_search):
            raise ValueError(f"clip_search: widths {list(self.clip_search)} must lie in (0, 1]")
        return self


@register("bd3lm")
class BD3LM(Method):
    Params = BD3LMParams
    likelihood = "bound"
    conditioning = "any"
    time = "continuous"

    def __init__(self, params, backbone, vocab_size, seq_len, context=None):
        if seq_len % params.block_size:
            raise UserError(f"block_size: {params.block_size} does not divide seq_len {seq_len}")
        super().__init__(params, backbone, vocab_size, seq_len, context)
        self._masks: dict = {}
        if self.p.clip_search:
            self.register_buffer("clip_window", torch.tensor([round(c * PPM) for c in self.p.clip]))
            self.register_buffer("clip_calls", torch.zeros(1, dtype=torch.long))

    @classmethod
    def default_label(cls, params) -> str:
        return f"BD3-LM (L′={params.block_size})"

    @classmethod
    def check_compatible(cls, params, data, where):
        size = cls.Params(**params).block_size
        if data.seq_len % size:
            raise UserError(f"{where}.block_size: {size} does not divide data.seq_len {data.seq_len}")

    def info(self) -> dict:
        return {**super().info(), "block_size": self.p.block_size, "clip": list(self.window())}

    def sampler_info(self, steps):
        if steps is None:
            return {"block_size": self.p.block_size}
        plan = block_steps(steps, self.L // self.p.block_size)
        return {"block_size": self.p.block_size, "steps_per_block": [min(plan), max(plan)]}

    # --- the denoiser over all blocks at once ----------------------------------------------
    def _train_inputs(self, device):
        key = ("train", device)
        if key not in self._masks:
            self._masks[key] = (block_diff_mask(self.L, self.p.block_size, device),
                                torch.arange(self.L, device=device).repeat(2))
        return self._masks[key]

    def block_ce(self, x_t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """(B, L): −log p_θ(x_0^{b,ℓ} | x_t^b, x_0^{<b}) at every position, from one pass over
        [x_t, x_0] under ``block_diff_mask`` (the head and its fused cross-entropy over x_t only)."""
        mask, pos = self._train_inputs(x0.device)
        h = self.net(torch.cat([x_t, x0], 1), attn_mask=mask, positions=pos, return_hidden=True)
        return self.net.head(h[:, :self.L], targets=x0)

    def block_times(self, u: torch.Tensor) -> torch.Tensor:
        """(B, L/L′): u_b = (u + b/B) mod 1 per block (methods._masked.block_times)."""
        return block_times(u, self.L // self.p.block_size)

    def per_token(self, v: torch.Tensor) -> torch.Tensor:
        return v.repeat_interleave(self.p.block_size, dim=1)

    # --- likelihood and training -----------------------------------------------------------
    def nll(self, x0, counted, u):
        """Σ_b of one-draw estimates of block b's NELBO (module docstring; methods._masked.nelbo_blocks), (B,) nats."""
        return nelbo_blocks(x0, counted, u, self.block_ce, self.mask_id, self.p.block_size, self.p.estimator)

    def window(self) -> tuple[float, float]:
        """The training mask-rate window [β, ω]: ``clip``, or the last searched one."""
        if not self.p.clip_search:
            return tuple(self.p.clip)
        lo, hi = self.clip_window.tolist()
        return lo / PPM, hi / PPM

    def loss(self, x0, counted, u):
        """The time form of L_BD per counted token, mask rates t_b in the clip window [β, ω]:
        Σ_b (1/t_b) Σ_{masked ℓ in b} −log p_θ(x^{b,ℓ} | x_t^b, x^{<b}) / #counted."""
        if self.p.clip_search and self.training and torch.is_grad_enabled():
            self.clip_calls += 1
            if int(self.clip_calls) % self.p.clip_search_every == 0:
                self.search_clip(x0, counted)
        lo, hi = self.window()
        t = lo + (hi - lo) * self.block_times(u)
        x_t, masked = mask_tokens(x0, counted, self.per_token(t), self.mask_id)
        ce = self.block_ce(x_t, x0)
        return (self.per_token(elbo_weight(t)) * ce * masked).sum() / counted.sum().clamp(min=1)

    @torch.no_grad()
    def search_clip(self, x0, counted) -> tuple[float, float]:
        """Set the clip window to the candidate (``clip_grid``) whose per-block training loss
        (1/t_b) Σ_{masked ℓ in b} CE / L′ has the least variance over this batch's blocks (§5.2),
        all candidates under the same draws; summed over ranks when distributed."""
        B, size = x0.shape[0], self.p.block_size
        tau = torch.rand((B, self.L // size), device=x0.device).clamp(1e-6, 1 - 1e-6)
        coins = torch.rand(x0.shape, device=x0.device)
        grid = clip_grid(self.p.clip_search, self.p.clip_search_delta)
        stats = []
        for lo, hi in grid:
            t = lo + (hi - lo) * tau
            masked = (coins < self.per_token(t)) & counted
            ce = self.block_ce(torch.where(masked, torch.full_like(x0, self.mask_id), x0), x0)
            ell = elbo_weight(t) * (ce * masked).view(B, -1, size).sum(-1) / size
            stats.append(torch.stack([ell.sum(), ell.square().sum(), torch.tensor(ell.numel(), device=x0.device)]))
        S = torch.stack(stats).double()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(S)
        var = S[:, 1] / S[:, 2] - (S[:, 0] / S[:, 2]) ** 2
        best = grid[int(var.argmin())]
        self.clip_window.copy_(torch.tensor([round(c * PPM) for c in best]))
        return best

    # --- sampling --------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n, steps=64, generator=None, length: int | None = None, kv_cache: bool = True,
               reuse: bool = True, *, given=None, keep=None):
        """``length`` tokens (default L), block by block (module docstring): ``steps`` network
        calls spread over the blocks (``block_steps``). ``kv_cache``: the clean blocks go
        through the backbone's KV cache, each fed once; without it every call feeds the whole
        clean context again (the same tokens). ``reuse``: skip a call whose input is unchanged.
        ``given``/``keep`` (bench.condition, over the first L tokens): a block's kept positions
        start unmasked as the given ids, as MDLM's do, and the reverse process never changes
        them — inside a block the model's any-order conditional; across blocks, later kept
        tokens are not seen by earlier blocks (block-causal: a prompt is exact, a suffix is
        only imposed when its block comes)."""
        length = self.L if length is None else int(length)
        if length < 1:
            raise ValueError(f"length {length}: at least one token")
        cond = condition(self, n, given, keep)
        if cond is not None and length != self.L:
            raise UserError(f"length: {length}; a conditional draw covers the block length L = {self.L}")
        x = torch.empty((n, 0), dtype=torch.long, device=self.device)
        prefix = _Prefix(self, kv_cache)
        for T in block_steps(steps, -(-length // self.p.block_size)):
            prefix.start_block(x)
            s = slice(x.shape[1], x.shape[1] + self.p.block_size)
            fixed = None if cond is None else (cond.given[:, s], cond.keep[:, s])
            x = torch.cat([x, self._draw_block(prefix, n, T, generator, reuse, fixed)], 1)
        return x[:, :length]

    def _draw_block(self, prefix: "_Prefix", n: int, T: int, generator, reuse: bool,
                    fixed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """MDLM's ancestral sampler on one block in T steps, t = i/T → s = (i−1)/T: each [MASK]
        revealed w.p. (t − s)/t = 1/i, from p_θ(x_0 | x_t^b, x^{<b}) (Gumbel-max at the revealed
        positions only). ``fixed`` (given, keep) of this block: kept positions start unmasked."""
        x_t = torch.full((n, self.p.block_size), self.mask_id, dtype=torch.long, device=self.device)
        if fixed is not None:
            x_t = torch.where(fixed[1], fixed[0], x_t)
        return block_ancestral(prefix.logits, x_t, self.mask_id, T, generator, self.p.float64_sampling, reuse)


class _Prefix:
    """The clean blocks the next block is conditioned on, as the network sees them: at most the
    last L − L′ clean tokens (whole blocks), at rotary positions from 0. Cached: their keys and
    values live in a KV cache, each block fed once (with the next block's first call), the cache
    rebuilt from the window when it slides; uncached: the window is fed again at every call."""

    def __init__(self, method: BD3LM, cached: bool):
        self.m, self.cached = method, cached
        self.size, self.W = method.p.block_size, method.L - method.p.block_size
        self.kv, self.pending, self.window, self.stored = None, None, None, 0

    def start_block(self, x: torch.Tensor) -> None:
        start = max(0, x.shape[1] - self.W)
        self.window = x[:, start:]
        if not self.cached:
            return
        if self.kv is None or self.kv.length + (x.shape[1] - self.stored) + self.size > self.m.L:
            self.kv, self.stored = KVCache(len(self.m.net.blocks)), start      # (re)build from the window
        self.pending, self.stored = x[:, self.stored:], x.shape[1]

    def logits(self, x_t: torch.Tensor, first: bool) -> torch.Tensor:
        """(n, L′, V) logits of p_θ(x_0 | x_t^b, clean context) — one network call."""
        net, size = self.m.net, self.size
        if self.cached and not first:          # a later step of the block: the cache as it is
            h = net(x_t, cache=self.kv, store=0, return_hidden=True)
        else:                                  # [clean blocks not in the cache, x_t block]
            clean = self.pending if self.cached else self.window
            k, P = clean.shape[1], self.kv.length if self.cached else 0
            h = net(torch.cat([clean, x_t], 1), cache=self.kv if self.cached else None,
                    attn_mask=prefix_mask(P, k, size, x_t.device) if k else None,
                    store=k if self.cached else None, return_hidden=True)
        return net.head(h[:, -size:])
