"""kdpipe's error classes, and a params file's validation errors as one line per problem naming the full key
path (with the closest valid key for a typo)."""

from __future__ import annotations

import difflib
from typing import Optional

from pydantic import BaseModel


class Error(RuntimeError):
    """kdpipe's own errors about input a user can fix (data, checkpoints, training, export): the CLI prints
    one line and exits non-zero."""


class UsageError(Error):
    """A command's options that do not fit together (the CLI exits 2, as for a bad option)."""


class ParamsError(ValueError):
    """A params file that does not validate; `lines` holds one message per problem."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


def _key_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-after")))


def _schema_at(model: type[BaseModel], loc: tuple) -> Optional[type[BaseModel]]:
    """The schema class that holds the key at `loc`, to suggest valid keys for a typo."""
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def describe(err: dict, root: type[BaseModel]) -> str:
    loc = err["loc"]
    path = _key_path(loc)
    if err["type"] == "extra_forbidden":
        parent = _schema_at(root, loc[:-1])
        valid = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else (f" (valid keys: {', '.join(valid)})" if valid else "")
        return f"{path}: unknown key{hint}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] not in ("missing",) and "input" in err and not isinstance(err["input"], dict):
        msg += f" (got {err['input']!r})"
    return f"{path}: {msg}" if path else msg
