"""Run one resolved spec to completion, in this process: build → train → evaluate → sample →
record. Every executor (debug, local, slurm) ends up calling :func:`execute`.

It always leaves ``result.json``: ``running`` while it works, then ``complete`` or ``failed``
(with the error and the log tail). A complete run is skipped; any other resumes from its
latest intact checkpoint. Only the holder of the run directory's lease writes there: it checks
the lease before every checkpoint is published and before every record it writes, never writes
over a ``complete`` record, and stops (publishing nothing, writing no record) when the lease
is lost (bench.lease).
"""
from __future__ import annotations

import math
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bench.config import RunSpec
from bench.distributed import make_accelerator, process_rank, teardown
from bench.errors import UserError
from bench.infill import write_infill
from bench.lease import Lease, LeaseLost, beat_of, lease_state, read_lease
from bench.records import environment, record_status, write_json, write_record
from bench.registry import build_method
from bench.tracking import TrackSettings, accelerator_args, start_tracker


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunLog:
    """Appends to ``<run>/log.txt`` and echoes to stderr. In a multi-process run only global
    rank 0 writes the file; the other ranks echo to their own stderr (the job's log)."""

    def __init__(self, path: Path, rank: int = 0):
        self.path = path
        self.rank = rank

    def __call__(self, msg: str) -> None:
        line = f"[{datetime.now().strftime('%H:%M:%S')}] {msg}"
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        else:
            line = f"[rank {self.rank}] {line}"
        print(line, file=sys.stderr, flush=True)

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.path.read_text().splitlines()[-n:])
        except OSError:
            return ""


def record_header(spec: RunSpec) -> dict:
    """What every result.json of a run starts with, whatever its status."""
    protocol = spec.protocol()
    return {"run_id": spec.run_id, "label": spec.label, "method": spec.method, "size": spec.size,
            "seed": spec.seed, "spec": spec.model_dump(mode="json"),
            "protocol": {**protocol.model_dump(), "id": protocol.id}}


def job_info() -> dict:
    """Where this process runs, when a scheduler started it (recorded in the run's env)."""
    e = os.environ
    out = {}
    if e.get("SLURM_JOB_ID"):
        jid = e["SLURM_JOB_ID"]
        if e.get("SLURM_ARRAY_JOB_ID"):
            jid = f"{e['SLURM_ARRAY_JOB_ID']}_{e.get('SLURM_ARRAY_TASK_ID', '')}"
        out = {"scheduler": "slurm", "job_id": jid, "restarts": int(e.get("SLURM_RESTART_COUNT", 0) or 0),
               "nodes": e.get("SLURM_JOB_NODELIST")}
    elif e.get("SUBMITIT_EXECUTOR") == "local":
        out = {"scheduler": "local", "job_id": e.get("SUBMITIT_LOCAL_JOB_ID")}
    return out


def estimate_kind(method, protocol) -> str:
    """What a likelihood number of ``method`` is under ``protocol``: ``exact``, ``bound``, or
    ``truncated`` — a bound evaluated with t_min > 0 estimates (1 − t_min)⁻¹ ∫_{t_min}^1 of the
    integrand, which is not a bound of the whole integral, so it never goes in a bound column."""
    if method.likelihood == "bound" and protocol.t_min > 0:
        return "truncated"
    return method.likelihood


def bpc_row(row: dict, metric: str = "bpc") -> dict:
    """Bits per unit = log₂ of a per-unit perplexity row: ``bpc`` of a character-level ``ppl``
    row (a unit is a character token), ``bpb`` of a per-byte row (a unit is a UTF-8 byte)."""
    lg = lambda v: None if v is None else math.log2(v)  # noqa: E731
    return {**row, "metric": metric, "value": lg(row["value"]), "ci_low": lg(row["ci_low"]),
            "ci_high": lg(row["ci_high"])}


def utf8_bytes_per_block(tokenizer, tokens: np.ndarray, counted: np.ndarray) -> np.ndarray:
    """(N,) UTF-8 bytes of each block's counted tokens, decoded with the suite's tokenizer: the
    per-byte denominator, the same for every row of a suite (and for any tokenizer of the text).
    Injected specials (EOS/BOS, ids ``tokenizer.eos_id`` / ``bos_id``) are no text: 0 bytes
    (a counted EOS's NLL stays in the numerator, as for every row)."""
    specials = [i for i in (getattr(tokenizer, "eos_id", None), getattr(tokenizer, "bos_id", None)) if i is not None]
    out = []
    for x, c in zip(tokens, counted):
        x = np.asarray(x)[np.asarray(c)]
        out.append(len(tokenizer.decode(x[~np.isin(x, specials)].tolist()).encode("utf-8")))
    return np.array(out, dtype=np.float64)


