"""No (B, L, V) buffer beyond the fused head in the continuous family (issue 22, point 6):
Diffusion-LM's rounding term goes through the fused head (bench.backbone.fused_nll), the
clamping sampler's nearest-embedding search and the bounded sampler's decoder draw work a block
of rows at a time, and PLAID's x̂0 = softmax(f_θ)·E comes out of the fused head in fp32 under
autocast. Each against the computation it replaces, and peak memory measured by the torch
profiler's allocation events (every CPU tensor allocation and free, in order: the peak is the
largest running total above the start)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.backbone import _HeadNLL, fused_nll
from bench.config import BackboneConfig
from methods import _plaid
from methods._gaussian import nearest_embedding
from methods._vlb import decoder_draw
from methods.continuous import PLAID, DiffusionLM

BB = BackboneConfig(layers=1, hidden=16, heads=2, cond_dim=8)


def peak_bytes(fn) -> int:
    """The largest running total of CPU bytes allocated (minus freed) while ``fn()`` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    total, peak = 0, 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        total += e.nbytes()
        peak = max(peak, total)
    return peak


def old_rounding(z0, E, w):
    """Diffusion-LM's rounding term as it was: (N, V) fp32 logits, then cross-entropy."""
    logits = z0 @ E.t()
    return F.cross_entropy(logits.float().flatten(0, 1), w.flatten(), reduction="none").view(w.shape)


def test_rounding_through_the_fused_head_equals_cross_entropy():
    """fused_nll(z_0, E, w) = −log softmax(z_0 Eᵀ)_w and its gradients in z_0 and E equal the
    cross-entropy path's (fp32, logits of magnitude ~10 over V = 300: the two reduce the
    log-sum-exp in a different order, 1e-5 relative), and DiffusionLM.rounding_nll is that at its
    own draw of z_0 (same seed, same draw)."""
    torch.manual_seed(0)
    z0 = torch.randn(3, 7, 16, requires_grad=True)
    E = torch.randn(300, 16, requires_grad=True)
    w = torch.randint(0, 300, (3, 7))
    new, old = fused_nll(z0, E, w), old_rounding(z0, E, w)
    assert torch.allclose(new, old, rtol=1e-5, atol=1e-5)
    g = torch.rand(3, 7)
    gn, go = torch.autograd.grad(new, (z0, E), g), torch.autograd.grad(old, (z0, E), g)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(gn, go))
    m = DiffusionLM(DiffusionLM.Params(), BB, 300, 7)
    e = m.embedding(w)
    torch.manual_seed(1)
    got = m.rounding_nll(e, w)
    torch.manual_seed(1)
    g0, _ = m.endpoints(e)
    ref = old_rounding(torch.sigmoid(-g0).sqrt() * e + torch.sigmoid(g0).sqrt() * torch.randn_like(e),
                       m.embedding.weight, w)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_rounding_holds_one_vocabulary_wide_buffer():
    """Forward and backward of DiffusionLM.rounding_nll at N = 1,024 positions, V = 4,096 (one
    (N, V) fp32 buffer is 16 MiB): through the fused head the peak is that one buffer plus one
    log-sum-exp chunk of it (``_HeadNLL.CHUNK`` rows) plus 2% for the (N, d)- and (V, d)-sized
    rest; the cross-entropy path it replaces, on the same z_0, peaks at ≥ 2.5 buffers (logits,
    log-probabilities, their gradients)."""
    torch.manual_seed(0)
    N, V = 1024, 4096
    m = DiffusionLM(DiffusionLM.Params(), BB, V, N)
    w = torch.randint(0, V, (1, N))
    buf, chunk = N * V * 4, _HeadNLL.CHUNK * V * 4
    new = peak_bytes(lambda: m.rounding_nll(m.embedding(w), w).sum().backward())
    z0 = torch.randn(1, N, m.p.embed_dim, requires_grad=True)
    old = peak_bytes(lambda: old_rounding(z0, m.embedding.weight, w).sum().backward())
    assert new <= buf + chunk + 0.02 * buf < 2.5 * buf <= old, (new / buf, old / buf)


