"""The one transformer family every method builds on.

DiT-style blocks (Peebles & Xie 2023, as in SEDD's DDiT and MDLM's DIT): pre-LayerNorm
attention with rotary position embeddings + MLP, each modulated by adaLN (shift, scale, gate)
computed from a conditioning vector c = MLP(sinusoidal(t)). Bidirectional SDPA attention for
diffusion; the same blocks with causal attention (and t ≡ 0) are the autoregressive GPT-2
baseline, so a "matching size"
comparison compares objectives, not architectures (MDLM's ``small-ar``).

Inputs: token ids (B, L) or precomputed embeddings (B, L, hidden) for continuous methods; the
conditioning scalar per sequence t (B,), a time in [0, 1] (embedded as 1000·t, DiT's range;
zeros when unused, as for the AR baseline).
Output: logits (B, L, vocab_out), or the final hidden states with ``return_hidden=True``, or
with ``targets`` (B, L) ids the per-token −log softmax(logits)[target] (B, L) through the fused
head + cross-entropy of :class:`Head` (the logits are never returned, so one (B·L, V) buffer
serves the forward and, in place, the gradient), or with ``expect`` = E (V, d) the expectation
softmax(logits)·E (B, L, d) the same way (and with both, the pair).

Continuous input (optional, for Gaussian/simplex diffusion): ``in_dim=d`` adds an input
projection ``inp: R^d → R^hidden`` applied to ``embeds`` (B, L, d); ``vocab_in=None`` then
builds no token embedding at all (no parameter DDP would see unused). With
``self_condition=True`` the forward also takes ``self_cond`` (B, L, d), the previous estimate
x̃0, and the projection reads the concatenation [z_t, x̃0] ∈ R^{2d} (Chen et al. 2022, Analog
Bits §3.2; PLAID's input layer); zeros mean "no estimate yet".

KV cache: ``forward(tokens, cache=KVCache())`` appends the new tokens' keys/values (after
rotary rotation, at positions ``cache.length …``) and attends over all cached ones, so
autoregressive sampling feeds one new token per call instead of the whole prefix. Same
arithmetic as the uncached causal pass (each query sees exactly the keys at or before its
position); tests/test_sampling.py checks cached and uncached samples are identical. On a
causal backbone the new tokens see the cache and, causally, each other; on a bidirectional one
they see the whole cache and each other (block diffusion: a block attends to every cached
clean block and to itself). ``store=k`` keeps only the first k new tokens' keys/values in the
cache (0: a query that leaves the cache as it was, e.g. a denoising step of a block that is
not final yet).

Attention mask and positions (any method): ``attn_mask`` (Lq, P + Lq) bool, True where query i
may attend key j, the keys being the P cached ones then the Lq new ones, replaces the default
pattern (SDPA with an explicit mask); ``positions`` (Lq,) gives each input token's rotary
position instead of ``P …`` (two copies of a sequence side by side can share positions, as
BD3-LM's [x_t, x_0]). The default path (no mask, no positions) is the one it always was.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.config import BackboneConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of a scalar per sequence, (B,) → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def rotary_tables(L: int, head_dim: int, device, base: float = 10000.0) -> torch.Tensor:
    """e^{i·p·θ_j}, (L, head_dim/2) complex, θ_j = base^{−2j/head_dim}: rotary position
    embeddings (Su et al. 2021, RoFormer eq. 34), as in SEDD's and MDLM's DiT — attention sees
    relative positions from the start."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    ang = torch.arange(L, device=device, dtype=torch.float32)[:, None] * inv[None]
    return torch.polar(torch.ones_like(ang), ang)


