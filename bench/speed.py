"""``tdbench speed``: training throughput as ratios measured in one process, interleaved.

Two comparisons, each at the smoke size (2 × 128, 4 heads, 2k vocabulary, 128-token blocks)
and at GPT-2 small (12 × 768, 12 heads, GPT-2's 50,257 vocabulary):

- our AR baseline (the shared backbone, causal, t ≡ 0) against Hugging Face
  ``GPT2LMHeadModel`` at equal dimensions and vocabulary (V + 1 ids in, as our AR's [BOS]),
  dropout 0 in both, the same AdamW, batch and thread count;
- each method family's training step (MDLM, SEDD uniform, D3PM uniform) against our AR:
  the objective's own cost on top of the same backbone.

Interleaving: the contenders take turns, ``rounds`` times ``steps`` optimizer steps each,
after warm-up steps, so machine noise (other processes, frequency scaling) hits all of them
alike; a ratio is the median over rounds of the per-round tokens/s ratio, and the spread is the
range of those per-round ratios. Tokens counted: batch × seq_len per step (every position is a
training target in all contenders).

Both use the fused AdamW kernel, as the training loop does; on CUDA the steps run under bf16
autocast; MFU is model FLOPs
(6 · non-embedding params · tokens + the attention term 12 · layers · hidden · seq_len per
token, as in the PaLM appendix) over the device's peak, which is given with ``--peak-tflops``
(no table of devices is guessed here).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from bench.config import BackboneConfig
from bench.registry import get_method

SIZES = {  # name -> (backbone dims, vocab, seq_len, batch)
    "smoke": (dict(layers=2, hidden=128, heads=4), 2048, 128, 16),
    "12x768": (dict(layers=12, hidden=768, heads=12), 50257, 128, 4),
}
FAMILIES = [("MDLM", "mdlm", {}), ("SEDD uniform", "sedd", {"graph": "uniform"}),
            ("D3PM uniform", "d3pm", {"transition": "uniform"})]


@dataclass
class Contender:
    name: str
    model: torch.nn.Module
    step_fn: object  # () -> None: one optimizer step
    params: int


def _ours(method: str, params: dict, dims: dict, V: int, L: int, B: int, device, fused: bool,
          compile_: bool, seed: int = 0) -> Contender:
    torch.manual_seed(seed)
    cls = get_method(method)
    m = cls(cls.Params(**params), BackboneConfig(**dims), V, L).to(device)
    fwd = torch.compile(m) if compile_ else m
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=fused)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, L), generator=g).to(device)
    c = torch.ones(B, L, dtype=torch.bool, device=device)

    def step():
        u = torch.rand(B, generator=g).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = fwd(x, c, u)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    label = cls.default_label(cls.Params(**params))
    return Contender(f"tdbench {label}", m, step, sum(p.numel() for p in m.parameters()))


def _hf_gpt2(dims: dict, V: int, L: int, B: int, device, fused: bool, compile_: bool, seed: int = 0) -> Contender:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V + 1, n_positions=L, n_embd=dims["hidden"], n_layer=dims["layers"],
                     n_head=dims["heads"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=V, eos_token_id=V, attn_implementation="sdpa")
    m = GPT2LMHeadModel(cfg).to(device)
    fwd = torch.compile(m) if compile_ else m
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=fused)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, L), generator=g).to(device)
    inp = torch.cat([torch.full_like(x[:, :1], V), x[:, :-1]], 1)  # [BOS] x_0..x_{L-2}, as our AR

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = fwd(input_ids=inp).logits
            loss = torch.nn.functional.cross_entropy(logits[..., :V].float().flatten(0, 1), x.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Contender("HF GPT2LMHeadModel", m, step, sum(p.numel() for p in m.parameters()))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def race(contenders: list[Contender], tokens_per_step: int, steps: int, rounds: int, warmup: int,
         device) -> dict[str, list[float]]:
    """Tokens/s of each contender per round, taking turns."""
    for c in contenders:
        for _ in range(warmup):
            c.step_fn()
    _sync(device)
    out: dict[str, list[float]] = {c.name: [] for c in contenders}
    for r in range(rounds):
        order = contenders if r % 2 == 0 else contenders[::-1]
        for c in order:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                c.step_fn()
            _sync(device)
            out[c.name].append(tokens_per_step * steps / (time.perf_counter() - t0))
    return out


def ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(median, min, max) over rounds of a/b."""
    rs = [x / y for x, y in zip(a, b)]
    return statistics.median(rs), min(rs), max(rs)


