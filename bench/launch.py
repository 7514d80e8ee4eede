"""Executors: where run processes start. The harness code inside a run is identical.

- ``debug``: in this process, one run after another.
- ``local`` (default): each run in its own subprocess through submitit's LocalExecutor, at most
  ``launch.parallel`` at a time, each with ``launch.threads`` torch threads.
- ``slurm``: submitit job arrays on a cluster profile (bench.slurm); ``run`` submits, then
  waits with a progress display, reading the run records and the scheduler's queue.

A run is ``launch.nodes × launch.tasks_per_node`` processes wherever it starts (the local
executor starts them on this machine; debug runs one process in this one, which computes the
same numbers since the global batch never depends on the world size). Each process builds its
distributed state from its environment (bench.distributed).

The run records are the truth: a job that dies without writing its record (SIGKILL, OOM) is
recorded here as failed with its log tail; one failed run never stops the others.
"""
from __future__ import annotations

import contextlib
import re
import secrets
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from bench.config import RunSpec, Suite
from bench.errors import UserError
from bench.lease import describe_lease, lease_state, read_lease
from bench.records import private_dir, read_record, record_status, usable_cores, write_record
from bench.rundir import check_run_dirs, holders, plan, run_dir
from bench.runner import execute, now, record_header
from bench.tracking import check_installed, settings_of


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def _record_crash(rd: Path, spec: RunSpec, error: str, log_tail: str) -> None:
    """A job ended without a final record: write a failed one (keeping what it wrote)."""
    try:
        rec = read_record(rd / "result.json")
        if rec["status"] in ("complete", "failed"):
            return
    except UserError:
        rec = record_header(spec)
    write_record(rd / "result.json", {**rec, "status": "failed", "error": error, "log_tail": log_tail,
                                      "finished": now()})


def world_size(suite: Suite) -> int:
    return suite.launch.nodes * suite.launch.tasks_per_node


def check_launch(suite: Suite, specs: list[RunSpec], executor: str) -> None:
    """What can be known before anything starts: the batch splits over the processes, the
    engine and the experiment trackers are installed, the engine fits the settings. UserError
    naming the key otherwise."""
    from bench.distributed import batch_plan

    check_installed(suite.launch.log_with)

    world = world_size(suite) if executor != "debug" else 1
    for s in specs:
        for st in s.train.stages:   # each stage of a multi-stage method splits its own batch
            try:
                batch_plan(s.train.for_stage(st).batch_size, world, suite.launch.micro_batch)
            except UserError as e:
                msg = str(e).replace("train.batch_size:", f"train.stages.{st}.batch_size:", 1)
                raise UserError(f"{msg} ({s.label}, stage {st})") from None
        batch_plan(s.train.batch_size, world, suite.launch.micro_batch)
        if s.train.engine == "ddp" and s.train.zero_stage:
            raise UserError(f"train.zero_stage: {s.train.zero_stage} needs train.engine: deepspeed")
        if s.train.engine == "deepspeed":
            import importlib.util

            if importlib.util.find_spec("deepspeed") is None:
                raise UserError("train.engine: deepspeed is not installed (pip install 'tdbench[deepspeed]')")
            if s.train.zero_stage == 3 and s.train.ema > 0:
                raise UserError("train.ema: EMA is not supported with ZeRO-3; use zero_stage 1 or 2")


def _outcome(rd: Path) -> str | None:
    """What a finished job left: 'complete'/'failed' from its record, 'held' when another
    process holds the run's lease (the job did nothing), None when it left no final record.
    Read from the run directory, never from submitit's result pickle."""
    st = record_status(rd)
    if st in ("complete", "failed"):
        return st
    if lease_state(read_lease(rd)) == "held":
        return "held"
    return None


