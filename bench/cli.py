"""The ``tdbench`` command line. Bad input: one line on stderr, exit code 2, nothing written."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench.errors import UserError


def _out_dir(args, suite) -> Path:
    return Path(args.out) if args.out else Path("runs") / suite.name


def cmd_run(args) -> int:
    from bench import leaderboard
    from bench.suite import expand, load_suite
    from bench.launch import run_suite

    suite, specs = load_suite(args.suite)  # validates everything before anything is written
    if args.seeds:
        suite = suite.model_copy(update={"seeds": list(dict.fromkeys(args.seeds))})
        specs = expand(suite)
    executor = args.executor or suite.launch.executor
    if args.cluster and executor != "slurm":
        if args.executor:
            raise UserError(f"--cluster: only for --executor slurm (not {executor})")
        executor = "slurm"
    if args.dry_run:
        from bench.plan import render

        if not 0 < args.mfu <= 1:
            raise UserError(f"--mfu: {args.mfu}: a fraction in (0, 1]")
        if args.peak_tflops <= 0:
            raise UserError(f"--peak-tflops: {args.peak_tflops}: must be positive")
        print(render(suite, specs, executor, args.cluster or suite.launch.cluster, args.mfu, args.peak_tflops))
        return 0
    out = _out_dir(args, suite)
    t0 = time.time()
    status = run_suite(suite, specs, out, executor, cluster=args.cluster, max_running=args.max_running)
    if any(s.eval.samples > 0 for s in specs):
        _score_suite_dir(out, suite.metrics)
    text, problems = leaderboard.write(out, "md")
    print(text)
    if suite.experiment is not None:
        from bench.experiments import run_experiment, save_suite

        save_suite(out, suite)
        run_experiment(out, suite, log=lambda m: print(m, file=sys.stderr))
    failed = [k for k, v in status.items() if v != "complete"]
    print(f"{len(status) - len(failed)}/{len(status)} runs complete in {time.time() - t0:.1f} s; "
          f"leaderboard: {out / 'leaderboard.md'}, {out / 'leaderboard.csv'}", file=sys.stderr)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if failed else (2 if problems else 0)


def _score_suite_dir(out: Path, cfg, reuse: bool = True) -> dict:
    """Score every run's samples (bench.metrics.score), recording the settings in metrics.json."""
    from bench.metrics.score import score_dir
    from bench.records import write_json

    write_json(Path(out) / "metrics.json", cfg.model_dump(mode="json"))
    return score_dir(out, cfg, reuse=reuse, log=lambda m: print(m, file=sys.stderr))


def _scoring_config(args, base):
    cfg = base
    if args.scorer:
        cfg = cfg.model_copy(update={"gen_ppl": cfg.gen_ppl.model_copy(update={"scorer": args.scorer})})
    if args.reference:
        from bench.data import dataset_params
        from bench.config import DatasetRef
        dataset_params(DatasetRef(name=args.reference), "--reference")
        cfg = cfg.model_copy(update={"reference": cfg.reference.model_copy(update={"dataset": args.reference})})
    return cfg


def cmd_score(args) -> int:
    import json

    from bench.metrics.score import (SCORES, metrics_config_of, score_file, score_json, score_rows, score_run,
                                     score_table, score_values)

    p = Path(args.path)
    if p.is_file():
        from bench.metrics import MetricsConfig
        res = score_file(p, _scoring_config(args, MetricsConfig()), args.reference)
        if args.format == "json":
            print(json.dumps(score_json(res), indent=2))
        else:
            print(score_table(score_rows(p.name, res)))
        return 0
    if (p / "result.json").is_file():
        cfg = _scoring_config(args, metrics_config_of(p.parent.parent))
        old = json.loads((p / SCORES).read_text()) if (p / SCORES).is_file() else None
        res = score_run(p, cfg, reuse=False)
        if res is None:
            raise UserError(f"{p}: no {p.name}/samples.jsonl (draw some with `tdbench sample {p}`)")
        results = {p.name: res}
        olds = {p.name: old}
    elif (p / "runs").is_dir():
        cfg = _scoring_config(args, metrics_config_of(p))
        olds = {q.parent.name: json.loads(q.read_text()) for q in (p / "runs").glob(f"*/{SCORES}")}
        results = _score_suite_dir(p, cfg, reuse=False)
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