def paired_gap(nll: np.ndarray, ntok: np.ndarray, source_nll: np.ndarray, confidence: float) -> dict:
    """Gap (nats per token) between a row's NLL estimates and the source's exact NLL of the very
    same blocks, Σ_i (n_i − s_i) / Σ_i c_i, with a paired ratio-estimator interval over blocks
    (it contains both the t draws' and the test set's sampling error; pairing removes the
    blocks' own variation, which dominates either NLL alone)."""
    from statistics import NormalDist

    d = nll.mean(1) - source_nll
    C = ntok.sum()
    g = d.sum() / C
    N = len(d)
    se = math.sqrt(N / max(N - 1, 1) * ((d - g * ntok) ** 2).sum()) / C
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return {"value": float(g), "ci_low": float(g - z * se), "ci_high": float(g + z * se),
            "se_nll_per_token": se, "n_tokens": int(C), "n_seqs": int(N)}


def evaluate_all(method, spec: RunSpec, device, log) -> tuple[list[dict], list[dict]]:
    """For every eval dataset: the ``ppl`` metric (and ``bpc`` for character tokens); for
    synthetic sources also the source's expected per-token entropy ("Source (true)": exact, or
    an estimate with its interval where there is no closed form), its exact NLL of the very
    test blocks ("Source (test blocks)") and each row's paired ``gap`` to it."""
    from bench.data import get_tokenizer, load_blocks, source_entropy, source_nll_of_blocks
    from bench.evaluate import per_sequence_nll, summarize

    protocol = spec.protocol()
    pid = protocol.id
    kind = estimate_kind(method, protocol)
    method.use_protocol(protocol)           # before bounds(): what a row bounds may depend on it
    char = spec.data.tokenizer.name == "char"
    metrics, reference = [], []
    for ref in spec.data.eval:
        row = {"dataset": ref.key, "metric": "ppl", "protocol_id": pid, "bound": kind == "bound",
               "estimate": kind}
        if kind in ("bound", "truncated"):
            row["bounds"] = method.bounds()
        if method.likelihood == "none":
            metrics.append({**row, "value": None, "ci_low": None, "ci_high": None, "bound": None})
            continue
        blocks = load_blocks(ref, "test", spec.data, spec.eval.packing, spec.eval.counting).head(spec.eval.max_blocks)
        t0 = time.time()
        nll, ntok = per_sequence_nll(method, blocks.tokens, blocks.counted, protocol, spec.eval.batch_size,
                                     spec.eval.seed, device, desc=f"eval {ref.key}")
        row.update(summarize(nll, ntok, protocol.confidence, exact=method.likelihood == "exact",
                             scheme=protocol.t_sampling))
        row["eval_s"] = round(time.time() - t0, 2)
        metrics.append(row)
        if char:
            metrics.append(bpc_row(row))
        if spec.eval.per_byte:
            nbytes = utf8_bytes_per_block(get_tokenizer(spec.data), blocks.tokens, blocks.counted)
            per_byte = summarize(nll, nbytes, protocol.confidence, exact=method.likelihood == "exact",
                                 scheme=protocol.t_sampling)
            metrics.append({**bpc_row({**row, **per_byte}, "bpb"), "n_bytes": per_byte["n_tokens"],
                            "n_tokens": row["n_tokens"]})
        mark = {"bound": "≤ ", "truncated": "≈ (truncated, t_min > 0) "}.get(kind, "")
        log(f"{ref.key}: ppl {mark}{row['value']:.3f} "
            f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] over {row['n_tokens']} tokens")
        h = source_entropy(ref, spec.data.seq_len)
        if h is not None:
            s = source_nll_of_blocks(ref, blocks.tokens)
            C = float(ntok.sum())
            reference.append(source_true_row(ref.key, pid, h))
            reference.append({"dataset": ref.key, "metric": "ppl", "value": math.exp(s.sum() / C),
                              "protocol_id": pid, "bound": False, "label": "Source (test blocks)"})
            gap = paired_gap(nll, ntok, s, protocol.confidence)
            metrics.append({"dataset": ref.key, "metric": "gap", "protocol_id": pid, "bound": False,
                            "estimate": "paired", **gap})
            log(f"{ref.key}: gap to the source's NLL of these blocks {gap['value']:+.4f} nats/token "
                f"[{gap['ci_low']:+.4f}, {gap['ci_high']:+.4f}]")
    return metrics, reference


