"""One table of several `tdbench rehearse` outputs (their rehearsal.csv), for docs/performance.md:
per rehearsed run, the CPU peak and step time, and the projected GPU memory of a training step
and of a sampling call at the suite's batch, against the AR baseline of the same size, L and V at
the same batch. A suite rehearsed without its AR row (``--only``) takes the AR row of another
suite of the same shape (size, L, V: the same network and the same batch per GPU), and the table
says so.

    python benchmarks/rehearsal_summary.py runs/mdlm-table-rehearsal runs/sedd-table-rehearsal ...
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

GIB = 2 ** 30


def _f(x):
    return float(x) if x not in (None, "") else None


def load(dirs: list[str]) -> list[dict]:
    rows = []
    for d in dirs:
        for r in csv.DictReader((Path(d) / "rehearsal.csv").open()):
            r["suite"] = Path(d).name.removesuffix("-rehearsal")
            rows.append(r)
    return rows


def ar_rows(rows: list[dict]) -> dict[tuple, dict]:
    """(suite, size) and (size, L) → the rehearsed AR row (status ok)."""
    out = {}
    for r in rows:
        if r["method"] == "ar" and r["status"] == "ok":
            out.setdefault((r["suite"], r["size"]), r)
            out.setdefault(("*", r["size"], r["seq_len"]), r)
    return out


def ratio(r: dict, base: dict | None, what: str) -> str:
    mine, theirs = _f(r.get(f"gpu_{what}_bytes")), _f(base.get(f"gpu_{what}_bytes")) if base else None
    if mine is None or not theirs or r.get(f"gpu_{what}_batch") != base.get(f"gpu_{what}_batch"):
        return "—"
    return f"{mine / theirs:.2f}"


def gib(x, b) -> str:
    return "—" if _f(x) is None else f"{_f(x) / GIB:.1f} at {b}"


def table(rows: list[dict]) -> str:
    ars = ar_rows(rows)
    head = ("| suite | size | model | N | result | CPU peak RSS | CPU s/step | GPU train GiB at b | × AR "
            "| GPU sampling GiB at b | × AR | GPU s/step |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    borrowed = set()
    for r in rows:
        base = ars.get((r["suite"], r["size"]))
        if base is None:
            base = ars.get(("*", r["size"], r["seq_len"]))
            if base is not None and r["method"] != "ar":
                borrowed.add((r["suite"], base["suite"]))
        ok = r["status"] == "ok"
        out.append("| " + " | ".join([
            r["suite"], r["size"], r["label"], f"{int(r['params']) / 1e6:.0f}M" if r["params"] else "—",
            r["status"] if ok else f"**{r['status']}**: {r['error'][:80]}",
            f"{_f(r['peak_rss_bytes']) / GIB:.2f} GiB" if r["peak_rss_bytes"] else "—",
            f"{_f(r['train_s_per_step']):.1f}" if r["train_s_per_step"] else "—",
            gib(r["gpu_train_bytes"], r["gpu_train_batch"]), ratio(r, base, "train"),
            gib(r["gpu_sample_bytes"], r["gpu_sample_batch"]), ratio(r, base, "sample"),
            f"{_f(r['gpu_step_s']):.2f}" if r["gpu_step_s"] else "—"]) + " |")
    notes = [f"{s}: × AR against {b}'s AR row (same size, L, V and batch per GPU)" for s, b in sorted(borrowed)]
    return "\n".join(out + ([""] + notes if notes else []))


if __name__ == "__main__":
    print(table(load(sys.argv[1:])))
