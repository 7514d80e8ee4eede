"""Checkpoints: where they live, how they are written, sealed, checked and read.

``<run>/ckpt/step_XXXXXXX/`` (``<run>/ckpt/<i>-<stage>/step_XXXXXXX/`` for each stage of a
multi-stage method; each holds all of the method's weights, and a stage's last one, marked
``stage_complete``, stays as its result) holds the model (and EMA) weights in safetensors, the
optimizer and scheduler state with the RNG state in ``optim.pt``, ``state.json`` (step,
tokens, loss curve, the frozen parts' sources and hashes) and ``manifest.json``: the sha256
and size of every other file, checked before anything is parsed. Our code unpickles nothing:
``optim.pt`` is read with ``torch.load(weights_only=True)`` (tensors and plain containers).
DeepSpeed's own resume does unpickle its ZeRO shards in ``deepspeed/`` (torch.load inside
DeepSpeed), so that folder is created 0700.

A checkpoint is written into a staging directory and published: sealed with its manifest,
renamed into place, and every older one of its root pruned (only the latest is kept). Under
DeepSpeed every rank writes its ZeRO shard into ``deepspeed/`` of the same directory (the full
weights still go to ``model.safetensors``); such a checkpoint resumes with the same world size.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from bench.errors import UserError

MANIFEST = "manifest.json"
DS_DIR, DS_TAG = "deepspeed", "zero"


# ----------------------------------------------------------------------------- where
def checkpoint_root(rd: Path, stage: str | None = None, index: int = 0) -> Path:
    """Where a run's checkpoints live: ``ckpt/`` for a single-stage method, and
    ``ckpt/<index+1>-<stage>/`` for each stage of a multi-stage one (each keeps its latest
    checkpoint; a finished stage's last one stays, holding the weights the stage ended with)."""
    root = Path(rd) / "ckpt"
    return root if stage is None else root / f"{index + 1}-{stage}"


def _stage_number(p: Path) -> int:
    head = p.name.split("-", 1)[0]
    return int(head) if head.isdigit() else -1


def latest_checkpoint(rd: Path, root: Path | None = None) -> Path | None:
    """The latest checkpoint under ``root`` (a checkpoint root), or of the whole run: of its
    last stage that has one (every checkpoint holds all of the method's weights)."""
    roots = [Path(root)] if root is not None else \
        sorted((p for p in (Path(rd) / "ckpt").glob("[0-9]*-*") if p.is_dir()), key=_stage_number, reverse=True) \
        + [Path(rd) / "ckpt"]
    for r in roots:
        ck = [c for c in sorted(r.glob("step_*[0-9]")) if (c / "state.json").is_file()]
        if ck:
            return ck[-1]
    return None


# ----------------------------------------------------------------------------- manifests
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt_dir: Path) -> None:
    """sha256 and size of every file of a checkpoint directory (recursively), as manifest.json."""
    files = sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    (ckpt_dir / MANIFEST).write_text(json.dumps(
        {str(p.relative_to(ckpt_dir)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files},
        indent=1))


def _corrupt(f: Path, ckpt: Path, why: str) -> UserError:
    return UserError(f"{f}: corrupt checkpoint ({why}); delete {ckpt} to restart from the previous state")


def _why(e: Exception, width: int = 200) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:width]}"


def verify_manifest(ckpt: Path, full: bool = True) -> None:
    """UserError naming the file unless every file of the checkpoint is as its manifest says:
    present with its size (``full=False``: cheap, for a pre-flight over many runs) and its
    sha256 (``full=True``, before anything is parsed)."""
    m = Path(ckpt) / MANIFEST
    try:
        manifest = json.loads(m.read_bytes().decode("utf-8"))
        if not isinstance(manifest, dict) or not manifest or not all(
                isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
                for v in manifest.values()):
            raise ValueError("not a mapping of file -> {sha256, bytes}")
    except FileNotFoundError:
        raise _corrupt(m, ckpt, "no manifest") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _corrupt(m, ckpt, _why(e, 120)) from None
    for name, want in manifest.items():
        f = Path(ckpt) / name
        if not f.is_file():
            raise _corrupt(f, ckpt, "file missing")
        if f.stat().st_size != want["bytes"]:
            raise _corrupt(f, ckpt, f"{f.stat().st_size} bytes, the manifest says {want['bytes']}: truncated?")
        if full and sha256_file(f) != want["sha256"]:
            raise _corrupt(f, ckpt, "content hash mismatch: edited or damaged")


