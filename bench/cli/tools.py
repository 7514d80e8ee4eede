"""Tools about the harness itself: ``tdbench speed`` (training tokens/s, bench.speed) and
``tdbench rehearse`` (every run of a suite at its real size for a few steps on CPU, bench.rehearse)."""
from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path

from bench.errors import UserError, did_you_mean
from bench.records import atomic_write_text

# Imported where used, to keep torch out of CLI start-up: torch, bench.speed, bench.rehearse_table
# (bench.rehearse is imported to derive the options of ``rehearse``: pydantic, bench.config).


def cmd_speed(args) -> int:
    """Training tokens/s as ratios, interleaved in this process (bench.speed)."""
    import torch

    from bench import speed

    sizes = [x.strip() for x in args.sizes.split(",") if x.strip()]
    if not sizes:
        raise UserError(f"--sizes: name at least one of {', '.join(speed.SIZES)}")
    for x in sizes:
        if x not in speed.SIZES:
            raise UserError(f"--sizes: {did_you_mean(x, speed.SIZES)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    for k in ("steps", "rounds"):
        if getattr(args, k) < 1:
            raise UserError(f"--{k}: must be a positive integer")
    if args.warmup < 0:
        raise UserError("--warmup: must be 0 or more")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise UserError(f"--peak-tflops: {args.peak_tflops}: must be positive")
    rows = speed.run(sizes, steps=args.steps, rounds=args.rounds, warmup=args.warmup, threads=args.threads,
                     device=device, compile_=args.compile, peak_tflops=args.peak_tflops,
                     families=not args.no_families)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(rows, indent=2) + "\n")
    return 0


def cmd_rehearse(args) -> int:
    """Every run of a suite at its real size for a few steps on CPU (bench.rehearse)."""
    from pydantic import ValidationError

    from bench import rehearse
    from bench.config_io import first_error
    from bench.rehearse_table import write_outputs

    given = {k: getattr(args, k) for k in rehearse.RehearsalSettings.model_fields if getattr(args, k) is not None}
    try:
        st = rehearse.RehearsalSettings(**given)
    except ValidationError as e:
        flag = "--" + str(e.errors()[0]["loc"][0]).replace("_", "-")
        raise UserError(f"{flag}: {first_error(e).split(': ', 1)[1]}") from None
    suite, rows, out = rehearse.rehearse(args.suite, args.out, st)
    print(write_outputs(out, suite, rows, st), end="")
    failed = [r for r in rows if r.status != "ok"]
    print(f"{len(rows) - len(failed)}/{len(rows)} rehearsed runs passed; table: {out / 'rehearsal.md'}, "
          f"{out / 'rehearsal.csv'}", file=sys.stderr)
    return 1 if failed else 0


def _scalar(ann):
    """int of ``Optional[Annotated[int, ...]]``: the type an option's value is parsed with."""
    while typing.get_origin(ann) in (typing.Union, types.UnionType, typing.Annotated):
        ann = [a for a in typing.get_args(ann) if a is not type(None)][0]
    return ann


def settings_options(p, model) -> None:
    """One option per field of the pydantic ``model``: ``--field-name``, its description the
    help, its default the default (applied by the model: an option not given is not passed);
    a list takes several values, a boolean is a flag."""
    for name, f in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if f.annotation is bool:
            p.add_argument(flag, action="store_true", default=None, help=f.description)
        elif typing.get_origin(f.annotation) is list:
            p.add_argument(flag, nargs="+", metavar=name.upper(), help=f.description)
        else:
            shown = f" (default {f.default})" if f.default is not None else ""
            p.add_argument(flag, type=_scalar(f.annotation), help=f"{f.description}{shown}")


def register(sub) -> None:
    from bench.rehearse import RehearsalSettings

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
    rh = sub.add_parser("rehearse", help="every run of a suite at its real size, a few steps on CPU: "
                                         "peak memory, s/step, projected GPU memory and step time")
    rh.add_argument("suite")
    rh.add_argument("--out", help="output dir (default runs/<suite name>-rehearsal)")
    settings_options(rh, RehearsalSettings)
    rh.set_defaults(fn=cmd_rehearse)