def source_true_row(dataset: str, pid: str, h: dict) -> dict:
    """The ``Source (true)`` reference row: perplexity exp(h) of the source's per-token block
    entropy h; an estimate (bench.data.hmm) keeps its interval and says so."""
    row = {"dataset": dataset, "metric": "ppl", "value": math.exp(h["value"]), "protocol_id": pid,
           "bound": False, "label": "Source (true)"}
    if h["estimate"] != "exact":
        row.update(ci_low=math.exp(h["ci_low"]), ci_high=math.exp(h["ci_high"]), estimate=h["estimate"],
                   n_blocks=h["n_blocks"])
    return row


def learning_probe(method, spec: RunSpec, device):
    """The cheap intermediate evaluation behind learning.png (``eval.curve_every`` > 0): the NLL
    per token on the first ``curve_blocks`` blocks of the first eval set (packed and counted as
    the final evaluation packs and counts them) with ``curve_t_samples`` t draws per block,
    drawn as one stratified sample over all of them (``bench.evaluate.draw_u_joint``: with
    K = 2 the protocol's per-block draws are iid, ~0.4 bits per token of Monte-Carlo sd for a
    uniform-noise row) and its interval (``summarize_joint``); the same draws at every point. On
    a synthetic source each point also carries the source's exact NLL of the same blocks
    (``source_nll_per_token``), the line learning.png draws. None when off or the method has no
    likelihood."""
    import torch

    from bench.data import is_synthetic, load_blocks, source_nll_of_blocks
    from bench.evaluate import draw_u_joint, per_sequence_nll, summarize_joint

    e = spec.eval
    if not e.curve_every or method.likelihood == "none":
        return None
    ref = spec.data.eval[0]
    blocks = load_blocks(ref, "test", spec.data, e.packing, e.counting).head(e.curve_blocks)
    protocol = spec.protocol()
    tokens, counted = np.array(blocks.tokens), np.array(blocks.counted)
    exact = method.likelihood == "exact"
    truth = None   # a synthetic source's exact NLL per counted token of these very blocks (learning.png's line)
    if is_synthetic(ref):
        truth = round(float(source_nll_of_blocks(ref, tokens).sum() / counted.sum()), 6)
    u, strata = draw_u_joint(len(tokens), 1 if exact else e.curve_t_samples, torch.Generator().manual_seed(e.seed))

    def probe(model, step: int, seen: int) -> dict:
        was = model.training
        nll, ntok = per_sequence_nll(model, tokens, counted, protocol, e.batch_size, e.seed, device,
                                     desc="curve", u=u)
        model.train(was)
        s = summarize_joint(nll, ntok, strata.numpy(), protocol.confidence)
        if exact:
            s.update(se_nll_per_token=0.0, ci_low_nll=s["nll_per_token"], ci_high_nll=s["nll_per_token"])
        rnd = lambda v: None if v is None else round(float(v), 6)  # noqa: E731
        return {"step": step, "tokens": seen, "dataset": ref.key, "blocks": len(tokens),
                "char": spec.data.tokenizer.name == "char",
                **{k: rnd(s[k]) for k in ("nll_per_token", "se_nll_per_token", "ci_low_nll", "ci_high_nll")},
                **({} if truth is None else {"source_nll_per_token": truth})}

    probe.every = e.curve_every
    return probe


def write_samples(method, spec: RunSpec, tokenizer, run_dir: Path, log=None) -> int:
    """``eval.samples`` samples per step budget into ``samples.jsonl`` (bench.samples)."""
    if spec.eval.samples <= 0 or "sampling" not in method.supports():
        return 0
    from bench.samples import write_run_samples

    return write_run_samples(method, spec, tokenizer, run_dir, log=log)


