"""A dress rehearsal's rows (bench.rehearse): what each run measured, its GPU projection (the
formulas are bench.rehearse's module doc) and the table: markdown on stdout and in
``rehearsal.md``, every number raw in ``rehearsal.csv``."""
from __future__ import annotations

import csv
import io
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from bench.config import RunSpec

GIB = 2 ** 30


@dataclass
class Row:
    """One rehearsed run (standing for ``shared``, the runs of its shape) and what it measured:
    ``stages`` one dict per training stage (updated parameters and EMA entries, a step's working
    memory ``work``, what its forward keeps for the backward ``saved``, ``peak`` and seconds ``s``
    at batch 1, the suite's per-GPU batch ``b`` and
    sequences per GPU per step ``per_rank``, its full-size ``steps``), ``evals`` / ``sample`` the
    same for evaluation and sampling (seconds per forward / per network call; ``sample["b"]``:
    the suite's sampling batch)."""

    run_id: str
    label: str
    size: str
    method: str
    seq_len: int
    shared: list[str]
    notes: list[str]
    status: str = "ok"
    error: str | None = None
    wall_s: float | None = None
    peak_rss: int | None = None
    params: int | None = None
    frozen: int = 0
    resumed: str | None = None
    stages: list[dict] = field(default_factory=list)
    evals: dict | None = None
    sample: dict | None = None

    @classmethod
    def of(cls, spec: RunSpec, others: list[RunSpec], notes: list[str]) -> "Row":
        return cls(spec.run_id, spec.label, spec.size, spec.method, spec.data.seq_len,
                   [s.run_id for s in others], notes)

    def failed(self, error: str, wall_s: float | None = None, peak_rss: int | None = None) -> "Row":
        self.status, self.error, self.wall_s, self.peak_rss = "failed", error, wall_s, peak_rss
        return self


def _calls(calls: list[dict]) -> dict:
    """Peak, working memory (peak above the RSS before) and median seconds of some calls."""
    work = [c["peak"] - c["rss_before"] for c in calls if c["peak"] is not None and c["rss_before"] is not None]
    return {"peak": max((c["peak"] or 0) for c in calls), "work": max(work) if work else None,
            "s": statistics.median(c["s"] for c in calls)}


def measure(row: Row, rd: Path, probes: dict, spec: RunSpec, suite, wall_s: float, peak_rss: int) -> Row:
    """Fill ``row`` from the run's record and its children's probes (bench.rehearse_child); a
    run that did not complete, or did not resume from the checkpoint it was stopped at, fails."""
    from bench.distributed import batch_plan
    from bench.records import read_record
    from bench.samples import sampling_batch

    rec = read_record(rd / "result.json")
    if rec.get("status") != "complete":
        return row.failed(rec.get("error") or f"record says {rec.get('status')}", wall_s, peak_rss)
    train = rec["train"]
    if "stop" in probes:
        ck = probes["stop"]["checkpoints"][0]
        multi = len(spec.train.stages) > 1
        if train.get("resumed_from_step") != ck["step"] or (multi and train.get("resumed_in_stage") != ck["stage"]):
            return row.failed(f"did not resume from its checkpoint at step {ck['step']} ({ck['stage']}): the record "
                              f"says step {train.get('resumed_from_step')}", wall_s, peak_rss)
        row.resumed = f"{ck['stage']} step {ck['step']}" if multi else f"step {ck['step']}"
    row.wall_s, row.peak_rss = wall_s, peak_rss
    row.params, row.frozen = train.get("params"), train.get("params_frozen", 0)
    world = suite.launch.nodes * suite.launch.tasks_per_node
    steps = [c for p in probes.values() for c in p["steps"]]
    for name in dict.fromkeys(c["stage"] for c in steps):
        mine = [c for c in steps if c["stage"] == name]
        steady = [c for c in mine if not c["fresh_optimizer"]] or mine
        cfg = spec.train.for_stage(name)
        plan = batch_plan(cfg.batch_size, world, suite.launch.micro_batch)
        saved = [c["after_forward"] - c["rss_before"] for c in steady if c["after_forward"] and c["rss_before"]]
        row.stages.append({"stage": name, **_calls(steady), "saved": max(saved) if saved else None,
                           "updated": mine[-1]["updated"], "ema": mine[0]["ema"], "b": plan.micro,
                           "per_rank": plan.per_rank, "steps": cfg.steps})
    fin = probes["finish"]
    if fin["evals"]:
        row.evals = {**_calls(fin["evals"]),
                     "s_per_forward": sum(c["s"] for c in fin["evals"]) / sum(c["forwards"] for c in fin["evals"])}
    if fin["samples"]:
        calls = sum(c["nfe"] * c["n"] for c in fin["samples"])
        row.sample = {**_calls(fin["samples"]), "b": sampling_batch(spec), "nfe": calls,
                      "s_per_call": sum(c["s"] for c in fin["samples"]) / max(calls, 1)}
    if not all(p.get("reset", True) for p in probes.values()):
        row.notes.append("peaks are the process's so far (the kernel does not let its high-water mark be reset)")
    return row