def apply_rotary(x, rope):
    """Rotate each pair (x_{2j}, x_{2j+1}) of x (B, L, …, d) by the angle of its position:
    (x_{2j} + i·x_{2j+1})·e^{i·p·θ_j}, i.e. (x_{2j} cos − x_{2j+1} sin, x_{2j} sin + x_{2j+1} cos).
    One complex multiplication on a view of x's pairs (no stacking of halves: a third of the
    cost of writing it with real ops at the smoke size); fp32 arithmetic, x's dtype out."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    r = rope.reshape(rope.shape[0], *([1] * (x.dim() - 3)), rope.shape[1])   # (L, 1…, d/2)
    return torch.view_as_real(xc * r).flatten(-2).to(x.dtype)


def modulate(x, shift, scale):
    """x · (1 + scale) + shift, per sequence (one fused pass: addcmul)."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class _HeadNLL(torch.autograd.Function):
    """nll_n = −log softmax(h_n Wᵀ + b)[y_n] per row n, holding one (N, V) buffer.

    Forward: logits = h Wᵀ + b (in fp32), the row log-normalisers lse_n = log Σ_v e^{logits_nv}
    (computed in row chunks, so no second (N, V) temporary), nll_n = lse_n − logits_{n, y_n}.
    Backward: the same buffer becomes, in place, ∂nll_n/∂logits_n = softmax(logits_n) − onehot(y_n),
    and the incoming per-row gradient g_n is folded into the (N, d)-sized operands:
    ∂h = (G W)·g, ∂W = Gᵀ (h·g), ∂b = Gᵀ g — no further (N, V) pass. The unfused path
    (log_softmax → gather, and their backward) allocates three more (N, V) buffers (log-probs, the
    zero-filled gather gradient, the log-softmax gradient) and passes over each; at the smoke
    size, (2048, 2048) floats = 16 MB apiece, that is a third of a CPU training step.
    Under CUDA autocast the matrix products run in the autocast dtype (bf16) and the softmax
    arithmetic in fp32, as the unfused path with ``.float()`` logits does. Its backward may run
    once (it consumes the buffer)."""

    CHUNK = 256   # rows per log-sum-exp chunk: (256, V) fp32 stays in cache at V of a few thousand

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, h, W, b, y):
        logits = _logits_fp32(h, W, b)
        lse = _row_lse(logits)
        nll = lse - logits.gather(-1, y[:, None])[:, 0]
        ctx.save_for_backward(h, W, logits, lse, y)
        ctx.has_bias, ctx.done = b is not None, False
        return nll

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g):
        _consume_once(ctx)
        h, W, logits, lse, y = ctx.saved_tensors
        G = logits.sub_(lse[:, None]).exp_()                          # softmax, in place
        G.scatter_add_(-1, y[:, None], torch.full_like(lse[:, None], -1.0))   # − onehot(y)
        g = g.to(G.dtype)
        Gm = G.to(h.dtype) if h.dtype != G.dtype else G               # autocast: products in bf16
        grad_h = (Gm @ W.to(h.dtype)).mul_(g[:, None].to(h.dtype)) if ctx.needs_input_grad[0] else None
        grad_W = (Gm.t() @ (h * g[:, None].to(h.dtype))).to(W.dtype) if ctx.needs_input_grad[1] else None
        grad_b = (G.t() @ g).to(W.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_h, grad_W, grad_b, None


def _logits_fp32(h, W, b):
    """h Wᵀ + b, in fp32 when autocast made it bf16/fp16 (the softmax arithmetic stays fp32)."""
    logits = F.linear(h, W, b)
    return logits.float() if logits.element_size() < 4 else logits


def _consume_once(ctx):
    if ctx.done:
        raise RuntimeError("the fused head's backward consumes its buffer: it runs once (no retain_graph)")
    ctx.done = True


def _row_lse(logits):
    lse = torch.empty(logits.shape[0], device=logits.device, dtype=logits.dtype)
    for s in range(0, logits.shape[0], _HeadNLL.CHUNK):
        lse[s:s + _HeadNLL.CHUNK] = torch.logsumexp(logits[s:s + _HeadNLL.CHUNK], dim=-1)
    return lse


class _HeadExpect(torch.autograd.Function):
    """x̂_n = softmax(h_n Wᵀ + b)·E, the expectation of the rows of E (V, d) under the head's
    token distribution (PLAID's x̂0 = Σ_v p_θ(v | z_t) e_v), and with targets y also
    nll_n = −log softmax(·)[y_n] — in one (N, V) buffer, as :class:`_HeadNLL`.

    Forward: logits, lse in row chunks, nll from the logits, then the buffer becomes P =
    softmax in place and x̂ = P E. Backward with incoming ḡ (N, d) and g (N,): ∂E = Pᵀ ḡ, and
    the buffer becomes, row chunk by row chunk in place, ∂logits = P ⊙ (ḡ Eᵀ − ⟨x̂_n, ḡ_n⟩ + g_n)
    − g_n·onehot(y_n) (softmax's Jacobian applied to ḡ Eᵀ, plus the cross-entropy's); then
    ∂h = ∂logits W, ∂W = ∂logitsᵀ h, ∂b = Σ_n ∂logits. Runs once, like :class:`_HeadNLL`."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, h, W, b, E, y):
        logits = _logits_fp32(h, W, b)
        lse = _row_lse(logits)
        nll = lse - logits.gather(-1, y[:, None])[:, 0] if y is not None else None
        P = logits.sub_(lse[:, None]).exp_()
        x_hat = P.to(h.dtype) @ E.to(h.dtype)
        ctx.save_for_backward(h, W, E, P, x_hat, y)
        ctx.has_bias, ctx.has_y, ctx.done = b is not None, y is not None, False
        return (x_hat, nll) if y is not None else x_hat

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g_x, g_nll=None):
        _consume_once(ctx)
        h, W, E, P, x_hat, y = ctx.saved_tensors
        g_x = g_x.to(P.dtype)
        grad_E = (P.t().to(h.dtype) @ g_x.to(h.dtype)).to(E.dtype) if ctx.needs_input_grad[3] else None
        c = (x_hat.to(P.dtype) * g_x).sum(-1)                        # ⟨x̂_n, ḡ_n⟩
        if ctx.has_y and g_nll is not None:
            g_nll = g_nll.to(P.dtype)
            c = c - g_nll
        Ef = E.to(P.dtype)
        for s in range(0, P.shape[0], _HeadNLL.CHUNK):
            rows = slice(s, s + _HeadNLL.CHUNK)
            P[rows].mul_((g_x[rows] @ Ef.t()).sub_(c[rows, None]))
        if ctx.has_y and g_nll is not None:
            P.scatter_add_(-1, y[:, None], -g_nll[:, None])
        G = P.to(h.dtype)
        grad_h = G @ W.to(h.dtype) if ctx.needs_input_grad[0] else None
        grad_W = (G.t() @ h).to(W.dtype) if ctx.needs_input_grad[1] else None
        grad_b = P.sum(0).to(W.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_h, grad_W, grad_b, grad_E, None


def fused_nll(h: torch.Tensor, W: torch.Tensor, targets: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """−log softmax(h Wᵀ + b)[targets] per position, (…, d) and (…) → (…), through the fused head
    (:class:`_HeadNLL`: one (N, V) buffer for the forward and, in place, the gradient) — for a
    method's own V-wide decoder (Diffusion-LM's tied rounding head softmax(z_0 Eᵀ))."""
    return _HeadNLL.apply(h.reshape(-1, h.shape[-1]), W, b, targets.reshape(-1)).view(targets.shape)


class Head(nn.Linear):
    """The output projection to vocabulary logits. With ``targets`` it returns the per-row NLL of
    the targets through :class:`_HeadNLL` instead; with ``expect`` (a (V, d) matrix E) the
    expectation softmax(logits)·E through :class:`_HeadExpect` (and the NLL too, as a pair,
    when ``targets`` are also given). A module call either way, so wrappers that gather
    parameters in a module's forward (DeepSpeed ZeRO-3) see it."""

    def forward(self, x, targets=None, expect=None):
        if targets is None and expect is None:
            return super().forward(x)
        lead = x.shape[:-1]
        h = x.reshape(-1, x.shape[-1])
        y = targets.reshape(-1) if targets is not None else None
        if expect is None:
            return _HeadNLL.apply(h, self.weight, self.bias, y).view(lead)
        out = _HeadExpect.apply(h, self.weight, self.bias, expect, y)
        if y is None:
            return out.view(*lead, -1)
        return out[0].view(*lead, -1), out[1].view(lead)


