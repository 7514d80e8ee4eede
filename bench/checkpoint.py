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

Durability (a node that crashes or loses power must leave a checkpoint to resume from):

- a checkpoint is written into a staging directory named with the writer's lease token
  (``.tmp_step_N.<token>``: two writers never share one), every file, the manifest and the
  directories are fsynced, the writer checks it still holds the run's lease (bench.lease; it
  publishes nothing otherwise), then the directory is renamed into place and its root fsynced;
- only then are older checkpoints of the root pruned, keeping the one before it (the newest
  older one that passes the cheap manifest check): the last two are kept;
- on resume the newest checkpoint that verifies (sizes and sha256 against its manifest) is
  used; a torn or damaged newer one is skipped with a line in the log. Only when none is left
  does the run stop, saying so (and that deleting ``ckpt/`` restarts it from the beginning);
- the lease holder removes every staging directory that is not its own when a run starts
  (what a save killed mid-write left).

Under DeepSpeed every rank writes its ZeRO shard into ``deepspeed/`` of the same directory (the
full weights still go to ``model.safetensors``); such a checkpoint resumes with the same world
size.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from bench.errors import UserError
from bench.lease import LeaseLost
from bench.records import file_mode

MANIFEST = "manifest.json"
DS_DIR, DS_TAG = "deepspeed", "zero"


# ----------------------------------------------------------------------------- where
def checkpoint_root(rd: Path, stage: str | None = None, index: int = 0) -> Path:
    """Where a run's checkpoints live: ``ckpt/`` for a single-stage method, and
    ``ckpt/<index+1>-<stage>/`` for each stage of a multi-stage one (each keeps its last two
    checkpoints; a finished stage's last one stays, holding the weights the stage ended with)."""
    root = Path(rd) / "ckpt"
    return root if stage is None else root / f"{index + 1}-{stage}"


def _stage_number(p: Path) -> int:
    head = p.name.split("-", 1)[0]
    return int(head) if head.isdigit() else -1


def checkpoint_roots(rd: Path) -> list[Path]:
    """A run's checkpoint roots, the last stage's first (then ``ckpt/`` itself)."""
    return sorted((p for p in (Path(rd) / "ckpt").glob("[0-9]*-*") if p.is_dir()), key=_stage_number,
                  reverse=True) + [Path(rd) / "ckpt"]


def checkpoints(root: Path) -> list[Path]:
    """The checkpoints of one root, newest first."""
    return [c for c in sorted(Path(root).glob("step_*[0-9]"), reverse=True) if (c / "state.json").is_file()]


def latest_checkpoint(rd: Path, root: Path | None = None) -> Path | None:
    """The latest checkpoint under ``root`` (a checkpoint root), or of the whole run: of its
    last stage that has one (every checkpoint holds all of the method's weights)."""
    for r in [Path(root)] if root is not None else checkpoint_roots(rd):
        ck = checkpoints(r)
        if ck:
            return ck[0]
    return None


def first_intact(roots: list[Path], full: bool = True, log=None) -> Path | None:
    """The newest checkpoint that verifies (:func:`verify_manifest`) of the first of ``roots``
    that has one; each newer one that fails is skipped, saying so through ``log``. None when
    there are no checkpoints; UserError (the newest one's fault) when none verifies."""
    failed: list[tuple[Path, UserError]] = []
    for root in roots:
        for ck in checkpoints(root):
            try:
                verify_manifest(ck, full=full)
            except UserError as e:
                failed.append((ck, e))
                if log is not None:
                    log(f"checkpoint {ck} failed verification: {e}")
                continue
            if failed and log is not None:
                log(f"falling back to {ck.name} of {ck.parent} (the newest intact checkpoint)")
            return ck
    if failed:
        raise failed[0][1]
    return None


