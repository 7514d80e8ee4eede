"""Public benchmark corpora through Hugging Face ``datasets``: hub names, split rules,
detokenizers, and local copies laid out like the hub's.

Every dataset here is loaded by one function, :func:`load_split`, which calls
``datasets.load_dataset`` either with the hub name and config (the default) or, when the
suite gives ``path:``, with a local copy: a directory laid out like the hub repository
(``wikitext-103-raw-v1/test-00000-of-00001.parquet``, ``penn_treebank/test/0000.parquet``,
``lambada_test.jsonl``, …; a sub-directory named like the hub config is used when present),
or a single file (``.parquet``, ``.jsonl``/``.json``, ``.csv``; anything else is read as text,
one row per line, or the whole file as one row for text8). The rows then pass through the
dataset's split rule and its detokenizer (bench.data.detokenizers) — the same code whether the
rows came from the hub or from disk.

Split rules (our ``train`` / ``valid`` / ``test``):

- ``openwebtext``: the hub has only ``train``; the last min(100 000, ⌊n/10⌋) documents are
  held out as ``valid`` (= ``test``), the rest is ``train`` (MDLM: ``train[-100000:]``; on the
  real 8 013 769 documents the held-out tail is exactly 100 000).
- ``wikipedia``: the same rule with 10 000 documents.
- ``wikitext2`` / ``wikitext103``: the hub's train / validation / test; each hub row (one line
  of the article, empty lines included) is a document, as SEDD and MDLM tokenize them, so
  ``eos_per_doc`` appends one EOS per row. ``{name: wikitext103, documents: articles}`` joins
  the rows of each article (a `` = Title = `` line starts one) instead.
- ``ptb``: the hub's train / validation / test, one sentence per row (field ``sentence``).
- ``lm1b`` (= ``1bw``): the hub's train / test, one sentence per row; ``valid`` is ``test``.
- ``lambada``: OpenAI's LAMBADA test set (5 153 passages), whole-passage perplexity (not
  lm-eval's last-word task); test only.
- ``text8``: one 100 M-character string; characters [0, 0.9n) train, [0.9n, 0.95n) valid,
  [0.95n, n) test (90M / 5M / 5M on the real file, as D3PM, MDLM and MD4 split it).
- ``rocstories``: the hub's train / test (``valid`` = ``test``), one five-sentence story per row.
- ``ag_news``, ``pubmed``, ``arxiv``: MDLM's added zero-shot sets (Sahoo et al. 2024, Table 3),
  split as MDLM's ``get_dataloaders`` scores them: AG News (field ``text``) its ``test`` split;
  PubMed and arXiv (``scientific_papers``, field ``article``, MDLM's ``scientific_papers``
  detokenizer: the WikiText rules then the LM1B rules) their ``validation`` split, which is our
  ``test`` (= ``valid``) here.

Hub names are as the reference code loads them (SEDD ``data.py``, MDLM ``dataloader.py``):
the hub path is exercised only where the hub is reachable; tests run the same code on local
files laid out like the hub's.
"""
from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict

from bench.errors import UserError

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class HubSource:
    hub: str                       # Hugging Face dataset id (or hf:// file for raw-file datasets)
    config: Optional[str]
    field: str                     # the text column
    detokenizer: str               # bench.data.detokenizers name
    splits: dict[str, str]         # our split -> the hub split it is cut from
    rule: Literal["hub", "heldout_tail", "char_fraction"] = "hub"
    heldout: int = 0               # heldout_tail: documents held out at most
    whole_file: bool = False       # a raw text file is one row (text8), not one row per line
    doc: str = ""
    extra: dict = field(default_factory=dict)


_TRAIN_VALID_TEST = {"train": "train", "valid": "validation", "test": "test"}
_SCI = {"train": "train", "valid": "validation", "test": "validation"}   # MDLM scores the validation split