def test_nearest_embedding_in_blocks_is_the_one_shot_search():
    """The blocked search returns the ids of the one-shot ‖x‖² − 2x·E_v + ‖E_v‖² argmin (3-row
    blocks over 2 × 50 positions; the same arithmetic per row, so the same ids)."""
    torch.manual_seed(0)
    x, E = torch.randn(2, 50, 16), torch.randn(500, 16)
    one_shot = ((x * x).sum(-1, keepdim=True) - 2 * x @ E.t() + (E * E).sum(-1)).argmin(-1)
    assert torch.equal(nearest_embedding(x, E, block_bytes=3 * 500 * 4), one_shot)
    assert torch.equal(nearest_embedding(x, E), one_shot)


def test_nearest_embedding_peak_does_not_grow_with_positions():
    """n × 64 positions, n = 8 and 32, against V = 4,096 (the one-shot distances: 8 and 32 MiB)
    in 64 KiB blocks: the peak stays within two blocks (a distance block and the next
    expression's), two (V, d) copies of E (the matrix product packs Eᵀ) and ‖E_v‖², plus the ids
    and the flattened input — and from n = 8 to 32 it grows by no more than those last two."""
    torch.manual_seed(0)
    E = torch.randn(4096, 16)
    block, peaks = 1 << 16, {}
    for n in (8, 32):
        x = torch.randn(n, 64, 16)
        peaks[n] = peak_bytes(lambda: nearest_embedding(x, E, block_bytes=block))
        per_position = 8 + 16 * 4
        assert peaks[n] <= 2 * block + 2 * E.nbytes + 4096 * 4 + n * 64 * per_position, (n, peaks[n])
    assert peaks[32] - peaks[8] <= 24 * 64 * per_position, peaks


def test_decoder_draw_peak_does_not_grow_with_positions():
    """The bounded sampler's decoder draw over 16 × 128 positions, V = 4,096 (64 MiB of float64
    logits at once) in 64 KiB blocks: the peak stays within five blocks (fp32 logits, their
    float64 copy, the uniforms, the Gumbel noise) plus the ids."""
    torch.manual_seed(0)
    h, W = torch.randn(16, 128, 16), torch.randn(4096, 16)
    block = 1 << 16
    peak = peak_bytes(lambda: decoder_draw(h, W, None, torch.Generator().manual_seed(0), block_bytes=block))
    assert peak <= 5 * block + 16 * 128 * 8 * 2, peak


def test_plaid_x0_is_fp32_under_autocast():
    """Under bf16 autocast PLAID's x̂0 = softmax(logits)·E (with its logit bias, _plaid.biased_readout)
    leaves the readout in fp32: from the trunk's hidden states it equals the float64 computation to
    1e-6 (fp32 sums over V = 256 terms of magnitude ≤ 3; a bf16 product is off by ~2⁻⁸ relative,
    and its γ endpoints train on x̂0)."""
    torch.manual_seed(0)
    m = PLAID(PLAID.Params(self_condition=False), BB, 256, 8).eval()
    torch.nn.init.normal_(m.net.head.weight)
    z, t = torch.randn(2, 8, m.p.embed_dim), torch.rand(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h, side = m.hidden(z, t, None)
        x0 = _plaid.biased_readout(m.net.head, h, side, m.embedding.weight)
        assert m.predict_x0(z, t, None).dtype == torch.float32
    E, W, b = (x.detach().double() for x in (m.embedding.weight, m.net.head.weight, m.net.head.bias))
    ref = torch.softmax(h.double() @ W.t() + b + side.double() @ E.t(), -1) @ E
    assert x0.dtype == torch.float32 and torch.allclose(x0.double(), ref, atol=1e-6)