def model_flops_per_token(n_params_non_emb: int, layers: int, hidden: int, L: int) -> float:
    return 6 * n_params_non_emb + 12 * layers * hidden * L


def run(sizes: list[str], steps: int, rounds: int, warmup: int, threads: int | None, device: str,
        compile_: bool = False, peak_tflops: float | None = None, families: bool = True, log=print) -> list[dict]:
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    fused = True                      # as the training loop (bench/train.py): fused AdamW on CPU and GPU
    rows = []
    log(f"tdbench speed: torch {torch.__version__}, device {dev}, {torch.get_num_threads()} threads, "
        f"{'bf16 autocast' if dev.type == 'cuda' else 'fp32'}, fused AdamW{', torch.compile' if compile_ else ''}; "
        f"{rounds} rounds × {steps} steps per contender, interleaved, after {warmup} warm-up steps")
    for size in sizes:
        dims, V, L, B = SIZES[size]
        tok = B * L
        if dev.type == "cuda" and size == "12x768":
            L, B = 1024, 8
            tok = B * L
        ar = _ours("ar", {}, dims, V, L, B, dev, fused, compile_)
        hf = _hf_gpt2(dims, V, L, B, dev, fused, compile_)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        res = race([ar, hf], tok, steps, rounds, warmup, dev)
        med, lo, hi = ratio(res[ar.name], res[hf.name])
        row = {"size": size, "dims": f"{dims['layers']}x{dims['hidden']}", "vocab": V, "seq_len": L, "batch": B,
               "a": ar.name, "b": hf.name, "a_tok_s": statistics.median(res[ar.name]),
               "b_tok_s": statistics.median(res[hf.name]), "ratio": med, "ratio_min": lo, "ratio_max": hi,
               "a_params": ar.params, "b_params": hf.params}
        if dev.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            if peak_tflops:
                emb = ar.model.net.tok.weight.numel()
                f = model_flops_per_token(ar.params - emb, dims["layers"], dims["hidden"], L)
                row["mfu"] = row["a_tok_s"] * f / (peak_tflops * 1e12)
        rows.append(row)
        log(_line(row))
        if families:
            for label, name, params in FAMILIES:
                fam = _ours(name, params, dims, V, L, B, dev, fused, compile_)
                ar2 = _ours("ar", {}, dims, V, L, B, dev, fused, compile_)
                res = race([fam, ar2], tok, steps, rounds, warmup, dev)
                med, lo, hi = ratio(res[fam.name], res[ar2.name])
                row = {"size": size, "dims": f"{dims['layers']}x{dims['hidden']}", "vocab": V, "seq_len": L,
                       "batch": B, "a": fam.name, "b": ar2.name, "a_tok_s": statistics.median(res[fam.name]),
                       "b_tok_s": statistics.median(res[ar2.name]), "ratio": med, "ratio_min": lo,
                       "ratio_max": hi, "a_params": fam.params, "b_params": ar2.params}
                rows.append(row)
                log(_line(row))
                del fam, ar2
        del ar, hf
    return rows


def _line(r: dict) -> str:
    s = (f"{r['size']:7s} {r['dims']:7s} V={r['vocab']:<6d} L={r['seq_len']:<5d} B={r['batch']:<3d} "
         f"{r['a']:24s} {r['a_tok_s']:>9,.0f} tok/s  vs  {r['b']:20s} {r['b_tok_s']:>9,.0f} tok/s  "
         f"ratio {r['ratio']:.2f}× (rounds {r['ratio_min']:.2f}–{r['ratio_max']:.2f})")
    if "peak_mem_gb" in r:
        s += f"  peak mem {r['peak_mem_gb']:.1f} GiB"
    if "mfu" in r:
        s += f"  MFU {100 * r['mfu']:.1f}%"
    return s