# ----------------------------------------------------------------------------- writing
def staging(root: Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before :func:`publish` makes it the checkpoint."""
    return Path(root) / f".tmp_step_{step:07d}"


def publish(root: Path, step: int) -> None:
    """Seal the staged checkpoint with its manifest, move it into place atomically, and drop
    every older one (only the latest is kept)."""
    root, tmp = Path(root), staging(root, step)
    final = root / f"step_{step:07d}"
    write_manifest(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in root.glob("step_*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def _fresh(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)


def _write_rest(tmp: Path, ema, training: dict, state: dict) -> None:
    """Everything but the model weights: EMA weights, ``optim.pt`` (``training``: the optimizer
    and/or scheduler state; the RNG state is added) and ``state.json``."""
    import torch
    from safetensors.torch import save_file

    if ema is not None:
        save_file(ema.shadow, tmp / "ema.safetensors")
    torch.save({**training, "torch_rng": torch.get_rng_state()}, tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps(state))


def save(root: Path, step: int, model, opt, sched, ema, state: dict) -> None:
    """Checkpoint ``step`` under ``root`` (see :func:`checkpoint_root`), published."""
    from safetensors.torch import save_file

    tmp = staging(root, step)
    _fresh(tmp)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    _write_rest(tmp, ema, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, state)
    publish(root, step)


def save_deepspeed(root: Path, step: int, accelerator, engine, sched, ema, state: dict) -> None:
    """Collective: every rank writes its ZeRO shard, rank 0 the full weights and the rest."""
    from safetensors.torch import save_file

    tmp = staging(root, step)
    main = accelerator.is_main_process
    if main:
        _fresh(tmp)
        (tmp / DS_DIR).mkdir(mode=0o700)  # 0700: DeepSpeed unpickles its shards on resume
    accelerator.wait_for_everyone()
    engine.save_checkpoint(str(tmp / DS_DIR), tag=DS_TAG, save_latest=False)
    full = accelerator.get_state_dict(engine)  # gathers ZeRO-3 partitions (collective)
    if main:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in full.items()}, tmp / "model.safetensors")
        _write_rest(tmp, ema, {"scheduler": sched.state_dict()}, {**state, "world_size": accelerator.num_processes})
        publish(root, step)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------- reading
def load(ckpt: Path, model, opt, sched, ema) -> dict:
    """Restore ``model`` and ``opt`` (either may be None), ``sched``, ``ema`` and the torch RNG
    from checkpoint ``ckpt`` (its manifest checked first); returns its ``state.json``."""
    import torch
    from safetensors.torch import load_file

    verify_manifest(ckpt)
    f = ckpt / "model.safetensors"
    try:
        if model is not None:
            model.load_state_dict(load_file(f))
        if ema is not None:
            f = ckpt / "ema.safetensors"
            ema.shadow = load_file(f)
        f = ckpt / "optim.pt"
        blob = torch.load(f, weights_only=True)
        if opt is not None:
            opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["torch_rng"])
        f = ckpt / "state.json"
        return json.loads(f.read_bytes().decode("utf-8"))
    except Exception as e:  # noqa: BLE001 - any failure here means a corrupt checkpoint
        raise _corrupt(f, ckpt, _why(e)) from None


def load_deepspeed(ckpt: Path, accelerator, engine, sched, ema) -> dict:
    """:func:`load` for a DeepSpeed engine: its ZeRO shards from ``deepspeed/`` (written by the
    same number of processes), the scheduler, EMA and RNG as in a plain checkpoint."""
    state = load(ckpt, None, None, sched, ema)
    saved = state.get("world_size")
    if saved is not None and saved != accelerator.num_processes:
        raise UserError(f"{ckpt}: DeepSpeed checkpoint written by {saved} processes; resume it with the "
                        f"same launch.nodes × launch.tasks_per_node (now {accelerator.num_processes})")
    f = ckpt / DS_DIR
    try:
        path, _ = engine.load_checkpoint(str(f), tag=DS_TAG, load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=False)
    except Exception as e:  # noqa: BLE001
        raise _corrupt(f, ckpt, _why(e)) from None
    if path is None:
        raise UserError(f"{f}: corrupt checkpoint (no DeepSpeed state); delete {ckpt} to restart")
    return state


def load_weights(method, ck: Path):
    """Load checkpoint ``ck`` into ``method`` (built anew, its frozen parts again from their
    source): the manifest checked first, ``model.safetensors`` with ``ema.safetensors`` over it
    when the (last stage of the) run kept an EMA, and the frozen parts' hashes checked against
    the ones the run recorded. Returns ``method``."""
    from safetensors.torch import load_file

    verify_manifest(ck)
    f = ck / "state.json"
    try:
        recorded = json.loads(f.read_bytes().decode("utf-8")).get("frozen")
        f = ck / "model.safetensors"
        state = load_file(f)
        if (ck / "ema.safetensors").exists():
            f = ck / "ema.safetensors"
            state.update(load_file(f))
        method.load_state_dict({k: v.to(method.state_dict()[k].dtype) for k, v in state.items()})
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{f}: corrupt checkpoint ({_why(e)})") from None
    method.check_frozen(recorded)
    return method


def final_checkpoint(run_dir: Path) -> Path:
    """The checkpoint holding the weights a run ended with: its latest (of its last stage that
    has one). UserError if it has none."""
    ck = latest_checkpoint(run_dir)
    if ck is None:
        raise UserError(f"{run_dir}: no checkpoint (ckpt/step_*) to load the final weights from")
    return ck
