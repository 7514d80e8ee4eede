"""Names that become paths, and labels that are shown: the rules both obey, checked by the
schemas of bench.config (and bench.suite for the rows of ``methods:``).

- A **name** (a suite's ``name``, each key of ``sizes:``) becomes part of a path (the default
  output directory ``runs/<name>``, every run id and so every run directory). It is one plain
  path component: ``NAME_RULE``, at most ``NAME_MAX`` characters — no ``/``, ``\\``, ``..``,
  NUL, spaces or control characters, and no leading ``.`` or ``-`` (a hidden file, an option).
- A **label** (``methods[i].label``) never becomes a path but is printed in tables, the live
  view and logs: any text without control characters (line breaks, tabs, NUL), at most
  ``LABEL_MAX`` characters. Every output format escapes what is special to it (Rich markup,
  markdown ``|``, LaTeX, HTML, spreadsheet formulas).
"""
from __future__ import annotations

import re
import reprlib
import unicodedata
from typing import Annotated, Any

from pydantic import AfterValidator

NAME_MAX = 100
NAME_RULE = "[A-Za-z0-9_][A-Za-z0-9_.-]*"
_NAME = re.compile(rf"{NAME_RULE}\Z")
LABEL_MAX = 100
_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")  # text-direction overrides
ECHO_MAX = 200   # characters of a user's value quoted back in an error message


def check_name(v: str) -> str:
    if len(v) > NAME_MAX or not _NAME.match(v):
        raise ValueError(f"{clip(v)} is not a plain name: it becomes part of a path, so it must match "
                         f"{NAME_RULE} (letters, digits, _ . -; not starting with . or -), "
                         f"at most {NAME_MAX} characters")
    return v


def check_label(v: str) -> str:
    if len(v) > LABEL_MAX:
        raise ValueError(f"{clip(v, 40)} is longer than {LABEL_MAX} characters")
    bad = next((ch for ch in v if unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ch in _BIDI), None)
    if bad is not None:
        raise ValueError(f"{clip(v)} contains the control character {bad!r} (labels are one line of text)")
    return v


Name = Annotated[str, AfterValidator(check_name)]

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = ECHO_MAX, ECHO_MAX, 40


def clip(value: Any, n: int = ECHO_MAX) -> str:
    """A user's value as quoted in a message: its repr, bounded in cost and length (a YAML
    alias bomb's repr would be gigabytes; reprlib stops after a few items and levels)."""
    s = _REPR.repr(value)
    return s if len(s) <= n else s[: n - 1] + "…"