# ----------------------------------------------------------------------------- manifests
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    """fsync a file or a directory (its entries: a rename or a new file in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(ckpt_dir: Path) -> None:
    """sha256 and size of every file of a checkpoint directory (recursively), as manifest.json
    (fsynced)."""
    files = sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    with open(ckpt_dir / MANIFEST, "w") as f:
        f.write(json.dumps({str(p.relative_to(ckpt_dir)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                            for p in files}, indent=1))
        f.flush()
        os.fsync(f.fileno())


def _run_of(ckpt: Path) -> Path:
    """The run directory of a checkpoint (``<run>/ckpt[/<i>-<stage>]/step_N``)."""
    for p in Path(ckpt).parents:
        if p.name == "ckpt":
            return p.parent
    return Path(ckpt).parent


def _restart_hint(ckpt: Path) -> str:
    """What deleting ``ckpt`` would do, truthfully: resume from the checkpoint a resume would
    then pick (the next intact one), or — none left — restart the run from the beginning."""
    rd = _run_of(ckpt)
    later = False
    for root in checkpoint_roots(rd):
        for c in checkpoints(root):
            if c == ckpt:
                later = True
            elif later and _fault(c, full=False) is None:
                return f"; delete {ckpt} to restart from {c.name} of {c.parent}"
    return f"; no intact checkpoint left: delete {rd / 'ckpt'} to restart the run from the beginning"


def _corrupt(f: Path, ckpt: Path, why: str) -> UserError:
    return UserError(f"{f}: corrupt checkpoint ({why}){_restart_hint(ckpt)}")


def _why(e: Exception, width: int = 200) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:width]}"


_VERIFIED: dict[str, tuple] = {}   # checkpoint -> its files' (name, size, mtime, inode) when fully verified


def _fault(ckpt: Path, full: bool) -> tuple[Path, str] | None:
    """(file, what is wrong) unless every file of the checkpoint is as its manifest says."""
    m = Path(ckpt) / MANIFEST
    try:
        manifest = json.loads(m.read_bytes().decode("utf-8"))
        if not isinstance(manifest, dict) or not manifest or not all(
                isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
                for v in manifest.values()):
            raise ValueError("not a mapping of file -> {sha256, bytes}")
    except FileNotFoundError:
        return m, "no manifest"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return m, _why(e, 120)
    sig = []
    for name, want in manifest.items():
        f = Path(ckpt) / name
        if not f.is_file():
            return f, "file missing"
        st = f.stat()
        if st.st_size != want["bytes"]:
            return f, f"{st.st_size} bytes, the manifest says {want['bytes']}: truncated?"
        sig.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
    if full and _VERIFIED.get(str(ckpt)) != tuple(sig):
        for name, want in manifest.items():
            if sha256_file(Path(ckpt) / name) != want["sha256"]:
                return Path(ckpt) / name, "content hash mismatch: edited or damaged"
        _VERIFIED[str(ckpt)] = tuple(sig)   # verified once in this process: not hashed again unchanged
    return None


def verify_manifest(ckpt: Path, full: bool = True) -> None:
    """UserError naming the file unless every file of the checkpoint is as its manifest says:
    present with its size (``full=False``: cheap, for a pre-flight over many runs) and its
    sha256 (``full=True``, before anything is parsed)."""
    fault = _fault(ckpt, full)
    if fault is not None:
        raise _corrupt(fault[0], Path(ckpt), fault[1])


# ----------------------------------------------------------------------------- writing
_TOKEN = uuid.uuid4().hex   # staging token of a writer that holds no lease (direct callers)


def staging(root: Path, step: int, token: str | None = None) -> Path:
    """Where checkpoint ``step`` is written by the writer holding lease ``token`` before
    :func:`publish` makes it the checkpoint."""
    return Path(root) / f".tmp_step_{step:07d}.{token or _TOKEN}"


def _sync_tree(d: Path) -> None:
    """fsync every file under ``d``, then its directories, deepest first, ``d`` last."""
    dirs = []
    for p in d.rglob("*"):
        if p.is_dir():
            dirs.append(p)
        elif p.is_file():
            _fsync(p)
    for p in sorted(dirs, key=lambda p: len(p.parts), reverse=True) + [d]:
        _fsync(p)


def publish(root: Path, step: int, writer=None) -> None:
    """Seal the staged checkpoint with its manifest, make it durable, check that ``writer``
    (the run's lease: ``.token``, ``.check()``) still holds the run — if not, drop the staging
    directory and raise LeaseLost, publishing nothing — rename it into place, fsync the root,
    and prune the root to this checkpoint and the one before it."""
    root = Path(root)
    tmp = staging(root, step, getattr(writer, "token", None))
    final = root / f"step_{step:07d}"
    write_manifest(tmp)
    mode = file_mode()   # safetensors writes 0600: another user could not resume
    for f in tmp.iterdir():
        if f.is_file():
            os.chmod(f, mode)
    _sync_tree(tmp)
    if writer is not None:
        try:
            writer.check()
        except LeaseLost:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if final.exists():   # a damaged one a resume fell back from
        shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync(root)
    prune(root, final)


def prune(root: Path, final: Path) -> None:
    """Drop the checkpoints of ``root`` older than ``final`` but the newest intact one (cheap
    check): with ``final`` the last two. Newer ones are never touched here."""
    older = [c for c in sorted(Path(root).glob("step_*"), reverse=True) if c.name < final.name]
    keep = next((c for c in older if (c / "state.json").is_file() and _fault(c, full=False) is None), None)
    for c in older:
        if c != keep:
            shutil.rmtree(c, ignore_errors=True)


def clean_staging(rd: Path, token: str) -> list[Path]:
    """Remove every staging directory of the run but ``token``'s (called by the lease holder
    when it starts: any other is what a killed or superseded writer left). Returns them."""
    gone = [p for pattern in (".tmp_step_*", "*/.tmp_step_*") for p in (Path(rd) / "ckpt").glob(pattern)
            if p.is_dir() and not p.name.endswith(f".{token}")]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


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


def save(root: Path, step: int, model, opt, sched, ema, state: dict, writer=None) -> None:
    """Checkpoint ``step`` under ``root`` (see :func:`checkpoint_root`), published if ``writer``
    (the run's lease) still holds the run (LeaseLost otherwise)."""
    from safetensors.torch import save_file

    tmp = staging(root, step, getattr(writer, "token", None))
    _fresh(tmp)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    _write_rest(tmp, ema, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, state)
    publish(root, step, writer)


def _broadcast(accelerator, obj):
    """Rank 0's ``obj`` on every rank (collective when distributed)."""
    if accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=0)[0]


