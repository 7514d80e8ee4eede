"""Reading configuration: a YAML file into one of the pydantic schemas (bench.config's, a
Slurm profile), and a pydantic ``ValidationError`` as one line naming the key path, e.g.
``suite.yaml: sizes.tiny.heads: heads (3) must divide hidden (128)``.
"""
from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from bench.errors import UserError


def keypath(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part:
            out += ("." if out else "") + str(part)
    return out or "<top>"


def first_error(e: ValidationError, prefix=()) -> str:
    err = e.errors()[0]
    loc = tuple(prefix) + tuple(x for x in err["loc"] if not str(x).startswith("function-"))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{keypath(loc)}: {msg}"


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
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
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