SOURCES: dict[str, HubSource] = {
    "openwebtext": HubSource("Skylion007/openwebtext", None, "text", "none",
                             {"train": "train", "valid": "train", "test": "train"}, rule="heldout_tail",
                             heldout=100_000, doc="OpenWebText (Gokaslan & Cohen 2019), GPT-2's WebText recreated"),
    "wikitext2": HubSource("Salesforce/wikitext", "wikitext-2-raw-v1", "text", "wikitext", _TRAIN_VALID_TEST,
                           doc="WikiText-2 raw (Merity et al. 2016)"),
    "wikitext103": HubSource("Salesforce/wikitext", "wikitext-103-raw-v1", "text", "wikitext", _TRAIN_VALID_TEST,
                             doc="WikiText-103 raw (Merity et al. 2016)"),
    "ptb": HubSource("ptb-text-only/ptb_text_only", "penn_treebank", "sentence", "ptb", _TRAIN_VALID_TEST,
                     doc="Penn Treebank, Mikolov's text-only version"),
    "lm1b": HubSource("lm1b", None, "text", "lm1b",
                      {"train": "train", "valid": "test", "test": "test"},
                      doc="One Billion Word benchmark (Chelba et al. 2013), as MDLM's LM1B"),
    "1bw": HubSource("lm1b", None, "text", "lm1b",
                     {"train": "train", "valid": "test", "test": "test"},
                     doc="One Billion Word benchmark, SEDD's zero-shot 1BW (same corpus as lm1b)"),
    "lambada": HubSource("EleutherAI/lambada_openai", "en", "text", "lambada", {"test": "test"},
                         doc="LAMBADA, OpenAI's version (whole-passage perplexity)"),
    "text8": HubSource("hf://datasets/ardMLX/text8/text8", None, "text", "none",
                       {"train": "train", "valid": "train", "test": "train"}, rule="char_fraction",
                       whole_file=True, doc="text8 (Mahoney 2011): 100M characters of Wikipedia, a-z and space"),
    "rocstories": HubSource("mintujupally/ROCStories", None, "text", "none",
                            {"train": "train", "valid": "test", "test": "test"},
                            doc="ROCStories (Mostafazadeh et al. 2016), TEncDM's short-story set"),
    "ag_news": HubSource("fancyzhx/ag_news", None, "text", "none",
                         {"train": "train", "valid": "test", "test": "test"},
                         doc="AG News (Zhang et al. 2015), MDLM's zero-shot set (test split)"),
    "pubmed": HubSource("armanc/scientific_papers", "pubmed", "article", "scientific_papers", _SCI,
                        doc="PubMed articles (Cohan et al. 2018), MDLM's zero-shot set (validation split)"),
    "arxiv": HubSource("armanc/scientific_papers", "arxiv", "article", "scientific_papers", _SCI,
                       doc="arXiv articles (Cohan et al. 2018), MDLM's zero-shot set (validation split)"),
    "wikipedia": HubSource("wikimedia/wikipedia", "20231101.en", "text", "none",
                           {"train": "train", "valid": "train", "test": "train"}, rule="heldout_tail",
                           heldout=10_000, doc="English Wikipedia (TEncDM's Wikipedia table)"),
}


class HubParams(BaseModel):
    """Parameters of a hub dataset in a suite: ``{name: wikitext103, path: DIR_OR_FILE}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: Optional[str] = None     # a local copy laid out like the hub's (offline / mirrors)
    documents: Literal["rows", "articles"] = "rows"   # wikitext only: hub rows or whole articles


class TextfileParams(BaseModel):
    """``{name: textfile, path: FILE}``: your own UTF-8 text, documents separated by blank lines."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str