# ----------------------------------------------------------------------------- GPU projection
def weights(row: Row) -> int:
    return 4 * ((row.params or 0) + row.frozen)


def train_gpu(row: Row, b: int | None = None) -> tuple[int, int] | None:
    """(projected bytes per GPU, its batch) of the largest training stage; ``b``: at this
    per-GPU batch instead of the suite's."""
    best = None
    for s in row.stages:
        if s["work"] is None:
            continue
        bb = b or s["b"]
        act = max(s["work"] - 4 * s["updated"], s["saved"] or 0, 0)
        v = weights(row) + 12 * s["updated"] + 4 * s["ema"] + bb * act
        best = max(best or (v, bb), (v, bb))
    return best


def sample_gpu(row: Row, b: int | None = None) -> tuple[int, int] | None:
    if row.sample is None or row.sample["work"] is None:
        return None
    bb = b or row.sample["b"]
    return weights(row) + bb * row.sample["work"], bb


def step_gpu_s(row: Row, mfu: float, peak_tflops: float) -> float | None:
    """Projected seconds per optimizer step of the run's longest stage: 6·N_u·(per-GPU
    sequences × L) FLOPs at ``mfu`` of ``peak_tflops``."""
    if not row.stages:
        return None
    s = max(row.stages, key=lambda x: x["steps"])
    return 6.0 * s["updated"] * s["per_rank"] * row.seq_len / (mfu * peak_tflops * 1e12)


def versus(row: Row, base: Row | None, what) -> float | None:
    """``what(row)`` over ``what(base)`` at the row's batch (equal batch)."""
    mine = what(row)
    theirs = what(base, mine[1]) if base is not None and mine is not None else None
    return mine[0] / theirs[0] if theirs else None


def baseline_rows(rows: list[Row], baseline: str | None) -> dict[str, Row]:
    return {r.size: r for r in rows if r.method == baseline and r.status == "ok"}


# ----------------------------------------------------------------------------- output
def _gib(x) -> str:
    return "—" if x is None else f"{x / GIB:.2f} GiB"


def _n(x) -> str:
    return "—" if not x else f"{x / 1e6:.1f}M"


def _cells(r: Row, base: Row | None, st) -> list[str]:
    tr, sa = train_gpu(r), sample_gpu(r)
    x_tr, x_sa = versus(r, base, train_gpu), versus(r, base, sample_gpu)
    step = max(r.stages, key=lambda x: x["steps"]) if r.stages else None
    g = step_gpu_s(r, st.mfu, st.peak_tflops)
    return [r.size, r.label, r.run_id, "ok" if r.status == "ok" else f"FAILED: {r.error}",
            _n(r.params) + (f" + {_n(r.frozen)} frozen" if r.frozen else ""), _gib(r.peak_rss),
            f"{step['s']:.2f} s, {_gib(step['peak'])} (+{_gib(step['work'])})" if step else "—",
            f"{r.evals['s_per_forward']:.2f} s/forward, {_gib(r.evals['peak'])}" if r.evals else "—",
            f"{r.sample['s_per_call']:.2f} s/call, {_gib(r.sample['peak'])} (+{_gib(r.sample['work'])})"
            if r.sample else "—",
            f"{_gib(tr[0])} at {tr[1]}" if tr else "—", f"{x_tr:.2f}" if x_tr else "—",
            f"{_gib(sa[0])} at {sa[1]}" if sa else "—", f"{x_sa:.2f}" if x_sa else "—",
            f"{g:.3g} s" if g else "—", "; ".join(r.notes + ([f"resumed from {r.resumed}"] if r.resumed else []))]


COLUMNS = ["Size", "Model", "run", "result", "N params", "peak RSS", "train step (CPU): s, peak (+work)",
           "eval (CPU)", "sampling call (CPU): s, peak (+work)", "GPU train: GiB at b/GPU", "× AR",
           "GPU sampling: GiB at b", "× AR", "GPU s/step", "notes"]