def run_local(specs: list[RunSpec], out: Path, suite: Suite, progress) -> dict[str, str]:
    import submitit

    cores = usable_cores()
    tasks = world_size(suite)
    parallel = suite.launch.parallel or max(1, min(len(specs), cores // tasks))
    threads = suite.launch.threads or max(1, cores // (parallel * tasks))
    # One flat folder for every job's files (named <job id>_…): submitit's controller opens its
    # log inside the job folder that the submitting process creates only after starting it, so a
    # per-job folder (".submitit/%j") races with a loaded machine and loses the run (seen:
    # FileNotFoundError on .submitit/<pid>/<pid>_0_log.out). A folder that exists beforehand has
    # no such race. It is keyed by host and a random id (job ids are PIDs, which two hosts or
    # containers sharing --out reuse) and private (0700): the jobs unpickle what is in it.
    folder = private_dir(Path(out) / ".submitit" / f"{_host()}-{secrets.token_hex(6)}")
    ex = submitit.LocalExecutor(folder=str(folder))
    ex.update_parameters(timeout_min=suite.launch.timeout_min, tasks_per_node=tasks)
    queue, running, status = list(specs), {}, {}
    with _stop_jobs_on_exit(running):
        _run_local_loop(queue, running, status, ex, out, suite, threads, parallel, progress)
    return status


class _Terminated(KeyboardInterrupt):
    """SIGTERM to ``tdbench run`` (kill, a batch system ending the job that runs it): handled
    as Ctrl-C is."""


@contextlib.contextmanager
def _stop_jobs_on_exit(running: dict):
    """Local runs are this process's children: when it ends on any exception (Ctrl-C, SIGTERM,
    or an error of its own) they are stopped too (submitit's cancel: SIGINT to each job, which
    ends its task; the run's last checkpoint stays, so rerunning the command resumes). Without
    this they went on training, detached, holding their leases: a SIGTERM because the training
    loop treats it as a preemption notice, any other exception because nothing cancelled them."""
    def on_term(signum, frame):
        raise _Terminated()

    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, on_term) if main else None
    try:
        yield
    except BaseException:
        for _, job in list(running.values()):
            try:
                job.cancel(check=False)
            except Exception:  # noqa: BLE001 - a job that already ended
                pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(job.done() for _, job in running.values()):
            time.sleep(0.2)
        if running:
            print(f"stopped {len(running)} local run(s): " + ", ".join(running), file=sys.stderr)
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def _sigint_inheritable():
    """SIGINT not ignored while a local job's processes start. ``tdbench run`` started in the
    background by a non-interactive shell (``tdbench run … &`` in a script) has SIGINT ignored,
    and an ignored signal stays ignored across fork and exec: submitit's cancel (SIGINT to the
    job's controller) then did nothing, and a stopped ``tdbench run`` left its runs training.
    A handler, unlike SIG_IGN, is reset to the default by exec, so the jobs start with Ctrl-C's
    usual meaning; this process's own SIGINT is ignored again afterwards."""
    main = threading.current_thread() is threading.main_thread()
    ignored = main and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_local_loop(queue, running, status, ex, out, suite, threads, parallel, progress) -> None:
    while queue or running:
        while queue and len(running) < parallel:
            s = queue.pop(0)
            with _sigint_inheritable():
                job = ex.submit(execute, s.model_dump(mode="json"), str(run_dir(out, s)), threads,
                                suite.launch.micro_batch, settings_of(suite))
            running[s.run_id] = (s, job)
        time.sleep(0.5)
        for rid, (s, job) in list(running.items()):
            if not job.done():
                continue
            del running[rid]
            rd = run_dir(out, s)
            got = _outcome(rd)
            if got is None:  # the subprocess died (killed, OOM, timeout) before its final record
                tail = ""
                try:
                    tail = "\n".join((job.stderr() or "").splitlines()[-20:])
                except Exception:  # noqa: BLE001
                    pass
                last = tail.strip().splitlines()[-1][:300] if tail.strip() else "no final record"
                _record_crash(rd, s, f"job {job.job_id} ended abnormally: {last}", tail)
                got = "failed"
            status[rid] = got
            progress(s, status[rid])


def run_debug(specs: list[RunSpec], out: Path, suite: Suite, progress) -> dict[str, str]:
    if world_size(suite) > 1:
        print(f"debug executor: one process instead of {world_size(suite)} (same global batch)", file=sys.stderr)
    status = {}
    for s in specs:
        # A run's own chatter (third-party warnings printed to stdout, e.g. DeepSpeed's
        # accelerator notice when it is installed) goes to stderr, as a local run's goes to its
        # log: this command's stdout carries only the leaderboard.
        with contextlib.redirect_stdout(sys.stderr):
            status[s.run_id] = execute(s.model_dump(mode="json"), run_dir(out, s), suite.launch.threads,
                                       suite.launch.micro_batch, settings_of(suite))
        progress(s, status[s.run_id])
    return status


def run_slurm(specs: list[RunSpec], out: Path, suite: Suite, progress, cluster: str | None = None,
              max_running: int | None = None, poll_s: float = 2.0) -> dict[str, str]:
    """Submit (job arrays), then wait: the run records and the queue tell when each run is
    over. A job that leaves the queue without a final record is recorded as failed with its
    log tail; nothing waits on submitit's job.result()."""
    from bench import slurm

    name = cluster or suite.launch.cluster
    if not name:
        name = "dev"
        print("slurm: no --cluster or launch.cluster given: using the dev profile (slurm/dev.yaml)",
              file=sys.stderr)
    prof, path = slurm.load_profile(name)
    subs, queued, _ = slurm.submit(suite, specs, out, prof, path, max_running)
    report_submission(subs, queued, prof)
    by_id = {s.run_id: s for s in specs}
    waiting = set(by_id)
    status: dict[str, str] = {}
    gone_since: dict[str, float] = {}
    last = None
    try:
        while waiting:
            states = slurm.run_states(out, only=waiting)
            now_t = time.monotonic()
            for st in states:
                if not st.final:
                    gone_since.pop(st.run_id, None)
                    continue
                if st.state != "completed" and st.record != "failed":
                    # no final record: give the record a moment (accounting lags), then write it
                    if now_t - gone_since.setdefault(st.run_id, now_t) < 10:
                        continue
                    s = by_id[st.run_id]
                    if lease_state(read_lease(run_dir(out, s))) == "held":
                        status[st.run_id] = "held"  # another process trains it: not a failure
                        waiting.discard(st.run_id)
                        continue
                    tail = ""
                    for p in slurm.job_log_paths(out, st.job_id or "-")[-1:]:
                        tail = "\n".join(p.read_text(errors="replace").splitlines()[-20:])
                    _record_crash(run_dir(out, s), s, st.detail or f"job {st.job_id} {st.state}", tail)
                status[st.run_id] = "complete" if st.state == "completed" else "failed"
                waiting.discard(st.run_id)
                progress(by_id[st.run_id], status[st.run_id] if st.state != "cancelled" else "cancelled")
            counts = {}
            for st in states:
                if not st.final:
                    counts[st.state] = counts.get(st.state, 0) + 1
            line = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
            if waiting and line and line != last:
                print(f"slurm: {line}; {len(status)}/{len(by_id)} done", file=sys.stderr, flush=True)
                last = line
            if waiting:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        print(f"stopped waiting; the jobs stay queued: `tdbench status {out}` shows them, "
              f"`tdbench cancel {out}` cancels them", file=sys.stderr)
        raise
    return status


def report_submission(subs, queued: dict, prof) -> None:
    for sub in subs:
        ids = sub.job_ids
        span = ids[0] if len(ids) == 1 else f"{ids[0]} … {ids[-1]}"
        print(f"slurm: submitted {len(ids)} run(s) as job array {sub.array_job_id} on {prof.name} "
              f"(partition {prof.partition}, {sub.shape.nodes}×{sub.shape.tasks_per_node} tasks, "
              f"{sub.shape.cpus_per_task} CPU/task, {sub.shape.time_min} min): {span}", file=sys.stderr)
    if queued:
        print(f"slurm: {len(queued)} run(s) already queued, not submitted again: "
              f"{', '.join(sorted(set(queued.values()))[:10])}{' …' if len(set(queued.values())) > 10 else ''}",
              file=sys.stderr)


EXECUTORS = {"local": run_local, "debug": run_debug, "slurm": run_slurm}


def run_suite(suite: Suite, specs: list[RunSpec], out: Path, executor: str, cluster: str | None = None,
              max_running: int | None = None, live: bool | None = None, poll_s: float = 2.0) -> dict[str, str]:
    """Run every incomplete run; runs another process is training (a live lease) are waited
    for, not trained twice: when its lease goes, a run the other process completed counts as
    complete, one it left unfinished is trained here (resuming from its checkpoint)."""
    from bench.live import Monitor

    check_launch(suite, specs, executor)
    if executor not in EXECUTORS:
        raise UserError(f"--executor {executor}: one of {sorted(EXECUTORS)}")
    todo, done = plan(specs, out)
    check_run_dirs(out, todo)
    held = holders(out, todo)
    print(f"{suite.name}: {len(specs)} runs, {len(done)} complete, {len(todo) - len(held)} to run"
          f"{f', {len(held)} held by other processes' if held else ''} ({executor} executor) -> {out}",
          file=sys.stderr)
    status = {s.run_id: "complete" for s in done}
    if not todo:
        return status
    by_id = {s.run_id: s for s in specs}
    monitor = Monitor(out, specs, executor=executor, live=live)
    n = [len(done)]

    def progress(spec, st):
        if st == "held":
            return
        n[0] += 1
        monitor.event(f"[{n[0]}/{len(specs)}] {spec.label} {spec.size} seed={spec.seed}: {st}")

    pending = list(todo)
    with monitor:
        while pending:
            free = [s for s in pending if s.run_id not in held]
            if free:
                if executor == "slurm":
                    got = run_slurm(free, out, suite, progress, cluster, max_running)
                else:
                    got = EXECUTORS[executor](free, out, suite, progress)
                status.update({k: v for k, v in got.items() if v != "held"})
                held.update({k: read_lease(run_dir(out, by_id[k])) or {} for k, v in got.items() if v == "held"})
            waiting = [s for s in pending if s.run_id not in status]
            if not waiting:
                break
            for s in waiting:
                lease = held.get(s.run_id) or {}
                monitor.event(f"waiting: {s.label} {s.size} seed={s.seed} is being trained by another process "
                              f"({describe_lease(lease) if lease else 'lease taken meanwhile'})")
            while any(lease_state(read_lease(run_dir(out, s))) == "held" for s in waiting):
                time.sleep(poll_s)
            pending = []
            for s in waiting:
                if record_status(run_dir(out, s)) == "complete":
                    status[s.run_id] = "complete"
                    progress(s, "complete (trained by the other process)")
                else:
                    pending.append(s)  # left unfinished: train it here, from its checkpoint
            held = holders(out, pending)
    return status
