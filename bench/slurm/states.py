"""Each run's honest state from its record, the ledger and the scheduler."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bench.index import scan
from bench.slurm.ledger import read_ledger
from bench.slurm.queue import LIVE, sacct, squeue

# ----------------------------------------------------------------------------- states
STATES = ("pending", "running", "requeued", "completed", "failed", "cancelled")


@dataclass
class RunState:
    run_id: str
    state: str            # one of STATES
    label: str = ""
    size: str = ""
    seed: Optional[int] = None
    job_id: Optional[str] = None
    detail: str = ""
    record: str = "pending"  # the run record's own status
    summary: Optional[dict] = None  # the record's summary in the results index (bench.index)

    @property
    def final(self) -> bool:
        return self.state in ("completed", "failed", "cancelled")


def run_states(out: Path, only: Optional[set[str]] = None, queue: Optional[dict] = None,
               use_sacct: bool = True, use_queue: bool = True) -> list[RunState]:
    """Each run's state from its record, the ledger and the scheduler (one squeue call, and one
    sacct call for jobs that left the queue without a final record). Records come from one
    pass of the results index (bench.index): only records changed since are re-read."""
    out = Path(out)
    recs, _ = scan(out)
    ledger, cancelled = read_ledger(out)
    ids = set(ledger)
    runs_dir = out / "runs"
    if runs_dir.is_dir():
        ids.update(p.name for p in runs_dir.iterdir() if p.is_dir())
    if only is not None:
        ids &= set(only)
    if queue is None and ledger and use_queue:
        queue = squeue()
    states, gone = [], []
    for rid in sorted(ids):
        rd = runs_dir / rid
        rec = recs.get(rid)
        rec_st = rec["status"] if rec else "corrupt" if (rd / "result.json").exists() else "pending"
        e = ledger.get(rid, {})
        st = RunState(rid, "pending", e.get("label", ""), e.get("size", ""), e.get("seed"), e.get("job_id"),
                      record=rec_st)
        if rec:
            st.label, st.size, st.seed = rec.get("label", st.label), rec.get("size", st.size), rec.get("seed")
            st.summary = rec
        q = (queue or {}).get(st.job_id) if st.job_id else None
        if rec_st == "complete":
            st.state = "completed"
        elif q is not None and q["state"] in LIVE:
            again = q["restarts"] > 0
            if q["state"] in ("RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT"):
                st.state = "running"
            elif again or q["state"].startswith("REQUEUE"):
                st.state = "requeued"
            else:
                st.state = "pending"
            st.detail = q["state"].lower() + (f", requeued {q['restarts']}×" if again else "") \
                + (f" ({q['reason']})" if q["reason"] and q["reason"] not in ("None", "(null)")
                   and q["state"] != "RUNNING" else "")
        elif rec_st == "failed":
            st.state = "failed"
            st.detail = str((rec or {}).get("error", ""))[:200]
        elif rec_st == "corrupt":
            st.state = "failed"
            st.detail = f"{rd / 'result.json'}: corrupt record"
        elif st.job_id and st.job_id in cancelled:
            st.state = "cancelled"
            st.detail = "cancelled with tdbench cancel"
        elif st.job_id and queue is not None:
            gone.append(st)  # left the queue without a final record: ask accounting why
        elif rec_st == "running":
            st.state = "running"
            st.detail = "no scheduler job (local run, or a process that died)"
        states.append(st)
    final = sacct([s.job_id for s in gone]) if (gone and use_sacct) else {}
    for s in gone:
        acct = final.get(s.job_id)
        if acct and acct.startswith("CANCELLED"):
            s.state, s.detail = "cancelled", "job cancelled (sacct: CANCELLED)"
        elif acct in LIVE:
            s.state, s.detail = ("running" if acct == "RUNNING" else "pending"), f"sacct: {acct}"
        else:
            s.state = "failed"
            s.detail = f"job {s.job_id} ended without a final record (sacct: {acct or 'unknown'})"
    return states