def machine() -> str:
    name = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def table(suite, rows: list[Row], st):
    from bench.tables import Table

    base = baseline_rows(rows, suite.baseline)
    head = [f"Dress rehearsal of {suite.name} on {machine()} (torch threads: {st.threads or 'default'}): each "
            f"run at its size, L and V, batch 1, {st.steps} steps per stage (killed after the checkpoint at step "
            f"{st.steps - 1}, resumed), 1 evaluation block × K, 1 sample of {st.sample_steps} steps.", ""]
    notes = ["", f"GPU columns: projected at the suite's batch per GPU (× AR: over {suite.baseline or 'no baseline'} "
                 f"of the same size at the same batch); step time at MFU {st.mfu:.0%} of {st.peak_tflops:g} "
                 "TFLOP/s; how: docs/running.md#dress-rehearsal."]
    return Table("rehearsal", COLUMNS, [_cells(r, base.get(r.size), st) for r in rows], head=head, notes=notes,
                 empty="nothing rehearsed")


CSV_FIELDS = ["run_id", "label", "size", "method", "status", "error", "shared_with", "notes", "params",
              "params_frozen", "seq_len", "wall_s", "peak_rss_bytes", "train_s_per_step", "train_step_peak_bytes",
              "train_step_work_bytes", "train_forward_saved_bytes", "eval_s_per_forward", "eval_peak_bytes",
              "sample_s_per_call", "sample_peak_bytes", "sample_work_bytes", "gpu_train_bytes", "gpu_train_batch",
              "gpu_train_x_ar", "gpu_sample_bytes", "gpu_sample_batch", "gpu_sample_x_ar", "gpu_step_s", "resumed_from"]


def csv_text(suite, rows: list[Row], st) -> str:
    base = baseline_rows(rows, suite.baseline)
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        step = max(r.stages, key=lambda x: x["steps"]) if r.stages else {}
        tr, sa, ev, sm = train_gpu(r) or (None, None), sample_gpu(r) or (None, None), r.evals or {}, r.sample or {}
        w.writerow({"run_id": r.run_id, "label": r.label, "size": r.size, "method": r.method, "status": r.status,
                    "error": r.error, "shared_with": " ".join(r.shared), "notes": "; ".join(r.notes),
                    "params": r.params, "params_frozen": r.frozen, "seq_len": r.seq_len, "wall_s": r.wall_s,
                    "peak_rss_bytes": r.peak_rss, "train_s_per_step": step.get("s"),
                    "train_step_peak_bytes": step.get("peak"), "train_step_work_bytes": step.get("work"),
                    "train_forward_saved_bytes": step.get("saved"),
                    "eval_s_per_forward": ev.get("s_per_forward"), "eval_peak_bytes": ev.get("peak"),
                    "sample_s_per_call": sm.get("s_per_call"), "sample_peak_bytes": sm.get("peak"),
                    "sample_work_bytes": sm.get("work"), "gpu_train_bytes": tr[0], "gpu_train_batch": tr[1],
                    "gpu_train_x_ar": versus(r, base.get(r.size), train_gpu), "gpu_sample_bytes": sa[0],
                    "gpu_sample_batch": sa[1], "gpu_sample_x_ar": versus(r, base.get(r.size), sample_gpu),
                    "gpu_step_s": step_gpu_s(r, st.mfu, st.peak_tflops), "resumed_from": r.resumed})
    return buf.getvalue()


def write_outputs(out: Path, suite, rows: list[Row], st) -> str:
    """``rehearsal.md`` and ``rehearsal.csv`` in ``out`` (each written whole, atomically); the markdown."""
    from bench.records import atomic_write_text
    from bench.tables import md_table

    text = md_table(table(suite, rows, st))
    atomic_write_text(out / "rehearsal.md", text)
    atomic_write_text(out / "rehearsal.csv", csv_text(suite, rows, st))
    return text


def progress_line(i: int, n: int, r: Row) -> str:
    what = f"[{i}/{n}] {r.label} ({r.size}) {r.run_id}"
    if r.status != "ok":
        return f"{what}: FAILED: {r.error}"
    step = max(r.stages, key=lambda x: x["steps"]) if r.stages else None
    tr = train_gpu(r)
    return (f"{what}: ok in {r.wall_s:.0f} s; peak RSS {_gib(r.peak_rss)}"
            + (f"; {step['s']:.1f} s/step" if step else "; evaluated only")
            + (f"; GPU ≈ {_gib(tr[0])} at {tr[1]}/GPU" if tr else ""))
