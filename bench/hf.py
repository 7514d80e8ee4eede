"""Pretrained Hugging Face causal LMs: loading, exact per-token NLL, retokenisation.

- :func:`load_causal_lm`: a hub name (``gpt2``, ``gpt2-medium``, …) or a local
  ``save_pretrained`` directory → a ``transformers`` model in eval mode on ``device``.
- :func:`causal_lm_token_nll`: −log p(x_j | x_<j) for every position of a batch of id
  sequences, the first token conditioned on ``first_context_id`` (GPT-2: ``<|endoftext|>``),
  as lm-eval's rolling loglikelihood does. Sequences longer than the model's context are
  scored in windows: each window predicts up to ``stride`` new tokens with the preceding
  ``n_ctx − stride`` (at most) tokens as context, so every token is predicted exactly once
  and never sees more than ``n_ctx`` positions (stride = n_ctx: lm-eval's disjoint rolling
  windows; a smaller stride buys more context per token for more compute).
- :func:`load_tokenizer` / :func:`same_tokenizer`: the model's own tokenizer, when it has one,
  and whether the suite's ids can be scored as they are.
"""
from __future__ import annotations

from pathlib import Path

import torch

from bench.errors import UserError


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0][:240]}" if s else type(e).__name__


def load_causal_lm(name_or_path: str, device="cpu"):
    """A causal LM in eval mode; UserError naming ``name_or_path`` if it cannot be loaded."""
    from transformers import AutoModelForCausalLM

    local = Path(name_or_path).expanduser()
    is_dir = local.is_dir()
    if not is_dir and (name_or_path.startswith((".", "/", "~")) or local.exists()):
        raise UserError(f"{name_or_path}: not a model directory (save_pretrained writes one)")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(local) if is_dir else name_or_path,
                                                     local_files_only=is_dir, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - missing files, no network, not a causal LM
        where = "local directory" if is_dir else "Hugging Face hub model"
        raise UserError(f"{name_or_path}: cannot load this {where} as a causal LM ({_first_line(e)})") from None
    return model.to(device).eval()


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


def context_length(model) -> int:
    c = model.config
    for k in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        v = getattr(c, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return 1024


def bos_id(model, tokenizer=None) -> int:
    """The id the first token is conditioned on: BOS (GPT-2's is ``<|endoftext|>``), else EOS."""
    for src in (tokenizer, model.config, getattr(model, "generation_config", None)):
        for k in ("bos_token_id", "eos_token_id"):
            v = getattr(src, k, None) if src is not None else None
            if isinstance(v, int):
                return v
    raise UserError("hf-causal-lm: the model defines neither bos_token_id nor eos_token_id; "
                    "cannot condition the first token")


@torch.no_grad()
def causal_lm_token_nll(model, ids: torch.LongTensor, first_context_id: int, stride: int | None = None) -> torch.Tensor:
    """(B, L) float64 −log p(ids[:, j] | first_context_id, ids[:, :j]); see the module docstring."""
    n_ctx = context_length(model)
    stride = min(stride or n_ctx, n_ctx)
    B, L = ids.shape
    dev = next(model.parameters()).device
    seq = torch.cat([torch.full((B, 1), first_context_id, dtype=torch.long), ids.long().cpu()], dim=1).to(dev)
    out = torch.empty(B, L, dtype=torch.float64)
    for a in range(0, L, stride):
        b = min(a + stride, L)          # predict ids[a:b] = seq[a+1:b+1]
        s = max(0, b - n_ctx)           # window seq[s:b] (≤ n_ctx positions) as input
        logits = model(input_ids=seq[:, s:b]).logits[:, a - s:]
        logp = torch.log_softmax(logits.double(), dim=-1)
        out[:, a:b] = -logp.gather(-1, seq[:, a + 1:b + 1, None])[..., 0].cpu()
    return out


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
