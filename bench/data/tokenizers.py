"""Tokenizers: GPT-2 BPE offline from the files shipped in the package (ids identical to
OpenAI's), a byte-level BPE trained on the training split (cached, deterministic), the
character-level tokenizer of text8 (27 symbols), a pretrained model's own tokenizer
(``PretrainedTokenizer``), and the identity "tokenizer" of synthetic sources."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np

GPT2_DIR = Path(__file__).parent / "assets" / "gpt2"
EOT = "<|endoftext|>"


class Tokenizer:
    """The harness-facing interface: ``encode_batch``, ``decode``, ``vocab_size``, ``eos_id``."""

    key: str
    vocab_size: int
    eos_id: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError


class HFTokenizer(Tokenizer):
    def __init__(self, tok, key: str):
        self._tok = tok
        self.key = key
        self.vocab_size = tok.get_vocab_size()
        self.eos_id = tok.token_to_id(EOT)

    def encode_batch(self, texts):
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids):
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class PretrainedTokenizer(Tokenizer):
    """A pretrained model's own tokenizer (``tokenizer: {name: hf, model: ...}``), a
    ``transformers`` tokenizer: texts encoded without the special tokens it would add (a
    Llama-style BOS), documents separated by its EOS (SmolLM2 converted: ``<|endoftext|>``,
    id 0); ``vocab_size`` counts its added tokens too. ``key`` names it by the model and the
    sha256 of its serialised vocabulary and rules (so a changed tokenizer is a new block cache)."""

    def __init__(self, tok, model: str):
        import hashlib

        self._tok = tok
        self.vocab_size = len(tok)
        self.eos_id = tok.eos_token_id if isinstance(tok.eos_token_id, int) else -1
        backend = getattr(tok, "backend_tokenizer", None)
        rules = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name or "model")[:40]
        self.key = f"hf-{slug}-{hashlib.sha256(rules.encode()).hexdigest()[:12]}"

    def encode_batch(self, texts):
        return [list(ids) for ids in self._tok(list(texts), add_special_tokens=False)["input_ids"]] if texts else []

    def decode(self, ids):
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class IdentityTokenizer(Tokenizer):
    """Synthetic sources emit token ids directly; there is no EOS."""

    def __init__(self, vocab_size: int):
        self.key = f"identity-{vocab_size}"
        self.vocab_size = vocab_size
        self.eos_id = -1

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)


class CharTokenizer(Tokenizer):
    """text8's character level: 27 symbols, ``a``–``z`` (ids 0–25) and space (id 26).

    Normalisation follows Matt Mahoney's ``wikifil.pl``, which made text8 from Wikipedia:
    lowercase; each digit spelled out as a word (``2`` → `` two ``); every other character
    outside ``a``–``z`` (punctuation, newlines, accented letters) becomes a space; runs of
    spaces collapse to one. text8 is one stream of concatenated articles, so each document is
    encoded as its normalised text followed by one space (no leading space): documents packed
    with ``packing: none`` read exactly like text8. There is no EOS (``eos_id`` = −1), so the
    protocol must use ``packing: none``; every token is one character, so bits per character
    is log₂ of the token perplexity."""

    ALPHABET = "abcdefghijklmnopqrstuvwxyz "
    DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

    def __init__(self):
        self.key = "char-text8"
        self.vocab_size = len(self.ALPHABET)
        self.eos_id = -1
        self._lut = np.full(128, 26, dtype=np.int32)
        self._lut[97:123] = np.arange(26)

    @classmethod
    def normalize(cls, text: str) -> str:
        """The text8 string of ``text`` (see the class docstring)."""
        text = text.lower()
        for d, w in enumerate(cls.DIGITS):
            text = text.replace(str(d), f" {w} ")
        text = re.sub(r"[^a-z]+", " ", text)
        return text.strip(" ")

    def encode(self, text: str) -> list[int]:
        norm = self.normalize(text)
        if not norm:
            return []
        b = np.frombuffer((norm + " ").encode("ascii"), dtype=np.uint8)
        return self._lut[b].tolist()

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return "".join(self.ALPHABET[int(i)] if 0 <= int(i) < len(self.ALPHABET) else "\ufffd" for i in ids)


def gpt2() -> Tokenizer:
    from tokenizers import Tokenizer as _T
    from tokenizers import decoders, pre_tokenizers
    from tokenizers.models import BPE

    vocab = json.loads((GPT2_DIR / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in
              (GPT2_DIR / "merges.txt").read_text(encoding="utf-8").split("\n")[1:] if line]
    tok = _T(BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    return HFTokenizer(tok, "gpt2")


def train_bpe(texts: list[str], vocab_size: int, path: Path, key: str) -> Tokenizer:
    """Byte-level BPE trained on ``texts``; cached at ``path`` (written atomically)."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers import Tokenizer as _T

    if path.is_file():
        try:
            return HFTokenizer(_T.from_file(str(path)), key)
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is derived data: rebuild it
            print(f"warning: {path}: unreadable cached tokenizer ({type(e).__name__}); retraining it",
                  file=sys.stderr)
            path.unlink(missing_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                            show_progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    bpe.save(str(tmp))
    os.replace(tmp, path)
    return HFTokenizer(_T.from_file(str(path)), key)


def encode_to_array(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.int32) for ids in tok.encode_batch(texts)]