# ----------------------------------------------------------------------------- fingerprints
def path_fingerprint(path: str, where: str = "path") -> str:
    """Identity of a local copy for the block cache: every file's relative path, size, mtime."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{where}: {path}: not found")
    files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file() and ".cache" not in x.parts)
    h = hashlib.sha256(str(p.resolve()).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if f != p else f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def source_fingerprint(name: str, params: BaseModel) -> str:
    if name == "textfile":
        return "file:" + path_fingerprint(params.path, "textfile.path")
    src = SOURCES[name]
    where = f"local:{path_fingerprint(params.path, f'{name}.path')}" if params.path else f"hub:{src.hub}/{src.config}"
    return f"{where}:{getattr(params, 'documents', 'rows')}"


# ----------------------------------------------------------------------------- loading
_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def _datasets_error(where: str, e: BaseException) -> UserError:
    while e.__cause__ is not None or (e.__context__ is not None and "generating the dataset" in str(e)):
        e = e.__cause__ or e.__context__   # the root cause (datasets wraps parse errors)
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(f"{where}: {type(e).__name__}: {msg[:300]}")


@contextmanager
def _quiet_datasets():
    """datasets logs a failed file read (with a traceback) before raising; we report it once."""
    import logging

    logs = [logging.getLogger(n) for n in ("datasets", "huggingface_hub")]
    levels = [x.level for x in logs]
    for x in logs:
        x.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for x, lv in zip(logs, levels):
            x.setLevel(lv)


def _load_local(name: str, src: HubSource, path: str, hub_split: str):
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{name}.path: {path}: not found")
    cache = str(_hf_cache())
    try:
        with _quiet_datasets():
            return _load_local_files(src, p, hub_split, cache)
    except UserError:
        raise
    except ValueError as e:
        if "split" in str(e).lower() and "generating" not in str(e).lower():
            raise UserError(f"{name}.path: {path}: no '{hub_split}' split (files are matched by name: "
                            f"{hub_split}-*.parquet, {hub_split}/…, *{hub_split}*.jsonl)") from None
        raise _datasets_error(f"{name}.path: {path}", e) from None
    except Exception as e:  # noqa: BLE001 - pyarrow/json parse errors of a malformed file
        raise _datasets_error(f"{name}.path: {path}", e) from None


def _load_local_files(src: HubSource, p: Path, hub_split: str, cache: str):
    import datasets

    if p.is_file():
        builder = _BUILDERS.get(p.suffix.lower(), "text")
        kw = {"sample_by": "document"} if builder == "text" and src.whole_file else {}
        return datasets.load_dataset(builder, data_files={hub_split: str(p)}, split=hub_split, cache_dir=cache, **kw)
    data_dir = src.config if src.config and (p / src.config).is_dir() else None
    kw = {"sample_by": "document"} if src.whole_file else {}
    return datasets.load_dataset(str(p), data_dir=data_dir, split=hub_split, cache_dir=cache, **kw)


def _load_hub(name: str, src: HubSource, hub_split: str):
    import datasets

    try:
        with _quiet_datasets():
            if src.hub.startswith("hf://"):  # a raw file in a hub repository (text8)
                return datasets.load_dataset("text", data_files={hub_split: src.hub}, split=hub_split,
                                             sample_by="document" if src.whole_file else "line")
            return datasets.load_dataset(src.hub, src.config, split=hub_split)
    except Exception as e:  # noqa: BLE001 - offline, gated, renamed: one line, and the way out
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{name}: cannot load '{src.hub}'{f' ({src.config})' if src.config else ''} from the "
                        f"Hugging Face hub ({type(e).__name__}: {msg}); give a local copy with "
                        f"{{name: {name}, path: DIR_OR_FILE}} or `tdbench data prepare {name} --path P`") from None


def _hf_cache() -> Path:
    from bench.data.paths import cache_dir

    return cache_dir() / "hf-datasets"


def split_documents(name: str, params: BaseModel, split: str):
    """The documents of one split as a ``datasets.Dataset`` with one column ``text``, raw
    (not yet detokenized). UserError naming the dataset / file on any bad input."""
    import datasets

    if split not in SPLITS:
        raise UserError(f"{name}: unknown split '{split}' (one of {', '.join(SPLITS)})")
    if name == "textfile":
        return datasets.Dataset.from_dict({"text": textfile_documents(params.path)})
    src = SOURCES[name]
    if split not in src.splits:
        raise UserError(f"{name}: has no '{split}' split (only {', '.join(src.splits)}); "
                        f"it is an evaluation set")
    hub_split = src.splits[split]
    ds = _load_local(name, src, params.path, hub_split) if params.path else _load_hub(name, src, hub_split)
    where = f"{name}.path: {params.path}" if params.path else name
    if src.field not in ds.column_names:
        raise UserError(f"{where}: no '{src.field}' column (columns: {', '.join(ds.column_names)})")
    ds = ds.select_columns([src.field])
    if src.field != "text":
        ds = ds.rename_column(src.field, "text")
    n = len(ds)
    if src.rule == "heldout_tail":
        k = min(src.heldout, n // 10)
        if k < 1:
            raise UserError(f"{where}: {n} documents; need at least 10 to hold out a {split} tail")
        ds = ds.select(range(0, n - k) if split == "train" else range(n - k, n))
    elif src.rule == "char_fraction":
        text = "".join(ds["text"])
        a, b = {"train": (0.0, 0.9), "valid": (0.9, 0.95), "test": (0.95, 1.0)}[split]
        ds = datasets.Dataset.from_dict({"text": [text[int(a * len(text)): int(b * len(text))]]})
    if getattr(params, "documents", "rows") == "articles":
        if src.detokenizer != "wikitext":
            raise UserError(f"{name}.documents: 'articles' is for wikitext2/wikitext103 only")
        ds = datasets.Dataset.from_dict({"text": wikitext_articles(ds["text"])})
    if len(ds) == 0:
        raise UserError(f"{where}: the {split} split is empty")
    return ds


_ARTICLE = re.compile(r"^ = [^=].* = \n?$")


def wikitext_articles(rows: list[str]) -> list[str]:
    """Join WikiText rows into articles: a row `` = Title = `` (one ``=``) starts one."""
    out, cur = [], []
    for r in rows:
        if _ARTICLE.match(r) and any(x.strip() for x in cur):
            out.append("".join(cur))
            cur = []
        cur.append(r)
    if any(x.strip() for x in cur):
        out.append("".join(cur))
    return out


def textfile_documents(path: str) -> list[str]:
    """A UTF-8 file's documents: blank-line separated (no blank line: one document)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"textfile.path: {path}: {'is a directory' if p.is_dir() else 'not found'}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"textfile.path: {path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    docs = [d.strip("\n") for d in re.split(r"\n(?:[ \t]*\n)+", text.replace("\r\n", "\n"))]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"textfile.path: {path}: no text")
    return docs
