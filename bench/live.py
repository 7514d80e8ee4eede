"""The live view of a suite: one line per run — state, step/total, loss, tokens/s, ETA, who
trains it — plus totals, read only from what each run writes to its directory
(``result.json``, ``progress.json``, ``lease.json``) and, for submitted runs, the scheduler's
queue (bench.slurm.states). It therefore works the same for the local, debug and Slurm
executors, and for a suite started elsewhere (``tdbench status DIR --watch``).

On a terminal it is a rich table redrawn in place; otherwise (CI logs, pipes) it prints one
plain line per event: a run starts, passes 25/50/75% of its steps, starts evaluating, ends.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bench.lease import describe_lease, lease_state, read_lease
from bench.records import JSON_ERRORS
from bench.rundir import PROGRESS

FINAL = ("completed", "failed", "cancelled")


@dataclass
class Row:
    run_id: str
    label: str
    size: str
    seed: Optional[int]
    state: str
    step: Optional[int] = None
    total: Optional[int] = None
    loss: Optional[float] = None
    tok_s: Optional[float] = None
    eta_s: Optional[float] = None
    phase: Optional[str] = None
    where: str = ""
    detail: str = ""
    job_id: Optional[str] = None

    @property
    def name(self) -> str:
        return f"{self.label} {self.size} seed={self.seed}" if self.label else self.run_id


def _progress(rd: Path) -> dict:
    try:
        p = json.loads((rd / PROGRESS).read_bytes().decode("utf-8"))
        return p if isinstance(p, dict) else {}
    except (OSError, *JSON_ERRORS):
        return {}


def rows(out: Path, specs=None, scheduler: bool = True) -> list[Row]:
    """One Row per run of ``out`` (and per spec not started yet)."""
    from bench.slurm.states import run_states

    out = Path(out)
    only = {s.run_id for s in specs} if specs is not None else None
    states = {st.run_id: st for st in run_states(out, only=only, use_sacct=False, use_queue=scheduler)}
    out_rows = []
    ids = [s.run_id for s in specs] if specs is not None else sorted(states)
    by_spec = {s.run_id: s for s in specs} if specs is not None else {}
    for rid in ids:
        st = states.get(rid)
        sp = by_spec.get(rid)
        row = Row(rid, st.label if st and st.label else (sp.label if sp else ""),
                  st.size if st and st.size else (sp.size if sp else ""),
                  st.seed if st and st.seed is not None else (sp.seed if sp else None),
                  st.state if st else "pending", detail=st.detail if st else "", job_id=st.job_id if st else None)
        if sp is not None:
            row.total = sp.train.total_steps
        tr = (st.summary or {}).get("train") if st else None
        if row.state in FINAL and isinstance(tr, dict):  # what the record says it did
            row.step, row.total = tr.get("steps"), row.total or tr.get("steps")
            row.loss, row.tok_s = tr.get("final_loss"), tr.get("tokens_per_s")
        if row.state not in FINAL:
            rd = out / "runs" / rid
            lease = read_lease(rd)
            ls = lease_state(lease)
            if ls == "held":
                row.where = describe_lease(lease).split(", heartbeat")[0]
                if row.state == "pending" or (st and st.record == "pending"):
                    row.state = "running"
            elif row.state == "running" and not (st and st.job_id):
                row.state = "stopped"  # its process is gone; the next `tdbench run` resumes it
                row.detail = "interrupted: rerun to resume from its checkpoint"
            p = _progress(rd) if row.state in ("running", "requeued", "stopped") else {}
            row.step, row.total = p.get("step", row.step), p.get("total", row.total)
            row.loss, row.tok_s, row.phase = p.get("loss"), p.get("tokens_per_s"), p.get("phase")
            row.eta_s = p.get("eta_s") if row.state == "running" else None
        out_rows.append(row)
    return out_rows


def _fmt_s(s: Optional[float]) -> str:
    if s is None:
        return ""
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def totals(rs: list[Row]) -> str:
    counts: dict[str, int] = {}
    for r in rs:
        counts[r.state] = counts.get(r.state, 0) + 1
    tok = sum(r.tok_s or 0 for r in rs if r.state == "running")
    etas = [r.eta_s for r in rs if r.state == "running" and r.eta_s is not None]
    s = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no runs"
    if tok:
        s += f"; {tok:,.0f} tokens/s in all"
    if etas:
        s += f"; running runs done in ~{_fmt_s(max(etas))}"
    return s


def table(rs: list[Row], title: str = ""):
    """The rich table; every text from a run directory (labels, hosts, errors) and the title
    (a path) is escaped, so ``[x0]`` shows as written and ``MDLM [/]`` is no markup error."""
    from rich.markup import escape
    from rich.table import Table

    colour = {"completed": "green", "failed": "red", "cancelled": "yellow", "running": "cyan",
              "requeued": "magenta", "stopped": "yellow"}
    t = Table(title=escape(title) or None, caption=escape(totals(rs)), expand=False, pad_edge=False)
    for c, just in (("run", "left"), ("state", "left"), ("step", "right"), ("loss", "right"),
                    ("tok/s", "right"), ("ETA", "right"), ("where / detail", "left")):
        t.add_column(c, justify=just, no_wrap=c != "where / detail")
    for r in rs:
        step = f"{r.step}/{r.total}" if r.step is not None and r.total else (f"–/{r.total}" if r.total else "")
        state = r.state + (f" ({stage_of(r.phase) or r.phase})" if (r.phase in ("setup", "eval") or stage_of(r.phase))
                           and r.state == "running" else "")
        t.add_row(escape(r.name), f"[{colour.get(r.state, 'white')}]{escape(state)}[/]", step,
                  f"{r.loss:.3f}" if r.loss is not None else "", f"{r.tok_s:,.0f}" if r.tok_s else "",
                  _fmt_s(r.eta_s), escape(r.where or r.detail[:60]))
    return t


def stage_of(phase: Optional[str]) -> Optional[str]:
    """The stage a multi-stage run trains now (its progress phase is ``train:<stage>``; its
    step/total are that stage's)."""
    return phase.split(":", 1)[1] if isinstance(phase, str) and phase.startswith("train:") else None


def numbers(r: Row) -> str:
    """``step 120/800, loss 5.123, 8,000 tok/s, ETA 1:25, host pid 123`` (``stage diffusion,
    step 120/800, ...`` for a stage of a multi-stage run)."""
    bits = []
    if stage_of(r.phase) and r.state == "running":
        bits.append(f"stage {stage_of(r.phase)}")
    if r.step is not None and r.total:
        bits.append(f"step {r.step}/{r.total}")
    if r.loss is not None:
        bits.append(f"loss {r.loss:.3f}")
    if r.tok_s:
        bits.append(f"{r.tok_s:,.0f} tok/s")
    if r.eta_s is not None:
        bits.append(f"ETA {_fmt_s(r.eta_s)}")
    if r.where:
        bits.append(r.where)
    return ", ".join(bits)


def plain_line(r: Row) -> str:
    n = numbers(r)
    return f"{r.name}: {r.state}" + (f", {n}" if n else "")


class EventLog:
    """Plain output: a line when a run's state or phase changes or it passes a quarter."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.seen: dict[str, tuple] = {}

    def update(self, rs: list[Row], final_too: bool = False) -> None:
        for r in rs:
            quarter = int(4 * r.step / r.total) if r.step is not None and r.total else None
            key = (r.state, r.phase, quarter)
            old = self.seen.get(r.run_id)
            self.seen[r.run_id] = key
            if old == key or (old is None and r.state in ("pending",)):
                continue
            if r.state in FINAL and not final_too:
                continue  # the launcher reports ends itself
            what = "evaluating" if r.phase == "eval" and r.state == "running" else None
            line = plain_line(r) if what is None else f"{r.name}: evaluating"
            print(line, file=self.stream, flush=True)


class Monitor:
    """Shows the live view while a suite runs (a thread polls the run directories)."""

    def __init__(self, out: Path, specs, executor: str = "local", live: Optional[bool] = None,
                 interval_s: float = 1.0, stream=None):
        self.out, self.specs, self.interval = Path(out), list(specs), interval_s
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.scheduler = executor == "slurm"
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._rich = None
        self.events = EventLog(self.stream)
        self._lock = threading.Lock()

    def _rows(self) -> list[Row]:
        return rows(self.out, self.specs, scheduler=self.scheduler)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                rs = self._rows()
            except Exception:  # noqa: BLE001 - a view must never take the suite down
                continue
            with self._lock:
                if self._rich is not None:
                    self._rich.update(table(rs))
                else:
                    self.events.update(rs)

    def event(self, msg: str) -> None:
        with self._lock:
            if self._rich is not None:
                self._rich.console.print(msg, markup=False, highlight=False)  # labels are text, not markup
            else:
                print(msg, file=self.stream, flush=True)

    def __enter__(self):
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self._rich = Live(table(self._rows()), console=Console(file=self.stream), refresh_per_second=2,
                              transient=False)
            self._rich.start()
        else:
            self.events.update(self._rows())
        self._thread = threading.Thread(target=self._loop, daemon=True, name="tdbench-live")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._rich is not None:
            try:
                self._rich.update(table(self._rows()))
            except Exception:  # noqa: BLE001
                pass
            self._rich.stop()


def watch(out: Path, interval_s: float = 2.0, live: Optional[bool] = None, stream=None) -> list[Row]:
    """``tdbench status DIR --watch``: follow a suite started anywhere until every run is over."""
    stream = stream or sys.stdout
    live = stream.isatty() if live is None else live
    rs = rows(out)
    if live:
        from rich.console import Console
        from rich.live import Live

        with Live(table(rs, title=str(out)), console=Console(file=stream), refresh_per_second=2) as lv:
            while rs and not all(r.state in FINAL for r in rs):
                time.sleep(interval_s)
                rs = rows(out)
                lv.update(table(rs, title=str(out)))
        return rs
    ev = EventLog(stream)
    for r in rs:
        print(plain_line(r), file=stream, flush=True)
    ev.update(rs, final_too=True)
    while rs and not all(r.state in FINAL for r in rs):
        time.sleep(interval_s)
        rs = rows(out)
        ev.update(rs, final_too=True)
    print(totals(rs), file=stream, flush=True)
    return rs