def cmd_sample(args) -> int:
    """Draw (or extend) samples of complete runs from their final weights, then score them."""
    from bench.data import get_tokenizer
    from bench.metrics.score import metrics_config_of
    from bench.records import read_record
    from bench.samples import load_final_method, write_run_samples

    p = Path(args.dir)
    if (p / "result.json").is_file():
        runs, out = [p], p.parent.parent
    elif (p / "runs").is_dir():
        runs, out = sorted(q.parent for q in (p / "runs").glob("*/result.json")), p
    else:
        raise UserError(f"{p}: not a run directory or a tdbench output directory")
    steps = None
    if args.steps:
        try:
            steps = [int(x) for x in args.steps.split(",")]
            assert all(x > 0 for x in steps)
        except (ValueError, AssertionError):
            raise UserError(f"--steps: expected positive integers separated by commas, got '{args.steps}'") from None
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
        _score_suite_dir(out, cfg) if (out / "runs").is_dir() else None
        from bench import leaderboard
        leaderboard.write(out)
        print(f"scored; leaderboard: {out / 'leaderboard.md'}", file=sys.stderr)
    return 0


def cmd_leaderboard(args) -> int:
    from bench import leaderboard

    out = Path(args.dir)
    if not (out / "runs").is_dir():
        raise UserError(f"{out}: not a tdbench output directory (no runs/ inside)")
    from bench import tables
    compare = None
    if args.compare:  # resolved and parsed before anything is written
        compare = tables.resolve_reference(args.compare)
        tables.read_reference(compare)
    text, problems = leaderboard.write(out, args.format, compare=compare)
    print(text, end="" if text.endswith("\n") else "\n")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 2 if problems else 0


def cmd_experiment(args) -> int:
    """Rerun a suite's ``experiment:`` analysis on its output directory (no training)."""
    from bench.experiments import load_saved_suite, run_experiment

    out = _need_out(args.dir)
    suite = load_saved_suite(out)
    if suite.experiment is None:
        raise UserError(f"{out}: its suite has no experiment: key")
    print(run_experiment(out, suite, log=lambda m: print(m, file=sys.stderr)))
    return 0


def _need_out(d: str) -> Path:
    out = Path(d)
    if not (out / "runs").is_dir():
        raise UserError(f"{out}: not a tdbench output directory (no runs/ inside)")
    return out


def cmd_status(args) -> int:
    """One line per run: pending / running / stopped / requeued / completed / failed /
    cancelled, with step/total, loss, tokens/s and ETA while it trains, from the run
    directories (records, progress, leases) and, for submitted runs, one squeue call.
    ``--watch`` follows the suite live until every run is over."""
    from bench import live

    out = _need_out(args.dir)
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


def cmd_submit(args) -> int:
    from bench import slurm
    from bench.suite import load_suite
    from bench.launch import check_launch, report_submission

    suite, specs = load_suite(args.suite)
    prof, path = slurm.load_profile(args.cluster)
    check_launch(suite, specs, "slurm")
    out = _out_dir(args, suite)
    t0 = time.time()
    subs, queued, done = slurm.submit(suite, specs, out, prof, path, args.max_running)
    report_submission(subs, queued, prof)
    n = sum(len(x.job_ids) for x in subs)
    print(f"{suite.name}: {len(specs)} runs: {n} submitted, {len(queued)} already queued, {len(done)} complete "
          f"({time.time() - t0:.1f} s); `tdbench status {out}` follows them", file=sys.stderr)
    for x in subs:
        print(x.array_job_id)
    return 0


def cmd_cancel(args) -> int:
    from bench.slurm import cancel

    out = _need_out(args.dir)
    ids = cancel(out)
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
        from bench.slurm import read_ledger
        hits = sorted({r / "runs" / rid for r in roots for rid in read_ledger(r)[0] if rid.startswith(run)})
    if not hits:
        raise UserError(f"logs RUN: no run '{run}' under {', '.join(str(r) for r in roots) or 'runs/'} "
                        "(give a run directory, or --dir DIR with a run id)")
    if len(hits) > 1:
        raise UserError(f"logs RUN: '{run}' matches {len(hits)} runs: {', '.join(h.name for h in hits[:5])}")
    return hits[0]


