"""Reading a params file: YAML, the sections a command needs, validation, paths relative to the file."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from ..models import is_weights_file
from .errors import ParamsError, describe
from .params import TRAIN_SECTIONS, Params


def validate(raw: object, schema: type[BaseModel] = Params) -> BaseModel:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(["params file must be a mapping of sections (data, teacher, student, …)"])
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise ParamsError([describe(err, schema) for err in e.errors()]) from None


def load_params(path: str | Path = "params.yaml", require: tuple[str, ...] = ()) -> Params:
    """Validate the params file; every section in `require` (the ones the command reads) must be present,
    so an empty or truncated file never silently trains a built-in default."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError([f"{path}: params file not found"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ParamsError([f"{path}: not valid YAML{where}: {what}"]) from None
    missing = [s for s in require if not (isinstance(raw, dict) and s in raw)]
    if missing:
        raise ParamsError([f"{path}: missing section {s!r} (this command reads it)" for s in missing])
    p = validate(raw)
    # files named in the params (data.path, a section's weights file) are relative to the params file's folder
    here = lambda f: f if Path(f).is_absolute() else os.path.normpath(path.parent / f)  # noqa: E731
    if p.data.path is not None:
        p = p.model_copy(update={"data": p.data.model_copy(update={"path": here(p.data.path)})})
    for role in TRAIN_SECTIONS:
        w = getattr(p, role).weights
        if w is not None and is_weights_file(w):
            p = p.model_copy(update={role: getattr(p, role).model_copy(update={"weights": here(w)})})
    return p
