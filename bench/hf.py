"""Hugging Face causal language models: loading by hub name or local path, per-token NLL.

Which names are local: :func:`resolve_pretrained` is the one rule every loader of a pretrained
model uses (this module, the gen-ppl scorer, the MAUVE featurizer, the latent family's frozen
encoders). A hub name is ``NAME`` or ``ORG/NAME``. Anything else is a local path and must be an
existing directory, else a :class:`UserError` naming the key, and the hub is never asked: a name
that starts with ``.``, ``~`` or ``/`` (``./ckpts/m``, ``../m``, ``~/m``, absolute), holds a
backslash or more than one ``/``, or whose first part is a local directory (``ckpts/gpt2-ft``
while ``ckpts/`` exists). An existing local directory always wins. So a mistyped or unmounted
checkpoint directory never downloads a hub model of the same name; write local paths with a
leading ``./`` (or absolute) to be safe even when their first directory is missing. With
``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set, a hub name is read from the local hub
cache only. A registered short name (bench.models: ``smollm2``) resolves to its converted local
folder, built once from an installed file; a local directory of the same name still wins.

Two functions, shared by every part of the harness that needs a pretrained causal LM (the
generative-perplexity scorer, the ``hf-causal-lm`` method):

- ``load_causal_lm(name_or_path, device)``: a ``transformers`` model in eval mode. A local
  directory is loaded with ``local_files_only`` (never touches the hub); anything that cannot
  be loaded is a :class:`UserError` naming it. ``hub_revision`` is the commit a hub model was
  loaded from (None for a local directory).
- ``causal_lm_token_nll(model, ids, first_context_id)``: −log p(x_i | x_<i) for every token,
  float64, (B, L); the first token is conditioned on ``first_context_id`` (e.g. GPT-2's
  <|endoftext|>). Sequences longer than the model's context are scored in sliding windows: each
  window re-reads the previous ``context − stride`` tokens as context and scores ``stride`` new
  ones (exact when L + 1 fits in the context).

Beside them, for ``hf-causal-lm`` (methods/hf_causal_lm.py): ``load_tokenizer`` (the model's
own tokenizer, or None), ``bos_id`` (what the first token is conditioned on),
``same_tokenizer`` (can the suite's ids be scored as they are) and ``text_nll`` (retokenised
text).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from bench import models
from bench.errors import UserError


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: hub names come from the local cache only."""
    return any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def is_local_name(name: str) -> bool:
    """Does ``name`` name a local directory (True) or a hub model (False)? The module doc's rule."""
    if name.startswith((".", "~", "/")) or "\\" in name or os.path.isabs(name) or Path(name).is_dir():
        return True
    parts = name.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def resolve_pretrained(name: str, where: str | None = None, what: str = "model") -> tuple[str, bool]:
    """(what to pass to ``from_pretrained``, local_files_only) for a hub name or local path.
    A local path that is not a directory is a UserError naming ``where`` (the key); the hub is
    not asked. A hub name is read from the local cache only when the hub is offline. A named
    model (bench.models) is its converted folder."""
    if models.is_named(name):
        return str(models.named_dir(name, where)), True
    if not is_local_name(name):
        if hub_offline():   # also when set after huggingface_hub was imported (it reads it once)
            import huggingface_hub.constants

            huggingface_hub.constants.HF_HUB_OFFLINE = True
        return name, hub_offline()
    path = Path(name).expanduser()
    if not path.is_dir():
        raise UserError(f"{where or 'model'}: cannot load {what} '{name}': no such local directory (a name "
                        f"starting with ./ ../ ~ or /, holding \\ or two or more /, or whose first part is a "
                        f"local directory is a local path, never looked up on the hub; hub names are NAME or "
                        f"ORG/NAME)")
    return str(path), True


def failure(e: Exception, local: bool) -> str:
    """One line on why loading failed (hub names: which hub was tried)."""
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    if "all_tied_weights_keys" in first:   # transformers >= 5 needs post_init(), which older remote code never calls
        return f"{first} (its modelling code predates transformers 5 and never calls post_init(): run it under " \
               f"transformers<5)"
    if local:
        return first
    how = "HF_HUB_OFFLINE is set: only the local hub cache was read" if hub_offline() else \
        "hub unreachable or unknown name?"
    return f"{first} ({how})"


def load_causal_lm(name_or_path: str, device="cpu", revision: str | None = None, where: str | None = None):
    from transformers import AutoModelForCausalLM

    if revision and models.is_named(name_or_path):
        raise UserError(f"{where or 'model'}: {name_or_path} is a named model (its identity is the sha256 of its "
                        f"installed file); revision does not apply to it")
    src, local = resolve_pretrained(name_or_path, where, "a causal LM")
    local_dir = is_local_name(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, local_files_only=local,
                                                     **({"revision": revision} if revision and not local_dir else {}))
    except Exception as e:  # noqa: BLE001 - any loading failure is the user's path/name
        what = "local directory" if local_dir else "model name"
        raise UserError(f"{where + ': ' if where else ''}{name_or_path}: cannot load a causal LM from this {what}: "
                        f"{failure(e, local_dir)}") from None
    return model.to(device).eval()


