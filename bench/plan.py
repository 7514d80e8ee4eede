"""``tdbench run SUITE --dry-run``: what a suite would run and what it would cost, computed
from the expanded run specs alone (no data is read, nothing is written, no model is loaded).

Compute model: training FLOPs = 6·N·D (N parameters, D = steps × batch × seq_len training
tokens; the forward+backward rule of thumb, Kaplan et al. 2020), evaluation FLOPs =
2·N·(max_blocks × seq_len) per eval set and t-sample (an upper bound: a test set may have
fewer blocks; unbounded when ``eval.max_blocks`` is null), seq_len read as the ids one pass
feeds the network (``Method.planned_eval_tokens``: 2·seq_len for an [x_t, x_0] input). GPU-hours = FLOPs / (MFU × peak ×
3600). N counts every parameter, embeddings included, of the network the method builds,
instantiated on PyTorch's ``meta`` device (exact, no memory); an evaluation-only row (a
pretrained model, loaded rather than built) is costed by the count its row declares
(``Method.planned_params``) with no training FLOPs, else "n/a". MFU and peak are assumptions,
printed with every estimate and set with ``--mfu`` / ``--peak-tflops``.
"""
from __future__ import annotations

from dataclasses import dataclass

from bench.config import RunSpec, Suite

DEFAULT_MFU = 0.40          # a well-tuned bf16 transformer at these sizes
DEFAULT_PEAK_TFLOPS = 312.0  # NVIDIA A100 bf16 dense


@dataclass
class Estimate:
    spec: RunSpec
    params: int | None
    train_tokens: int
    train_flops: float
    eval_flops: float | None
    gpu_hours: float | None


def vocab_size(spec: RunSpec) -> int:
    """The run's vocabulary; a pretrained model's tokenizer (``hf``) is read from its files (no model)."""
    from bench.data import dataset_params, get_tokenizer, is_synthetic

    if is_synthetic(spec.data.train):
        return dataset_params(spec.data.train).vocab
    t = spec.data.tokenizer
    if t.name == "hf":
        return get_tokenizer(spec.data).vocab_size
    return {"gpt2": 50257, "char": 27}.get(t.name) or (t.vocab_size or 8000)


def n_params(spec: RunSpec) -> int | None:
    """Exact parameter count of the method's network, built on the meta device; for a method
    whose network is loaded rather than built (a pretrained model) the count its row declares
    (``Method.planned_params``: hf-masked-diffusion's ``n_params``), else None."""
    import torch

    from bench.registry import get_method

    cls = get_method(spec.method)
    if not cls.trains:
        return cls.planned_params(cls.Params(**spec.params))
    args = (cls.Params(**spec.params), spec.backbone, vocab_size(spec), spec.data.seq_len)
    try:
        with torch.device("meta"):
            m = cls(*args)
    except Exception:  # noqa: BLE001 - a method that loads pretrained parts or reads text at
        # construction (a frozen encoder, the suite's tokenizer) cannot be built on the meta
        # device: build it for real (its frozen parts are no parameters, so are not counted)
        from bench.data import get_tokenizer
        from bench.method import Context

        try:
            m = cls(*args, context=Context(tokenizer=get_tokenizer(spec.data)))
        except Exception:  # noqa: BLE001 - unknown here; the run itself reports the cause
            return None
    return sum(p.numel() for p in m.parameters())


def estimate(specs: list[RunSpec], mfu: float, peak_tflops: float) -> list[Estimate]:
    from bench.registry import get_method

    out, cache = [], {}
    for s in specs:
        cls = get_method(s.method)
        key = (s.method, s.size, repr(sorted(s.params.items())))
        if key not in cache:
            cache[key] = n_params(s)
        N = cache[key]
        D = s.train.train_sequences * s.data.seq_len if cls.trains else 0
        train = 6.0 * N * D if N else 0.0
        K = 1 if cls.likelihood == "exact" else s.eval.t_samples
        ev = None if s.eval.max_blocks is None or N is None else \
            2.0 * N * s.eval.max_blocks * cls.planned_eval_tokens(cls.Params(**s.params), s.data.seq_len) * K \
            * len(s.data.eval)
        total = train + (ev or 0.0)
        out.append(Estimate(s, N, D, train, ev, total / (mfu * peak_tflops * 1e12 * 3600) if N else None))
    return out


def _si(x: float | None, unit: str = "") -> str:  # 1.7e8 -> "170M"
    if x is None:
        return "n/a"
    for p, f in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= f:
            return f"{x / f:.3g}{p}{unit}"
    return f"{x:.3g}{unit}"


def render(suite: Suite, specs: list[RunSpec], executor: str, cluster: str | None, mfu: float,
           peak_tflops: float) -> str:
    from bench.registry import get_method

    ests = estimate(specs, mfu, peak_tflops)
    L = suite.launch
    procs = L.nodes * L.tasks_per_node
    where = f"executor {executor}" + (f", cluster profile {cluster}" if cluster else "")
    lines = [f"{suite.name}: {len(specs)} runs ({where}); dry run: nothing is written",
             f"each run: {L.nodes} node(s) × {L.tasks_per_node} task(s) = {procs} process(es)"
             f"{', ' + str(L.micro_batch) + ' sequences per micro-batch' if L.micro_batch else ''}, "
             f"time limit {L.timeout_min} min per job",
             f"compute model: 6·N·D training + 2·N·tokens·K evaluation FLOPs; assumed MFU {mfu:.0%} of "
             f"{peak_tflops:g} TFLOP/s peak per GPU (--mfu, --peak-tflops)", ""]
    hdr = f"{'run id':34s} {'label':22s} {'size':7s} {'seed':>4s} {'N params':>9s} {'train tokens':>12s} " \
          f"{'train FLOPs':>11s} {'eval FLOPs':>10s} {'GPU-h':>8s} {'wall-h':>7s}  resources"
    lines += [hdr, "-" * len(hdr)]
    tot = 0.0
    for e in ests:
        s = e.spec
        res = f"{procs} proc, {s.train.precision}, {s.train.engine}" + \
              (f" ZeRO-{s.train.zero_stage}" if s.train.engine == "deepspeed" else "") + \
              f", batch {s.train.batch_size}×{s.data.seq_len}"
        if not get_method(s.method).trains:
            res = f"{procs} proc, evaluation only"
        gh = "n/a" if e.gpu_hours is None else f"{e.gpu_hours:,.1f}"
        wall = "n/a" if e.gpu_hours is None else f"{e.gpu_hours / procs:,.1f}"
        tot += e.gpu_hours or 0.0
        fl = lambda x: "n/a" if x is None else ("0" if x == 0 else f"{x:.2e}")  # noqa: E731
        lines.append(f"{s.run_id:34s} {s.label[:22]:22s} {s.size:7s} {s.seed:>4d} {_si(e.params):>9s} "
                     f"{_si(e.train_tokens):>12s} {fl(e.train_flops):>11s} {fl(e.eval_flops):>10s} {gh:>8s} "
                     f"{wall:>7s}  {res}")
    lines += ["", f"total: {tot:,.1f} GPU-hours (wall-h = GPU-h / processes per run, one GPU each; n/a rows not "
                  "included: a dry run loads no pretrained model; one is costed by the size its row declares; "
                  "eval n/a: eval.max_blocks is null, "
                  "the whole test sets are scored)"]
    return "\n".join(lines)
