"""Reading configuration: a YAML file into one of the pydantic schemas (bench.config's, a
Slurm profile), and a pydantic ``ValidationError`` as one line naming the key path, e.g.
``suite.yaml: sizes.tiny.heads: heads (3) must divide hidden (128)``.
"""
from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from bench.errors import UserError
from bench.names import ECHO_MAX

MAX_YAML_VALUES = 100_000  # a suite or profile has a few hundred; aliases must not multiply them


class _TooBig(Exception):
    pass


def _expanded(obj, memo: dict, active: set) -> int:
    """Values in ``obj`` with every alias expanded (what a repr or a hash would walk); shared
    sub-trees are counted once per use but measured once. _TooBig past MAX_YAML_VALUES or on a
    recursive alias."""
    if not isinstance(obj, (dict, list)):
        return 1
    k = id(obj)
    if k in memo:
        return memo[k]
    if k in active:
        raise _TooBig("a recursive alias")
    active.add(k)
    n = 1
    for x in (obj.values() if isinstance(obj, dict) else obj):
        n += (1 if isinstance(obj, dict) else 0) + _expanded(x, memo, active)
        if n > MAX_YAML_VALUES:
            raise _TooBig(f"aliases that expand to more than {MAX_YAML_VALUES:,} values")
    active.discard(k)
    memo[k] = n
    return n


def drop_defaults(d, **defaults):
    """A pydantic dump ``d`` without the keys that hold the given values: a field added after run
    ids existed is absent from the dump while at its default, so every older id stays what it
    was (the wrap serializers of bench/config.py, bench/config_data.py and the methods' Params)."""
    if isinstance(d, dict):
        for k, v in defaults.items():
            if k in d and d[k] == v:
                del d[k]
    return d


def keypath(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "[key]":   # pydantic's marker for a bad dict key: the key is in the path
            out += ("." if out else "") + (str(part) or "''")
    return out or "<top>"


def first_error(e: ValidationError, prefix=()) -> str:
    err = e.errors()[0]
    loc = tuple(prefix) + tuple(x for x in err["loc"] if not str(x).startswith("function-"))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    path = keypath(loc)
    if len(path) > ECHO_MAX:   # a key is the user's text too
        path = path[:ECHO_MAX - 1] + "…"
    return f"{path}: {msg if len(msg) <= 2 * ECHO_MAX else msg[:2 * ECHO_MAX - 1] + '…'}"


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file; UserError naming the file when it is missing, not UTF-8
    text, empty, not YAML, or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (undecodable byte at offset {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror})") from None
    if not text.strip():
        raise UserError(f"{path}: empty file")
    try:
        raw = yaml.safe_load(text)
        _expanded(raw, {}, set())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    except RecursionError:
        raise UserError(f"{path}: YAML nested too deeply") from None
    except _TooBig as e:
        raise UserError(f"{path}: YAML with {e} (an alias bomb?); write the values out") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    if any(not isinstance(k, str) for k in raw):
        raise UserError(f"{path}: top-level keys must be strings")
    return raw


def read_validated(path: str | Path, model: type[BaseModel]):
    """A YAML file validated by a pydantic model; UserError naming the file and key path."""
    raw = read_yaml(path)
    try:
        return model(**raw)
    except ValidationError as e:
        raise UserError(f"{path}: {first_error(e)}") from None
