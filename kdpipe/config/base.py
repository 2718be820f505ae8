"""What every schema shares: strict validation, model names checked against the registry, and the merging of
nested mappings (recipes over sections, a method's recipe over the student's)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

from ..models import check_name

# kdpipe's models (kdpipe/models/) and the libraries' (`tv/<torchvision name>`, `timm/<timm name>`)
ModelName = Annotated[str, AfterValidator(check_name)]


class Strict(BaseModel):
    # strict: YAML's '12' (a string) is not an int; ints stay valid where a float is expected
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def pair_key(key: str) -> tuple[str, str]:
    """A per-pair key, "teacher->student", as (teacher, student); ValueError unless both are model names."""
    t, _, s = key.partition("->")
    try:
        check_name(t), check_name(s)
    except ValueError:
        raise ValueError(f"key {key!r} is not 'teacher->student' with two model names") from None
    return t, s


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flat(d: dict, prefix: tuple = ()) -> dict:
    """{(key, subkey, ...): value} of a nested mapping (tuple paths: model names may hold dots)."""
    out = {}
    for k, v in d.items():
        out.update(flat(v, prefix + (k,)) if isinstance(v, dict) and v else {prefix + (k,): v})
    return out


def nest(flat: dict) -> dict:
    out: dict = {}
    for (*parents, leaf), v in flat.items():
        node = out
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = v
    return out