def save_deepspeed(root: Path, step: int, accelerator, engine, sched, ema, state: dict, writer=None) -> None:
    """Collective: every rank writes its ZeRO shard, rank 0 the full weights and the rest, into
    rank 0's staging directory; rank 0 publishes it. LeaseLost on every rank when rank 0 no
    longer holds the run."""
    from safetensors.torch import save_file

    main = accelerator.is_main_process
    tmp = Path(root) / _broadcast(accelerator, staging(root, step, getattr(writer, "token", None)).name)
    if main:
        _fresh(tmp)
        (tmp / DS_DIR).mkdir(mode=0o700)  # 0700: DeepSpeed unpickles its shards on resume
    accelerator.wait_for_everyone()
    engine.save_checkpoint(str(tmp / DS_DIR), tag=DS_TAG, save_latest=False)
    full = accelerator.get_state_dict(engine)  # gathers ZeRO-3 partitions (collective)
    lost = None
    if main:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in full.items()}, tmp / "model.safetensors")
        _write_rest(tmp, ema, {"scheduler": sched.state_dict()}, {**state, "world_size": accelerator.num_processes})
        try:
            publish(root, step, writer)
        except LeaseLost as e:
            lost = str(e)
    lost = _broadcast(accelerator, lost)   # (also the barrier the ranks leave the save at)
    if lost:
        raise LeaseLost(lost)


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
        raise _corrupt(f, ckpt, "no DeepSpeed state")
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