def hub_revision(name: str, revision: str | None = None) -> str | None:
    """The commit a hub model was loaded from (after loading: the local hub cache's snapshot that
    ``revision``, default main, points to); None for a local directory, a named model or when not found."""
    if is_local_name(name) or models.is_named(name):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        p = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - an odd name or cache: the record says unknown
        return None
    return Path(p).parent.name if isinstance(p, str) and Path(p).parent.parent.name == "snapshots" else None


def context_length(model) -> int:
    cfg = model.config
    for k in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return 1024


@torch.no_grad()
def causal_lm_token_nll(model, ids: torch.LongTensor, first_context_id: int,
                        stride: int | None = None) -> torch.Tensor:
    """(B, L) float64 per-token NLL (nats) of ``ids`` under ``model``; see the module doc."""
    dev = next(model.parameters()).device
    ids = ids.to(dev)
    B, L = ids.shape
    x = torch.cat([torch.full((B, 1), first_context_id, dtype=ids.dtype, device=dev), ids], dim=1)
    ctx = context_length(model)
    stride = stride or max(1, ctx // 2)
    out = torch.empty(B, L, dtype=torch.float64, device=dev)
    start = 0                                 # first target position (in ids) of this window
    while start < L:
        end = min(L, start + (ctx if start == 0 else stride))
        lo = max(0, end - ctx)                # input x[lo:end] predicts ids[lo:end] = x[lo+1:end+1]
        logits = model(input_ids=x[:, lo:end]).logits.double()
        logp = torch.log_softmax(logits, dim=-1)
        tgt = x[:, lo + 1:end + 1]
        nll = -logp.gather(-1, tgt[..., None])[..., 0]  # targets ids[lo:end]
        out[:, start:end] = nll[:, start - lo:]
        start = end
    return out


def load_tokenizer(name_or_path: str, revision: str | None = None, where: str | None = None):
    """The model's own tokenizer, or None when the directory holds none (or offline); ``where``
    names the key in the error for a local path that is not a directory."""
    from transformers import AutoTokenizer

    src, local = resolve_pretrained(name_or_path, where, "a tokenizer")
    if is_local_name(name_or_path) and not any((Path(src) / f).is_file() for f in TOKENIZER_FILES):
        return None  # (transformers would build an empty tokenizer from config.json alone)
    try:
        tok = AutoTokenizer.from_pretrained(src, local_files_only=local,
                                            **({"revision": revision} if revision and not is_local_name(src) else {}))
    except Exception:  # noqa: BLE001 - no tokenizer files: the caller decides what that means
        return None
    return tok if len(tok) > 1 else None


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model")


def bos_id(model, tokenizer=None) -> int:
    """The id the first token is conditioned on: BOS (GPT-2's is ``<|endoftext|>``), else EOS."""
    for src in (tokenizer, model.config, getattr(model, "generation_config", None)):
        for k in ("bos_token_id", "eos_token_id"):
            v = getattr(src, k, None) if src is not None else None
            if isinstance(v, int):
                return v
    raise UserError("hf-causal-lm: the model defines neither bos_token_id nor eos_token_id; "
                    "cannot condition the first token")


def same_tokenizer(suite_tok, model, hf_tok) -> bool:
    """Can the suite's ids be fed to the model as they are? Yes when the model's tokenizer
    encodes a probe text to the same ids (or, with no tokenizer saved, when the suite uses
    GPT-2's and the model's vocabulary has GPT-2's 50257 ids)."""
    probe = "The quick brown fox, 1 @-@ 2 — naïve café.\n\n<|endoftext|> It's"
    if hf_tok is None:
        return suite_tok.key == "gpt2" and model.config.vocab_size in (50257, 50304)
    try:
        theirs = hf_tok(probe, add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001
        return False
    return theirs == suite_tok.encode_batch([probe])[0] and suite_tok.vocab_size <= model.config.vocab_size


def text_nll(model, hf_tok, texts: list[str], first_context_id: int, stride: int | None = None) -> list[float]:
    """Σ −log p(text) (nats) of each text under the model's own tokenizer (retokenisation)."""
    out = []
    for t in texts:
        ids = hf_tok(t, add_special_tokens=False)["input_ids"] if t else []
        if not ids:
            out.append(0.0)
            continue
        out.append(float(causal_lm_token_nll(model, torch.tensor([ids]), first_context_id, stride).sum()))
    return out
