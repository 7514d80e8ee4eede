"""Plots derived from run records: training-loss curves per size, one line per model/seed.

Written next to the leaderboard as ``training.png``; matplotlib is optional (no plot, no
error, when it is missing)."""
from __future__ import annotations

from pathlib import Path


def training_curves(recs: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    curves = [r for r in recs if r.get("train", {}).get("loss_curve")]
    if not curves:
        return None
    sizes = sorted({r["size"] for r in curves})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 3.8), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for r in sorted((r for r in curves if r["size"] == size), key=lambda r: (r["label"], r["seed"])):
            ys = r["train"]["loss_curve"]
            steps = r["train"]["steps"]
            xs = [i * steps / len(ys) for i in range(len(ys))]
            ax.plot(xs, ys, label=f"{r['label']} (seed {r['seed']})", lw=1.2)
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
