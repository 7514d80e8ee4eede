"""Hugging Face causal language models: loading by hub name or local path, per-token NLL.

Two functions, shared by every part of the harness that needs a pretrained causal LM (the
generative-perplexity scorer, the ``hf-causal-lm`` method):

- ``load_causal_lm(name_or_path, device)``: a ``transformers`` model in eval mode. A local
  directory is loaded with ``local_files_only`` (never touches the hub); anything that cannot
  be loaded is a :class:`UserError` naming it.
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

from pathlib import Path

import torch

from bench.errors import UserError


def load_causal_lm(name_or_path: str, device="cpu"):
    from transformers import AutoModelForCausalLM

    local = Path(name_or_path).is_dir()
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=local)
    except Exception as e:  # noqa: BLE001 - any loading failure is the user's path/name
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        where = "local directory" if local else "model name (hub unreachable or unknown?)"
        raise UserError(f"{name_or_path}: cannot load a causal LM from this {where}: {first}") from None
    return model.to(device).eval()


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


def load_tokenizer(name_or_path: str):
    """The model's own tokenizer, or None when the directory holds none (or offline)."""
    from transformers import AutoTokenizer

    local = Path(name_or_path).expanduser()
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        return None  # (transformers would build an empty tokenizer from config.json alone)
    try:
        tok = AutoTokenizer.from_pretrained(str(local) if local.is_dir() else name_or_path,
                                            local_files_only=local.is_dir())
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