def execute(spec_json: dict, run_dir: str | os.PathLike, threads: int | None = None,
            micro_batch: int | None = None, tracking: TrackSettings | None = None) -> str:
    """Run one spec in this process; returns the final status ('complete' or 'failed'), or
    'held' when another process holds the run directory's lease (nothing is done then) or
    took it over meanwhile (this process then stops writing there).

    In a multi-process run every process calls this; the processes train together, then
    global rank 0 evaluates and writes the record. ``micro_batch`` (sequences per forward, per
    process) sets gradient accumulation; it never changes the global batch. ``tracking``: the
    suite's experiment trackers (bench.tracking; None: off)."""
    spec = RunSpec(**spec_json)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if record_status(run_dir) == "complete":
        return "complete"
    lease = take_lease(run_dir)
    if lease is None:
        return "held"
    try:
        if record_status(run_dir) == "complete":  # finished by the previous holder meanwhile
            return "complete"
        from bench.checkpoint import clean_staging

        if lease.held:   # what a writer killed mid-save (or one that lost the lease) left
            clean_staging(run_dir, lease.token)
        status = _execute(spec, run_dir, threads, micro_batch, lease, tracking)
        if lease.held and status == "complete":   # (and what one left meanwhile)
            clean_staging(run_dir, lease.token)
        return status
    finally:
        lease.release()


def take_lease(run_dir: Path) -> Lease | None:
    """Global rank 0 takes the run directory's lease; the other ranks of a multi-process run
    follow it: they go on once the lease names their own job, and give up like rank 0 when
    another job holds it. None: held elsewhere. A lease whose holder is not a running process
    of this machine is watched until its heartbeat changes (held) or has not changed for the
    stale time (taken over)."""
    lease = Lease(run_dir)
    if _rank_from_env() == 0:
        return lease if lease.try_acquire(watch_s=lease.stale_s + 2 * lease.heartbeat_s) else None
    mine = lease.info["job_id"]
    if mine is None:
        return lease  # no scheduler job to recognise rank 0's lease by: follow it unchecked
    deadline, seen = time.monotonic() + lease.stale_s + 2 * lease.heartbeat_s + 120, {}
    while time.monotonic() < deadline:
        cur = read_lease(run_dir)
        if cur is not None and cur.get("job_id") == mine:
            return lease  # not held by this rank: release() is a no-op
        if cur is not None and lease_state(cur) == "held" \
                and seen.setdefault(cur["token"], beat_of(cur)) != beat_of(cur):
            return None   # another job's lease, and it beats: rank 0 gives up too
        time.sleep(0.5)
    return None


def write_own_record(lease: Lease | None, path: Path, rec: dict) -> None:
    """Write the run's record as the holder of its lease: LeaseLost (nothing written) when
    this process no longer holds it, or the record there already says complete."""
    if lease is not None:
        lease.check()
    if record_status(path.parent) == "complete":
        raise LeaseLost("the run was completed by another process")
    write_record(path, rec)


def _lost(log, e: LeaseLost, what: str) -> str:
    try:
        log(f"{e}: this process stops here; {what}")
    except OSError:
        pass
    return "held"


def train_method(method, spec: RunSpec, params: dict, run_dir: Path, accelerator, log, micro_batch, lease,
                 tracker=None) -> dict:
    """Load the training blocks, give the method the cache of its frozen parts' features over
    them (when it declares any: computed once, bench.data.frozencache), train it; returns the
    record's training stats (with ``frozen_features``: the cache, its hits and misses)."""
    from bench.data import load_blocks
    from bench.data.frozencache import attach
    from bench.train import train

    blocks = load_blocks(spec.data.train, "train", spec.data, spec.eval.packing, spec.eval.counting)
    log(f"{params['params']:,} parameters; {blocks.describe()} training blocks of {spec.data.seq_len}")
    cache = attach(method, blocks, accelerator.device, str(accelerator.mixed_precision), accelerator.autocast, log,
                   encodes=spec.train.train_sequences)
    stats = train(method, spec, blocks, run_dir, accelerator, log, micro_batch=micro_batch,
                  curve=learning_probe(method, spec, accelerator.device), writer=lease, tracker=tracker)
    if cache is not None:   # where the features came from, and how many batches it served
        stats["frozen_features"] = cache.summary()
    return stats


