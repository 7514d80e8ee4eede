"""What the runs produced: ``tdbench leaderboard``, ``report``, ``score``, ``sample`` and ``experiment``."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.cli.outdir import need_out, score_suite_dir
from bench.errors import UserError
from bench.records import read_record

# Imported where used, to keep torch and pandas out of CLI start-up: torch, bench.metrics.score,
# bench.samples (torch, to draw); bench.leaderboard, bench.tables, bench.experiments, bench.report (pandas);
# and pydantic out of `tdbench leaderboard`: bench.config, bench.data, bench.metrics.


def cmd_leaderboard(args) -> int:
    from bench import leaderboard, tables

    out = need_out(args.dir)
    compare = None
    if args.compare:  # resolved and parsed before anything is written
        compare = tables.resolve_reference(args.compare)
        tables.read_reference(compare)
    text, problems = leaderboard.write(out, args.format, compare=compare)
    print(text, end="" if text.endswith("\n") else "\n")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 2 if problems else 0


def cmd_report(args) -> int:
    """``DIR/report.html``: the leaderboards, plots, settings, runs and samples on one page."""
    from bench import report, tables

    out = need_out(args.dir)
    if args.samples is not None and args.samples < 1:
        raise UserError("--samples: must be a positive integer")
    compare = None
    if args.compare:
        compare = tables.resolve_reference(args.compare)
        tables.read_reference(compare)
    print(report.write(out, compare=compare, samples=args.samples or report.DEFAULT_SAMPLES))
    return 0


def _scoring_config(args, base):
    from bench.config import DatasetRef
    from bench.data import dataset_params

    cfg = base
    if args.scorer:
        cfg = cfg.model_copy(update={"gen_ppl": cfg.gen_ppl.model_copy(update={"scorer": args.scorer})})
    if args.reference:
        dataset_params(DatasetRef(name=args.reference), "--reference")
        cfg = cfg.model_copy(update={"reference": cfg.reference.model_copy(update={"dataset": args.reference})})
    return cfg


def cmd_score(args) -> int:
    from bench.metrics import MetricsConfig
    from bench.metrics.score import SCORES, metrics_config_of, read_scores, score_file, score_run
    from bench.metrics.scoreview import score_json, score_rows, score_table, score_values

    p = Path(args.path)
    if p.is_file():
        res = score_file(p, _scoring_config(args, MetricsConfig()), args.reference)
        if args.format == "json":
            print(json.dumps(score_json(res), indent=2))
        else:
            print(score_table(score_rows(p.name, res)))
        return 0
    if (p / "result.json").is_file():
        cfg = _scoring_config(args, metrics_config_of(p.parent.parent))
        old = read_scores(p)
        res = score_run(p, cfg, reuse=False)
        if res is None:
            raise UserError(f"{p}: no {p.name}/samples.jsonl (draw some with `tdbench sample {p}`)")
        results = {p.name: res}
        olds = {p.name: old}
    elif (p / "runs").is_dir():
        cfg = _scoring_config(args, metrics_config_of(p))
        olds = {q.parent.name: read_scores(q.parent) for q in (p / "runs").glob(f"*/{SCORES}")}
        results = score_suite_dir(p, cfg, reuse=False)
        from bench import leaderboard
        leaderboard.write(p)
    else:
        raise UserError(f"{p}: not a JSONL sample file, a run directory or a tdbench output directory")
    if args.format == "json":
        print(json.dumps([score_json(r) for r in results.values()], indent=2))
    else:
        rows, seen = [], set()
        for r in results.values():
            for row in score_rows(r["label"], r):
                key = (row[0], json.dumps(row[1], sort_keys=True)) if row[0] == "Source text" else None
                if key is None or key not in seen:
                    rows.append(row)
                    seen.add(key)
        print(score_table(rows))
    same = [k for k, r in results.items() if olds.get(k) and score_values(olds[k]) == score_values(r)]
    diff = [k for k, r in results.items() if olds.get(k) and score_values(olds[k]) != score_values(r)]
    if same or diff:
        print(f"{len(same)} run(s) reproduced their stored scores exactly" +
              (f"; changed: {', '.join(diff)}" if diff else ""), file=sys.stderr)
    return 0


def _step_budgets(text: str | None) -> list[int] | None:
    """``--steps 16,64``: positive integers, comma-separated (None: the run's own budgets)."""
    if not text:
        return None
    try:
        steps = [int(x) for x in text.split(",")]
    except ValueError:
        steps = None
    if steps is None or any(x < 1 for x in steps):
        raise UserError(f"--steps: expected positive integers separated by commas, got '{text}'")
    return steps


def cmd_sample(args) -> int:
    """Draw (or extend) samples of complete runs from their final weights, then score them."""
    from bench.data import get_tokenizer
    from bench.metrics.score import metrics_config_of
    from bench.samples import load_final_method, write_run_samples

    p = Path(args.dir)
    if (p / "result.json").is_file():
        runs, out = [p], p.parent.parent
    elif (p / "runs").is_dir():
        runs, out = sorted(q.parent for q in (p / "runs").glob("*/result.json")), p
    else:
        raise UserError(f"{p}: not a run directory or a tdbench output directory")
    steps = _step_budgets(args.steps)
    if args.n is not None and args.n < 1:
        raise UserError("--n: must be a positive integer")
    drawn = 0
    for rd in runs:
        try:
            if read_record(rd / "result.json")["status"] != "complete":
                continue
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        method, spec = load_final_method(rd)
        if "sampling" not in method.supports():
            continue
        n = args.n or spec.eval.samples or 16
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        k = write_run_samples(method, spec, get_tokenizer(spec.data), rd, n=n, steps=steps,
                              log=lambda m, s=spec: print(f"{s.label} {s.size} seed={s.seed}: {m}", file=sys.stderr))
        drawn += 1
        print(f"{rd}/samples.jsonl: {k} samples")
    if not drawn:
        raise UserError(f"{p}: no complete run that can sample")
    if not args.no_score:
        cfg = metrics_config_of(out)
        if (out / "runs").is_dir():
            score_suite_dir(out, cfg)
        from bench import leaderboard
        leaderboard.write(out)
        print(f"scored; leaderboard: {out / 'leaderboard.md'}", file=sys.stderr)
    return 0


def cmd_experiment(args) -> int:
    """Rerun a suite's ``experiment:`` analysis on its output directory (no training)."""
    from bench.experiments import load_saved_suite, run_experiment

    out = need_out(args.dir)
    suite = load_saved_suite(out)
    if suite.experiment is None:
        raise UserError(f"{out}: its suite has no experiment: key")
    print(run_experiment(out, suite, log=lambda m: print(m, file=sys.stderr)))
    return 0


def register(sub) -> None:
    lb = sub.add_parser("leaderboard", help="(re)generate the leaderboard of an output dir")
    lb.add_argument("dir")
    lb.add_argument("--format", choices=["csv", "md", "json", "latex"], default="md")
    lb.add_argument("--compare", metavar="REF", help="published numbers beside ours: reference/NAME "
                    "(results/reference/NAME.csv) or a CSV path; appended to leaderboard.md")
    lb.set_defaults(fn=cmd_leaderboard)
    rp = sub.add_parser("report", help="write DIR/report.html: leaderboards, plots, settings, runs, samples")
    rp.add_argument("dir")
    rp.add_argument("--samples", type=int, metavar="N",
                    help="samples shown per run and step budget (default 20)")
    rp.add_argument("--compare", metavar="REF", help="a published table beside ours, as in `leaderboard --compare`")
    rp.set_defaults(fn=cmd_report)
    sa = sub.add_parser("sample", help="draw (or extend) samples of complete runs without retraining, then score")
    sa.add_argument("dir", help="a tdbench output directory or one run directory")
    sa.add_argument("--n", type=int, help="samples per step budget (default: the run's eval.samples)")
    sa.add_argument("--steps", help="step budgets, comma-separated (default: the run's eval.sample_steps)")
    sa.add_argument("--threads", type=int, help="torch threads")
    sa.add_argument("--no-score", action="store_true", help="only draw; do not rescore")
    sa.set_defaults(fn=cmd_sample)
    sc = sub.add_parser("score", help="(re)compute the sample metrics from samples alone")
    sc.add_argument("path", help="a JSONL file of {\"text\": ...} lines, a run directory or an output directory")
    sc.add_argument("--reference", help="dataset to score against (mem: its train split; MAUVE, Source text: test)")
    sc.add_argument("--scorer", help="gen-ppl scorer: a Hugging Face causal LM name/path or a tdbench ar run dir")
    sc.add_argument("--format", choices=["table", "json"], default="table")
    sc.set_defaults(fn=cmd_score)
    ex = sub.add_parser("experiment", help="rerun a suite's experiment analysis on its output dir")
    ex.add_argument("dir")
    ex.set_defaults(fn=cmd_experiment)
