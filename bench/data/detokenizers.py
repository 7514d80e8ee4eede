"""Detokenizers: undo the word-level tokenisation that WikiText, PTB, 1BW/LM1B and LAMBADA
ship with, before a subword tokenizer sees the text.

These are the rules the zero-shot likelihood literature applies (SEDD ``data.py``, MDLM
``dataloader.py``; written here from their description, see REFERENCES.md): without them a
GPT-2 tokenizer sees `` @-@ `` and `` , `` and the perplexity is not comparable to the
published tables. Each is a pure ``str -> str`` function, tested on fixture lines shaped like
the real data (tests/test_hub_data.py).
"""
from __future__ import annotations

import re
from typing import Callable

_PAIRED = [(re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"), (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
           (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"), (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
           (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'")]


def wikitext(s: str) -> str:
    """WikiText (raw): ``@-@ @,@ @.@`` number separators, spaces before punctuation, spaces
    inside brackets/quotes, spaced heading markers ``= = Title = =``, `` 's``."""
    s = s.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for sep in "-,.":
        s = s.replace(f" @{sep}@ ", sep)
    for p in ":;.!?,":
        s = s.replace(f" {p} ", f"{p} ")
    for pat, rep in _PAIRED:
        s = pat.sub(rep, s)
    for n in (4, 3, 2):
        s = s.replace(" ".join("=" * n), "=" * n)
    s = s.replace(" \u00b0 ", "\u00b0")
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ")
    return s.replace(" 's", "'s")


def ptb(s: str) -> str:
    """Penn Treebank (Mikolov's text-only version): `` 's``, `` n't``, ``\\/``, the number
    placeholder ``N`` (→ 1), ``$ 1``, and ``<unk>`` (→ ``?``)."""
    s = s.replace(" 's", "'s").replace("s ' ", "s' ").replace(" n't", "n't")
    s = s.replace(" \n ", "\n").replace("\\/", "/")
    while " N " in s:  # overlapping matches ("N N N") need repeated passes
        s = s.replace(" N ", " 1 ")
    s = s.replace("$ 1", "$1").replace("# 1", "#1")
    return s.replace("<unk>", "?")


def lm1b(s: str) -> str:
    """One Billion Words / LM1B: spaced URLs, clitics, sentence-final punctuation, spaces
    inside quotes and brackets, currency symbols."""
    s = s.replace("http : / / ", "http://").replace("https : / / ", "https://")
    s = re.sub(r" '(\w+)", r"'\1", s)
    s = re.sub(r" (\w+) \. ", r" \1. ", s)
    s = re.sub(r" (\w+) \.$", r" \1.", s)
    for p in "?!":
        s = s.replace(f" {p} ", f"{p} ")
        s = re.sub(rf" \{p}$", p, s)
    for p in ",:;":
        s = s.replace(f" {p} ", f"{p} ")
    s = s.replace(" / ", "/")
    s = re.sub(r"\" ([^\"]+) \"", r'"\1"', s)
    s = re.sub(r"' ([^']+) '", r"'\1'", s)
    s = re.sub(r"\( ([^\(\)]+) \)", r"(\1)", s)
    s = re.sub(r"\[ ([^\[\]]+) \]", r"[\1]", s)
    return s.replace("$ ", "$").replace("£ ", "£")


def lambada(s: str) -> str:
    """LAMBADA (OpenAI's version): curly double quotes → straight; the passage starts on a
    new line (as SEDD/MDLM score it: whole-passage perplexity)."""
    return "\n" + s.replace("\u201c", '"').replace("\u201d", '"').strip()


def scientific_papers(s: str) -> str:
    """PubMed / arXiv articles (MDLM dataloader.py ``scientific_papers_detokenizer``): the
    WikiText rules, then the LM1B rules."""
    return lm1b(wikitext(s))


def identity(s: str) -> str:
    return s


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "wikitext": wikitext, "ptb": ptb, "lm1b": lm1b, "lambada": lambada,
    "scientific_papers": scientific_papers, "none": identity}