def cmd_logs(args) -> int:
    from bench.slurm import job_log_paths, read_ledger

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
    entry = read_ledger(out)[0].get(rd.name)
    if entry:
        for p in job_log_paths(out, entry["job_id"]):
            task = p.name.split("_log.")[0].rsplit("_", 1)[-1]
            if args.task is None or str(args.task) == task:
                show(p, f"job {entry['job_id']} task {task} {'stdout' if p.suffix == '.out' else 'stderr'}")
    if not shown:
        print(f"{rd}: no logs yet" + (f" (job {entry['job_id']} has not started)" if entry else ""))
    return 0


def cmd_speed(args) -> int:
    """Training tokens/s as ratios, interleaved in this process (bench.speed)."""
    import json

    import torch

    from bench import speed

    sizes = [x.strip() for x in args.sizes.split(",") if x.strip()]
    for x in sizes:
        if x not in speed.SIZES:
            from bench.errors import did_you_mean
            raise UserError(f"--sizes: {did_you_mean(x, speed.SIZES)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    for k in ("steps", "rounds"):
        if getattr(args, k) < 1:
            raise UserError(f"--{k}: must be a positive integer")
    rows = speed.run(sizes, steps=args.steps, rounds=args.rounds, warmup=args.warmup, threads=args.threads,
                     device=device, compile_=args.compile, peak_tflops=args.peak_tflops,
                     families=not args.no_families)
    if args.json:
        from bench.records import atomic_write_text
        atomic_write_text(Path(args.json), json.dumps(rows, indent=2) + "\n")
    return 0


def cmd_data(args) -> int:
    from bench.data import catalog

    if args.data_cmd == "list":
        for row in catalog.listing():
            print(f"{row['name']:12s} {row['kind']:9s} {row['source']}  [splits: {row['splits']}]")
            for c in row["cached"]:
                print(f"    cached {c['split']:5s} {c['tokenizer']:10s} L={c['seq_len']:<5d} {c['packing']:17s} "
                      f"{c['n_tokens']:>12,} tokens {c['n_blocks']:>9,} blocks  ({c['dataset']})")
        return 0
    rows = catalog.prepare(args.name, args.path, args.tokenizer, args.seq_len, args.protocol,
                           args.split, args.num_proc)
    for r in rows:
        how = (f"built in {r['build_s']:.1f} s ({r['tokens_per_s']:,} tokens/s, {r['num_proc']} worker(s))"
               if r["fresh"] else "already cached")
        print(f"{args.name}/{r['split']}: {r['n_docs']:,} documents, {r['n_tokens']:,} tokens, {r['blocks']:,} blocks "
              f"of {r['seq_len']} ({r['packing']}, {r['n_counted']:,} counted); {how}: {r['dir']}")
    return 0


def _annotation(a) -> str:
    """A parameter's type for humans: ``absorb|uniform``, ``float?`` (optional), ``int``."""
    from typing import Literal, Union, get_args, get_origin

    if get_origin(a) is Literal:
        return "|".join(map(str, get_args(a)))
    if get_origin(a) is Union:
        return " or ".join(_annotation(x) for x in get_args(a) if x is not type(None)) + "?"
    return getattr(a, "__name__", str(a)).replace("typing.", "")


def cmd_methods(args) -> int:
    from bench.registry import BROKEN, all_methods

    for mod, err in BROKEN.items():
        print(f"error: plugin {mod} failed to import: {err}", file=sys.stderr)
    for name, cls in all_methods().items():
        print(f"{name}  ({cls.default_label(cls.Params())}; {cls.likelihood} likelihood, "
              f"{cls.time} time; supports: {', '.join(cls.supports())})")
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        if doc:
            print(f"    {doc[0]}")
        if cls.variants:
            print("    variants: " + "; ".join(f"{k} = {v}" for k, v in cls.variants.items()))
        if len(cls.stages) > 1:
            print("    stages (trained in order; suite train.stages.<stage> sets steps, lr, ...): " + " → ".join(
                st + (" (" + ", ".join(f"{k}={v}" for k, v in cls.stage_defaults[st].items()) + ")"
                      if cls.stage_defaults.get(st) else "") for st in cls.stages))
        for fname, f in cls.Params.model_fields.items():
            ann = _annotation(f.annotation)
            desc = f"  # {f.description}" if f.description else ""
            print(f"    {fname}: {ann} = {f.default!r}{desc}")
    return 2 if BROKEN else 0


TEMPLATE = '''"""{title}: one-line summary of the method (cite the paper and equation numbers).

Write the forward process, the loss and the bound here with the paper's symbols.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.method import Method, Params
from bench.registry import register


class {cls}Params(Params):
    example: float = 1.0  # every parameter has a default; unknown keys are YAML errors


@register("{name}")
class {cls}(Method):
    Params = {cls}Params
    likelihood = "bound"       # "exact" | "bound" | "none"
    time = "continuous"        # "continuous" | "discrete" | "none"
{stages}
    def nll(self, x0, counted, u):
        """Per-sequence NLL upper bound (nats) for one time draw u per sequence."""
        raise NotImplementedError("write the bound of {name}")

    @torch.no_grad()
    def sample(self, n, steps=64, generator=None):
        raise NotImplementedError("write the sampler of {name}")
'''


TEMPLATE_CONTINUOUS = '''"""{title}: Gaussian diffusion of learned token embeddings (write the paper and equations here).

A working skeleton on the family's shared math (methods/_gaussian.py, VDM notation): e = Emb(w),
z_t = α_t e + σ_t ε, x0-prediction, the continuous-time bound (VDM eq. 17)

    −log p(w) ≤ KL(q(z_1|w) ‖ N(0,I)) + E[−log p(w|z_0)] + ½ E_t γ'(t) e^{{−γ(t)}} ‖e − x̂0‖²

as loss and likelihood, the DDPM sampler, optional self-conditioning. Change what your method
changes; keep nll() a bound (tests/test_continuous.py shows how to check it).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import PositiveInt

from bench.backbone import Backbone
from bench.method import Method, Params
from bench.registry import register
from methods._gaussian import (SAMPLERS, SCHEDULES, diffuse, diffusion_term, nearest_embedding, prior_kl,
                               sample_loop, train_condition)


class {cls}Params(Params):
    self_condition: bool = False
    embed_dim: PositiveInt = 16
    schedule: Literal["cosine", "sqrt", "tan-d", "learned"] = "cosine"
    sampler: Literal["ddpm", "ddim"] = "ddpm"


@register("{name}")
class {cls}(Method):
    Params = {cls}Params
    likelihood = "bound"
    time = "continuous"

    def __init__(self, params, backbone, vocab_size, seq_len, context=None):
        super().__init__(params, backbone, vocab_size, seq_len, context)
        self.embedding = nn.Embedding(vocab_size, params.embed_dim)
        self.schedule = SCHEDULES[params.schedule]()

    def build_network(self, cfg):
        # continuous input of embed_dim (no token embedding: DDP needs every parameter used)
        return Backbone(cfg, vocab_in=None, vocab_out=self.p.embed_dim, seq_len=self.L,
                        in_dim=self.p.embed_dim, self_condition=self.p.self_condition)

    def predict_x0(self, z, t, x_sc):
        return self.net(t=t, embeds=z, self_cond=x_sc).float()

    def terms(self, w, counted, t, train):
        e = self.embedding(w)
        a, s = (v[:, None, None] for v in self.schedule.alpha_sigma(t))
        z, _ = diffuse(e, a, s)
        z = torch.where(counted[..., None], z, e)
        x_sc = None
        if self.p.self_condition:
            first = lambda: self.predict_x0(z, t, None)  # noqa: E731
            x_sc = train_condition(first) if train else first()
        x0_hat = self.predict_x0(z, t, x_sc)
        one = torch.ones(1, device=e.device)
        g0, g1 = self.schedule.gamma(0 * one), self.schedule.gamma(one)
        a0, s0 = torch.sigmoid(-g0).sqrt(), torch.sigmoid(g0).sqrt()
        z0 = a0 * e + s0 * torch.randn_like(e)
        E = self.embedding.weight
        logits = z0 @ (a0 / s0 ** 2 * E).t() - 0.5 * (a0 / s0) ** 2 * (E * E).sum(-1)   # p(w | z_0)
        recon = F.cross_entropy(logits.flatten(0, 1), w.flatten(), reduction="none").view(w.shape)
        diff = diffusion_term(e, x0_hat, self.schedule.gamma(t)[:, None], self.schedule.dgamma(t)[:, None])
        return (diff + prior_kl(e, g1) + recon) * counted

    def loss(self, x0, counted, u):
        return self.terms(x0, counted, u, train=True).sum() / counted.sum().clamp(min=1)

    def nll(self, x0, counted, u):
        """Per-sequence NLL upper bound (nats) for one time draw u per sequence."""
        return self.terms(x0, counted, u, train=False).sum(1)

    @torch.no_grad()
    def sample(self, n, steps=64, generator=None):
        E = self.embedding.weight
        z = torch.randn((n, self.L, E.shape[1]), generator=generator, device=E.device)
        x0 = sample_loop(self.predict_x0, z, self.schedule, steps, SAMPLERS[self.p.sampler], generator,
                         self_condition=self.p.self_condition)
        return nearest_embedding(x0, E)
'''


ONE_STAGE = """    # Several training stages (e.g. an autoencoder, then diffusion over its latents) and frozen
    # pretrained parts: `tdbench new-method NAME --stages autoencoder,diffusion`, README
    # "Multi-stage methods and frozen parts".
"""

STAGES = """    stages = {stages!r}   # trained in this order, each with its own optimizer and checkpoints
    # per stage: defaults of train settings (steps, lr, batch_size, warmup, ema, ...); the suite's
    # `train: {{stages: {{<stage>: {{...}}}}}}` overrides them
    stage_defaults = {defaults!r}

    def stage_parameters(self, stage):
        \"\"\"The parameters `stage` trains; the others (and frozen parts, see add_frozen) stay as
        they are. Under DDP each must get a gradient from stage_loss(stage, ...).\"\"\"
        raise NotImplementedError("say which parameters each stage of {name} trains")

    def stage_loss(self, stage, x0, counted, u):
        \"\"\"The scalar loss of `stage` (per counted token).\"\"\"
        raise NotImplementedError("write the loss of each stage of {name}")
"""


def cmd_new_method(args) -> int:
    import re

    name = args.name
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise UserError(f"new-method NAME: '{name}' must be lowercase letters, digits, underscores")
    from bench.registry import all_methods
    if name in all_methods():
        raise UserError(f"new-method NAME: '{name}' is already registered")
    path = Path(args.dir) / f"{name}.py"
    if path.exists():
        raise UserError(f"{path}: already exists")
    cls = "".join(p.capitalize() for p in name.split("_"))
    from bench.records import atomic_write_text
    stages = tuple(x.strip() for x in (args.stages or "").split(",") if x.strip())
    if args.stages is not None and (len(stages) < 2 or len(set(stages)) < len(stages)
                                    or not all(re.fullmatch(r"[a-z][a-z0-9_]*", x) for x in stages)):
        raise UserError(f"new-method --stages: '{args.stages}' must name two or more distinct stages "
                        "(lowercase letters, digits, underscores), comma-separated")
    if stages and args.family == "continuous":
        raise UserError("new-method --stages: only with --family discrete (the continuous skeleton is one stage)")
    block = STAGES.format(stages=stages, defaults={st: {} for st in stages}, name=name) if stages else ONE_STAGE
    template = TEMPLATE_CONTINUOUS if args.family == "continuous" else TEMPLATE
    atomic_write_text(path, template.format(name=name, cls=cls, title=cls, stages=block))
    what = "a working Gaussian-embedding skeleton: change its math" if args.family == "continuous" else \
        "fill in nll() and sample()"
    print(f"wrote {path}: {what}; `tdbench methods` lists it once it imports")
    return 0


def parser() -> argparse.ArgumentParser:
    from bench.plan import DEFAULT_MFU, DEFAULT_PEAK_TFLOPS

    p = argparse.ArgumentParser(prog="tdbench", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run every incomplete run of a suite, then write the leaderboard")
    r.add_argument("suite")
    r.add_argument("--out", help="output dir (default runs/<suite name>)")
    r.add_argument("--executor", choices=["local", "debug", "slurm"])
    r.add_argument("--cluster", help="slurm cluster profile (name in slurm/ or a path); implies --executor slurm")
    r.add_argument("--max-running", type=int, help="slurm: array tasks running at once (default: the profile's)")
    r.add_argument("--dry-run", action="store_true",
                   help="print each run, its resources and estimated GPU-hours; run and write nothing")
    r.add_argument("--mfu", type=float, default=DEFAULT_MFU, help=f"dry run: assumed model FLOPs utilisation (default {DEFAULT_MFU})")
    r.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                   help=f"dry run: assumed peak TFLOP/s per GPU (default {DEFAULT_PEAK_TFLOPS:g}, A100 bf16)")
    r.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="run these seeds instead of the suite's seeds: (e.g. --seeds 0 1 2)")
    r.set_defaults(fn=cmd_run)
    s = sub.add_parser("submit", help="queue a suite's incomplete runs on Slurm (job arrays) and return")
    s.add_argument("suite")
    s.add_argument("--cluster", required=True, help="cluster profile: a name in slurm/ or a path")
    s.add_argument("--out", help="output dir (default runs/<suite name>)")
    s.add_argument("--max-running", type=int, help="array tasks running at once (default: the profile's)")
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
    lb = sub.add_parser("leaderboard", help="(re)generate the leaderboard of an output dir")
    lb.add_argument("dir")
    lb.add_argument("--format", choices=["csv", "md", "json", "latex"], default="md")
    lb.add_argument("--compare", metavar="REF", help="published numbers beside ours: reference/NAME "
                    "(results/reference/NAME.csv) or a CSV path; appended to leaderboard.md")
    lb.set_defaults(fn=cmd_leaderboard)
    sp = sub.add_parser("speed", help="training tokens/s: our AR vs HF GPT-2, each method family vs AR")
    sp.add_argument("--sizes", default="smoke,12x768", help="comma-separated: smoke, 12x768 (default both)")
    sp.add_argument("--steps", type=int, default=3, help="optimizer steps per contender per round (default 3)")
    sp.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    sp.add_argument("--warmup", type=int, default=2, help="warm-up steps per contender (default 2)")
    sp.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    sp.add_argument("--device", help="cpu or cuda (default: cuda when visible)")
    sp.add_argument("--compile", action="store_true", help="torch.compile every contender")
    sp.add_argument("--peak-tflops", type=float, help="the device's peak (bf16) TFLOP/s, for MFU")
    sp.add_argument("--no-families", action="store_true", help="only AR vs HF GPT-2")
    sp.add_argument("--json", help="also write the rows to this JSON file")
    sp.set_defaults(fn=cmd_speed)
    da = sub.add_parser("data", help="prepare (cache) or list datasets")
    dsub = da.add_subparsers(dest="data_cmd", required=True)
    dp = dsub.add_parser("prepare", help="tokenize and pack a dataset into the block cache (progress bar)")
    dp.add_argument("name", help="a registered dataset (tdbench data list)")
    dp.add_argument("--path", help="a local copy laid out like the hub's (directory or file)")
    dp.add_argument("--tokenizer", choices=["gpt2", "char"], help="default: gpt2 (char for text8)")
    dp.add_argument("--seq-len", type=int, help="block length (default 1024; 256 for text8)")
    dp.add_argument("--protocol", help="sedd (default), mdlm, no-specials, or none (no EOS; text8)")
    dp.add_argument("--split", action="append", help="only this split (repeatable; default: all the dataset has)")
    dp.add_argument("--num-proc", type=int, help="tokenisation workers (default: by size, up to all cores)")
    dp.set_defaults(fn=cmd_data)
    dl = dsub.add_parser("list", help="registered datasets, where they come from, what is cached")
    dl.set_defaults(fn=cmd_data)
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
    m = sub.add_parser("methods", help="list registered methods, parameters and metrics")
    m.set_defaults(fn=cmd_methods)
    n = sub.add_parser("new-method", help="write a method plugin skeleton")
    n.add_argument("name")
    n.add_argument("--dir", default="methods")
    n.add_argument("--family", choices=["discrete", "continuous"], default="discrete",
                   help="skeleton: discrete (fill in nll/sample) or continuous (a working Gaussian-embedding "
                        "method on methods/_gaussian.py)")
    n.add_argument("--stages", default=None, metavar="A,B",
                   help="a multi-stage skeleton: its training stages in order, e.g. autoencoder,diffusion")
    n.set_defaults(fn=cmd_new_method)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    for k in ("max_running", "tail", "num_proc", "seq_len"):
        if getattr(args, k, None) is not None and getattr(args, k) < 1:
            return _fail(f"--{k.replace('_', '-')}: must be a positive integer")
    try:
        return args.fn(args)
    except UserError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tdbench status DIR | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
