"""Running suites: ``tdbench run``, ``submit`` (Slurm), ``status``, ``cancel`` and ``logs``."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from bench import live, slurm
from bench.cli.outdir import need_out, out_dir, score_suite_dir
from bench.errors import UserError
from bench.launch import check_launch, report_submission, run_suite
from bench.plan import DEFAULT_MFU, DEFAULT_PEAK_TFLOPS, render
from bench.suite import MAX_RUNS, load_suite
from bench.tracking import log_scores, settings_of

# Imported where used, to keep pandas out of CLI start-up: bench.leaderboard, bench.experiments, bench.report.


def cmd_run(args) -> int:
    from bench import leaderboard

    # validates everything before anything is written; a huge suite is refused before expanding it
    suite, specs = load_suite(args.suite, seeds=_seeds(args.seeds),
                              max_runs=None if args.dry_run or args.yes else MAX_RUNS)
    executor = args.executor or suite.launch.executor
    if args.cluster and executor != "slurm":
        if args.executor:
            raise UserError(f"--cluster: only for --executor slurm (not {executor})")
        executor = "slurm"
    if args.dry_run:
        if not 0 < args.mfu <= 1:
            raise UserError(f"--mfu: {args.mfu}: a fraction in (0, 1]")
        if args.peak_tflops <= 0:
            raise UserError(f"--peak-tflops: {args.peak_tflops}: must be positive")
        print(render(suite, specs, executor, args.cluster or suite.launch.cluster, args.mfu, args.peak_tflops))
        return 0
    out = out_dir(args, suite)
    t0 = time.time()
    status = run_suite(suite, specs, out, executor, cluster=args.cluster, max_running=args.max_running)
    if any(s.eval.samples > 0 or s.eval.infill is not None for s in specs):
        score_suite_dir(out, suite.metrics)
        log_scores(settings_of(suite), out, specs)
    text, problems = leaderboard.write(out, "md")
    print(text)
    if suite.experiment is not None:
        from bench.experiments import run_experiment, save_suite

        save_suite(out, suite)
        run_experiment(out, suite, log=lambda m: print(m, file=sys.stderr))
    from bench import report
    page = report.write(out)   # after the experiment: its plot is on the page too
    failed = [k for k, v in status.items() if v != "complete"]
    print(f"{len(status) - len(failed)}/{len(status)} runs complete in {time.time() - t0:.1f} s; "
          f"leaderboard: {out / 'leaderboard.md'}, {out / 'leaderboard.csv'}; report: {page}", file=sys.stderr)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if failed else (2 if problems else 0)


def _seeds(seeds: list[int] | None) -> list[int] | None:
    """``--seeds``, with the bounds of the suite's ``seeds:`` (bench.config.Seed)."""
    from pydantic import TypeAdapter, ValidationError

    from bench.config import Seed
    from bench.config_io import first_error

    try:
        return TypeAdapter(list[Seed]).validate_python(seeds) if seeds else None
    except ValidationError as e:
        raise UserError(f"--seeds: {first_error(e).split(': ', 1)[1]}") from None


def cmd_submit(args) -> int:
    suite, specs = load_suite(args.suite, max_runs=None if args.yes else MAX_RUNS)
    prof, path = slurm.load_profile(args.cluster)
    check_launch(suite, specs, "slurm")
    out = out_dir(args, suite)
    t0 = time.time()
    subs, queued, done = slurm.submit(suite, specs, out, prof, path, args.max_running)
    report_submission(subs, queued, prof)
    n = sum(len(x.job_ids) for x in subs)
    print(f"{suite.name}: {len(specs)} runs: {n} submitted, {len(queued)} already queued, {len(done)} complete "
          f"({time.time() - t0:.1f} s); `tdbench status {out}` follows them", file=sys.stderr)
    for x in subs:
        print(x.array_job_id)
    return 0


def cmd_status(args) -> int:
    """One line per run: pending / running / stopped / requeued / completed / failed /
    cancelled, with step/total, loss, tokens/s and ETA while it trains, from the run
    directories (records, progress, leases) and, for submitted runs, one squeue call.
    ``--watch`` follows the suite live until every run is over."""
    out = need_out(args.dir)
    if args.watch and args.interval <= 0:
        raise UserError(f"--interval: {args.interval}: must be positive")
    if args.watch:
        live.watch(out, interval_s=args.interval)
        return 0
    rs = live.rows(out)
    for r in rs:
        what = f"  {r.name}" if r.label else ""
        nums = f"  {live.numbers(r)}" if r.state not in live.FINAL and live.numbers(r) else ""
        job = f"  job {r.job_id}" if r.job_id else ""
        detail = f"  {r.detail}" if r.detail else ""
        print(f"{r.state:9s} {r.run_id}{what}{nums}{job}{detail}")
    print(live.totals(rs))
    return 0


