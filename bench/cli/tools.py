"""Tools about the harness itself: ``tdbench speed`` (training tokens/s, bench.speed)."""
from __future__ import annotations

import json
from pathlib import Path

from bench.errors import UserError, did_you_mean
from bench.records import atomic_write_text

# Imported where used, to keep torch out of CLI start-up: torch, bench.speed.


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


def register(sub) -> None:
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