def _execute(spec: RunSpec, run_dir: Path, threads, micro_batch, lease: Lease | None = None, tracking=None) -> str:
    import torch

    result_path = run_dir / "result.json"
    if threads:
        torch.set_num_threads(threads)
    if not (run_dir / "spec.json").exists():
        write_json(run_dir / "spec.json", spec.model_dump(mode="json"))
    log = RunLog(run_dir / "log.txt", rank=_rank_from_env())
    base = {**record_header(spec), "started": now()}
    accelerator = None
    try:
        from bench.backbone import count_params
        from bench.data import get_tokenizer
        from bench.progress import write_progress

        accelerator = make_accelerator(spec, micro_batch, **accelerator_args(tracking, run_dir))
        if threads:
            torch.set_num_threads(threads)  # Accelerate resets it for multi-process CPU runs
        log.rank = accelerator.process_index
        env = {**environment(str(accelerator.device), accelerator.num_processes, torch.get_num_threads()), **job_info()}
        if accelerator.is_main_process:
            write_own_record(lease, result_path, {**base, "status": "running", "env": env})
            write_progress(run_dir, phase="setup", step=None, total=spec.train.total_steps, pid=os.getpid())
        log(f"run {spec.run_id}: {spec.label} size={spec.size} seed={spec.seed} on {env['device']}")
        tracker = start_tracker(accelerator, tracking, spec, run_dir)   # (bench.tracking.Off when off)
        tokenizer = get_tokenizer(spec.data)
        torch.manual_seed(spec.seed)
        method = build_method(spec, tokenizer.vocab_size, tokenizer)
        params = count_params(method)
        if method.frozen_modules():   # pretrained parts held frozen: not trained, not in the checkpoints
            params["params_frozen"] = sum(p.numel() for m in method.frozen_modules().values() for p in m.parameters())
        if method.trains:
            stats = train_method(method, spec, params, run_dir, accelerator, log, micro_batch, lease,
                                 tracker=tracker)
        else:  # a pretrained model evaluated as given (Method.trains = False)
            log(f"{params['params']:,} parameters; {spec.label} is evaluated as given (no training)")
            stats = {"steps": 0, "tokens": 0, "trained": False, "final_loss": None, "tokens_per_s": None}
        stats.update(params)
        if not accelerator.is_main_process:
            return "complete"
        if spec.train.engine == "deepspeed" and spec.train.zero_stage == 3:
            method = _reload_final(spec, tokenizer, run_dir)  # ZeRO-3 partitions the weights
        method.to(accelerator.device)
        write_progress(run_dir, phase="eval", step=stats["steps"], total=spec.train.total_steps,
                       loss=stats["final_loss"], tokens_per_s=stats["tokens_per_s"], eta_s=None, pid=os.getpid())
        metrics, reference = evaluate_all(method, spec, accelerator.device, log)
        n_samples = write_samples(method, spec, tokenizer, run_dir, log)
        infill = write_infill(method, spec, run_dir, log)   # eval.infill: <run>/infill.jsonl (None: off)
        info = method_info(method)
        protocol = base["protocol"]
        if info.get("text_crossing"):   # how the method's text crosses into another tokenizer
            protocol = {**protocol, "text_crossing": info["text_crossing"]}
        write_own_record(lease, result_path, {
            **base, "protocol": protocol, "status": "complete", "metrics": metrics, "reference": reference,
            "train": stats, "samples": n_samples, **({"infill": infill} if infill else {}), "method_info": info,
            "env": env, "finished": now()})
        tracker.final(metrics, stats["steps"])   # after the record: once, never for a run another process completed
        log(f"run {spec.run_id}: complete")
        return "complete"
    except LeaseLost as e:
        return _lost(log, e, "it publishes no checkpoint and writes no record")
    except Exception as e:  # noqa: BLE001 - one run's failure is recorded, never raised further
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, UserError):
            msg = f"{type(e).__name__}: {msg}"
        try:
            log("FAILED: " + msg)
            log(traceback.format_exc().rstrip())
        except OSError:
            pass
        if accelerator is None or accelerator.is_main_process:
            try:
                write_own_record(lease, result_path, {**base, "status": "failed", "error": msg,
                                                      "log_tail": log.tail(), "finished": now()})
            except LeaseLost as lost:
                return _lost(log, lost, "its failure is not recorded")
        return "failed"
    finally:
        teardown(accelerator)


def method_info(method) -> dict:
    """``method.info()`` with the frozen parts it holds (source and sha256 of each), whatever
    the method's own ``info`` returns."""
    info = dict(method.info())
    if method.frozen_modules():
        info["frozen"] = method.frozen_info()
    return info


def _rank_from_env() -> int:
    return process_rank()[0]


def _reload_final(spec: RunSpec, tokenizer, run_dir: Path):
    from bench.checkpoint import final_checkpoint, load_weights

    # frozen parts: again from their source (ZeRO-3 keeps no EMA, so this is model.safetensors)
    return load_weights(build_method(spec, tokenizer.vocab_size, tokenizer), final_checkpoint(run_dir))