def cmd_cancel(args) -> int:
    out = need_out(args.dir)
    ids = slurm.cancel(out)
    print(f"cancelled {len(ids)} job(s)" + (f": {' '.join(ids[:20])}{' …' if len(ids) > 20 else ''}" if ids else
                                            " (nothing queued)"))
    return 0


def _find_run(run: str, d: str | None) -> Path:
    p = Path(run)
    if (p / "spec.json").is_file() or (p / "result.json").is_file() or (p.parent.name == "runs" and p.is_dir()):
        return p
    roots = [Path(d)] if d else sorted(Path("runs").glob("*"))
    hits = sorted({q for r in roots for q in (r / "runs").glob(f"{run}*") if q.is_dir()})
    if not hits:
        hits = sorted({r / "runs" / rid for r in roots for rid in slurm.read_ledger(r)[0] if rid.startswith(run)})
    if not hits:
        raise UserError(f"logs RUN: no run '{run}' under {', '.join(str(r) for r in roots) or 'runs/'} "
                        "(give a run directory, or --dir DIR with a run id)")
    if len(hits) > 1:
        raise UserError(f"logs RUN: '{run}' matches {len(hits)} runs: {', '.join(h.name for h in hits[:5])}")
    return hits[0]


def cmd_logs(args) -> int:
    rd = _find_run(args.run, args.dir)
    out = rd.parent.parent
    shown = False

    def show(path: Path, title: str):
        nonlocal shown
        if not path.is_file():
            return
        lines = path.read_text(errors="replace").splitlines()
        print(f"==> {title}: {path} ({len(lines)} lines{', last ' + str(args.tail) if len(lines) > args.tail else ''})")
        print("\n".join(lines[-args.tail:]))
        shown = True

    show(rd / "log.txt", "run log")
    entry = slurm.read_ledger(out)[0].get(rd.name)
    if entry:
        for p in slurm.job_log_paths(out, entry["job_id"]):
            task = p.name.split("_log.")[0].rsplit("_", 1)[-1]
            if args.task is None or str(args.task) == task:
                show(p, f"job {entry['job_id']} task {task} {'stdout' if p.suffix == '.out' else 'stderr'}")
    if not shown:
        print(f"{rd}: no logs yet" + (f" (job {entry['job_id']} has not started)" if entry else ""))
    return 0


def register(sub) -> None:
    r = sub.add_parser("run", help="run every incomplete run of a suite, then write the leaderboard")
    r.add_argument("suite")
    r.add_argument("--out", help="output dir (default runs/<suite name>)")
    r.add_argument("--executor", choices=["local", "debug", "slurm"])
    r.add_argument("--cluster", help="slurm cluster profile (name in slurm/ or a path); implies --executor slurm")
    r.add_argument("--max-running", type=int, help="slurm: array tasks running at once (default: the profile's)")
    r.add_argument("--dry-run", action="store_true",
                   help="print each run, its resources and estimated GPU-hours; run and write nothing")
    r.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                   help=f"dry run: assumed model FLOPs utilisation (default {DEFAULT_MFU})")
    r.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                   help=f"dry run: assumed peak TFLOP/s per GPU (default {DEFAULT_PEAK_TFLOPS:g}, A100 bf16)")
    r.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="run these seeds instead of the suite's seeds: (e.g. --seeds 0 1 2)")
    r.add_argument("--yes", action="store_true", help=f"run a suite of more than {MAX_RUNS:,} runs")
    r.set_defaults(fn=cmd_run)
    s = sub.add_parser("submit", help="queue a suite's incomplete runs on Slurm (job arrays) and return")
    s.add_argument("suite")
    s.add_argument("--cluster", required=True, help="cluster profile: a name in slurm/ or a path")
    s.add_argument("--out", help="output dir (default runs/<suite name>)")
    s.add_argument("--max-running", type=int, help="array tasks running at once (default: the profile's)")
    s.add_argument("--yes", action="store_true", help=f"submit a suite of more than {MAX_RUNS:,} runs")
    s.set_defaults(fn=cmd_submit)
    st = sub.add_parser("status", help="state of each run in an output dir (records + scheduler)")
    st.add_argument("dir")
    st.add_argument("--watch", action="store_true", help="follow the suite live until every run is over")
    st.add_argument("--interval", type=float, default=2.0, help="--watch: seconds between refreshes (default 2)")
    st.set_defaults(fn=cmd_status)
    c = sub.add_parser("cancel", help="cancel the queued Slurm jobs of an output dir")
    c.add_argument("dir")
    c.set_defaults(fn=cmd_cancel)
    lg = sub.add_parser("logs", help="a run's log and its Slurm job's stdout/stderr")
    lg.add_argument("run", help="a run directory, or a run id (prefix)")
    lg.add_argument("--dir", help="output dir to look the run id up in (default: every runs/*)")
    lg.add_argument("--tail", type=int, default=60, help="last N lines of each log (default 60)")
    lg.add_argument("--task", type=int, help="only this task (rank) of the job")
    lg.set_defaults(fn=cmd_logs)