class Block(nn.Module):
    def __init__(self, cfg: BackboneConfig, causal: bool):
        super().__init__()
        d = cfg.hidden
        self.heads, self.causal, self.dropout = cfg.heads, causal, cfg.dropout
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False)
        gelu = nn.GELU(approximate="tanh" if cfg.activation == "gelu_tanh" else "none")
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), gelu, nn.Linear(cfg.mlp_ratio * d, d))
        self.adaLN = nn.Linear(cfg.cond_dim, 6 * d)
        nn.init.zeros_(self.adaLN.weight)
        nn.init.zeros_(self.adaLN.bias)

    def forward(self, x, c, rope, kv: dict | None = None, mask=None, store: int | None = None):
        B, L, D = x.shape
        H = self.heads
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN(c).chunk(6, dim=-1)
        qkv = self.qkv(modulate(self.norm1(x), sh1, sc1)).view(B, L, 3, H, D // H)
        qk = apply_rotary(qkv[:, :, :2], rope)          # rotary on q and k in one pass: (B, L, 2, H, d)
        q, k, v = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        causal = self.causal and mask is None
        if kv is not None:                     # prepend the cached keys/values of positions < P
            if "k" in kv:
                P = kv["k"].shape[2]
                k, v = torch.cat([kv["k"], k], 2), torch.cat([kv["v"], v], 2)
                if causal and L > 1:           # query i (position P+i) sees keys 0..P+i
                    pos = torch.arange(P + L, device=x.device)
                    mask = pos[None, :] <= (P + torch.arange(L, device=x.device))[:, None]
                causal = False
            keep = k.shape[2] - L + (L if store is None else store)
            kv["k"], kv["v"] = (k, v) if store is None else (k[:, :, :keep], v[:, :, :keep])
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        a = F.dropout(self.proj(a.transpose(1, 2).reshape(B, L, D)), self.dropout, self.training)
        x = torch.addcmul(x, 1 + g1[:, None], a)  # x + (1 + g1) · a
        m = F.dropout(self.mlp(modulate(self.norm2(x), sh2, sc2)), self.dropout, self.training)
        return torch.addcmul(x, 1 + g2[:, None], m)


class Backbone(nn.Module):
    def __init__(self, cfg: BackboneConfig, vocab_in: int | None, vocab_out: int, seq_len: int,
                 causal: bool = False, in_dim: int | None = None, self_condition: bool = False):
        super().__init__()
        self.cfg, self.causal, self.seq_len = cfg, causal, seq_len
        d = cfg.hidden
        if (d // cfg.heads) % 2:
            raise ValueError(f"head dimension {d // cfg.heads} must be even (rotary embeddings)")
        if vocab_in:
            self.tok = nn.Embedding(vocab_in, d)
            nn.init.normal_(self.tok.weight, std=0.02)
        else:
            self.tok = None
        if self_condition and not in_dim:
            raise ValueError("self_condition needs a continuous input (in_dim)")
        self.self_condition = self_condition
        self.inp = nn.Linear(in_dim * (2 if self_condition else 1), d) if in_dim else None
        self.t_mlp = nn.Sequential(nn.Linear(cfg.cond_dim, cfg.cond_dim), nn.SiLU(),
                                   nn.Linear(cfg.cond_dim, cfg.cond_dim))
        self.blocks = nn.ModuleList(Block(cfg, causal) for _ in range(cfg.layers))
        self.norm_f = nn.LayerNorm(d, elementwise_affine=False)
        self.adaLN_f = nn.Linear(cfg.cond_dim, 2 * d)
        nn.init.zeros_(self.adaLN_f.weight)
        nn.init.zeros_(self.adaLN_f.bias)
        self.head = Head(d, vocab_out)
        nn.init.zeros_(self.head.weight)  # start from uniform predictions (as MDLM/DiT)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens=None, t=None, embeds=None, return_hidden: bool = False,
                cache: "KVCache | None" = None, self_cond=None, targets=None, expect=None,
                attn_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                store: int | None = None):
        x = self.tok(tokens) if embeds is None else embeds
        if self.inp is not None and embeds is not None:
            if self.self_condition:
                x = torch.cat([x, torch.zeros_like(x) if self_cond is None else self_cond], dim=-1)
            x = self.inp(x)
        B, L, _ = x.shape
        P = cache.length if cache is not None else 0
        rope = self._rope(P, L, positions, x.device)
        if attn_mask is not None and tuple(attn_mask.shape[-2:]) != (L, P + L):
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)}: expected (…, {L}, {P + L}) "
                             f"({L} queries, {P} cached + {L} new keys)")
        if store is not None and not (cache is not None and 0 <= store <= L):
            raise ValueError(f"store={store} needs a cache and 0 ≤ store ≤ {L}")
        if t is None:
            t = torch.zeros(B, device=x.device)
        c = F.silu(self.t_mlp(timestep_embedding(1000 * t, self.cfg.cond_dim).to(x.dtype)))
        for i, blk in enumerate(self.blocks):
            x = blk(x, c, rope, cache.layers[i] if cache is not None else None, attn_mask, store)
        if cache is not None:
            cache.length += L if store is None else store
        sh, sc = self.adaLN_f(c).chunk(2, dim=-1)
        x = modulate(self.norm_f(x), sh, sc)
        return x if return_hidden else self.head(x, targets, expect)

    def _rope(self, P: int, L: int, positions, device) -> torch.Tensor:
        """Rotary factors of the L new tokens: at positions P … P+L−1, or at ``positions``;
        none may reach ``seq_len`` (the longest sequence the network is built for)."""
        hd = self.cfg.hidden // self.cfg.heads
        if positions is None:
            if P + L > self.seq_len:
                raise ValueError(f"sequence of {P + L} tokens exceeds the backbone's seq_len {self.seq_len}")
            return rotary_tables(P + L, hd, device)[P:]
        top = int(positions.max()) + 1
        if positions.shape != (L,) or top > self.seq_len:
            raise ValueError(f"positions of shape {tuple(positions.shape)} up to {top - 1}: expected ({L},) "
                             f"below the backbone's seq_len {self.seq_len}")
        return rotary_tables(top, hd, device)[positions]


class KVCache:
    """Per-block keys/values of the tokens seen so far (``length`` of them)."""

    def __init__(self, layers: int):
        self.layers: list[dict] = [{} for _ in range(layers)]
        self.length = 0


def count_params(module: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in module.parameters())
    emb = sum(p.numel() for n, p in module.named_parameters() if n.endswith("tok.weight"))
    return {"params": total, "params_non_embedding": total - emb}
