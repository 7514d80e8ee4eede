"""Plots derived from run records: training-loss curves per size, one line per model — the
mean over its seeds with a ±1 sd band when there are several — so the figure stays readable
(and fast) with thousands of runs.

Written next to the leaderboard as ``training.png``; matplotlib is optional (no plot, no
error, when it is missing)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

GRID = 200  # points each curve is resampled to (over the fraction of training done)


def aggregate(recs: list[dict]) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int]]]:
    """{size: {model: (steps, mean, sd, n_seeds)}} of the loss curves; curves of one model are
    resampled onto a common step grid (linear interpolation) before averaging."""
    groups: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {}
    for r in recs:
        tr = r.get("train") or {}
        ys = tr.get("loss_curve")
        if not ys or not tr.get("steps"):
            continue
        ys = np.asarray(ys, dtype=float)
        xs = np.arange(len(ys)) * (tr["steps"] / len(ys))
        groups.setdefault((r["size"], r["label"]), []).append((xs, ys))
    out: dict = {}
    for (size, model), curves in groups.items():
        end = min(float(x[-1]) for x, _ in curves)
        grid = np.linspace(0.0, end, min(GRID, max(len(x) for x, _ in curves)))
        stack = np.stack([np.interp(grid, x, y) for x, y in curves])
        sd = stack.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros_like(grid)
        out.setdefault(size, {})[model] = (grid, stack.mean(axis=0), sd, len(curves))
    return out


def training_curves(recs: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    agg = aggregate(recs)
    if not agg:
        return None
    sizes = sorted(agg)
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 3.8), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for model in sorted(agg[size]):
            xs, mean, sd, n = agg[size][model]
            (line,) = ax.plot(xs, mean, lw=1.2, label=f"{model} ({n} seed{'s' if n > 1 else ''}"
                                                      f"{', mean ± sd' if n > 1 else ''})")
            if n > 1:
                ax.fill_between(xs, mean - sd, mean + sd, color=line.get_color(), alpha=0.2, lw=0)
        ax.set_title(f"size {size}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
