"""``tdbench lm-eval RUN --tasks ...``: lm-evaluation-harness tasks on a run (bench.lmeval_run);
lm-eval's own options pass through, in both spellings (``--include-path`` / ``--include_path``).
The options are derived from ``bench.lmeval_run.Options`` and ``bench.lmeval.ScorerSettings``."""
from __future__ import annotations

from bench.errors import UserError

# Imported where used: lm_eval (through bench.lmeval_run's functions and bench.lmeval_model), torch.
LMEVAL_SPELLING = {"include_path", "num_fewshot", "output_path", "log_samples"}   # lm-eval's flags


def _settings(model, args):
    """``model`` (pydantic) from the options given; UserError naming the option."""
    from pydantic import ValidationError

    from bench.config_io import first_error

    given = {k: getattr(args, k) for k in model.model_fields if getattr(args, k, None) is not None}
    if "tasks" in given:
        given["tasks"] = [t.strip() for t in given["tasks"].split(",") if t.strip()]
    try:
        return model(**given)
    except ValidationError as e:
        loc = e.errors()[0]["loc"]
        msg = first_error(e).split(": ", 1)[-1]
        raise UserError(f"--{str(loc[0]).replace('_', '-')}: {msg}" if loc else msg) from None


def cmd_lmeval(args) -> int:
    from bench.lmeval import ScorerSettings
    from bench.lmeval_run import Options

    settings, opts = _settings(ScorerSettings, args), _settings(Options, args)
    if settings.device and settings.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {settings.device}: no CUDA device is visible")
    try:
        from lm_eval.utils import make_table

        from bench import lmeval_run
    except ImportError as e:
        raise UserError(f"lm-eval: not importable ({e}); pip install 'tdbench[lmeval]'") from None
    results = lmeval_run.evaluate(args.run, settings, opts)
    print(make_table(results))
    print(f"Monte-Carlo standard error of each metric over the time draws (K={settings.K}, parametric "
          f"bootstrap of {opts.mc_bootstrap}):")
    print(lmeval_run.mc_table(results))
    return 0


def register(sub) -> None:
    from bench.cli.tools import settings_options
    from bench.lmeval import ScorerSettings
    from bench.lmeval_run import Options

    p = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks on a complete run (tdbench's lm-eval model): "
                                       "lm-eval's results JSON, with the Monte-Carlo stderr beside lm-eval's")
    p.add_argument("run", help="a complete run directory (<out>/runs/<run_id>)")
    for name, f in Options.model_fields.items():
        flags = ["--" + name.replace("_", "-")] + (["--" + name] if name in LMEVAL_SPELLING else [])
        if f.annotation is bool:
            p.add_argument(*flags, dest=name, action="store_true", default=None, help=f.description)
        else:
            kind = {"limit": float, "num_fewshot": int, "mc_bootstrap": int}.get(name, str)
            shown = f" (default {f.default})" if f.default not in (None, False) and not f.is_required() else ""
            p.add_argument(*flags, dest=name, type=kind, required=f.is_required(), help=f"{f.description}{shown}")
    settings_options(p, ScorerSettings)
    p.set_defaults(fn=cmd_lmeval)
