"""params' `distill` section: what every method's params schema shares (each method's own sits in its file,
kdpipe/distill/<name>.py, registered with its term), the section built from the registry (`Distill`, one key per
method of `METHODS`), and `--method` parsing."""

from __future__ import annotations

from typing import Optional

from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from .base import Strict, deep_merge, pair_key
from .errors import ParamsError, describe
from .train import Train

# loss = gamma * CE(student, labels) + alpha * KD(T) + beta * (feature term); defaults are the common
# CIFAR conventions (RepDistiller). A combination (`--method kd+at`) takes gamma from its first method,
# alpha and T from `kd` when it is included (else from the first method), and each method's beta.
RECIPE_KEYS = ("epochs", "batch_size", "optim", "schedule")  # a training section's keys a recipe sets


class MethodParams(Strict):
    # the student's training where this method's published figure used another recipe than the pipeline's
    # (e.g. Nesterov, no decay on norm weights and biases, batch, lr): keys of a training section
    # (epochs, batch_size, optim, schedule) merged over the `student` section's; {}: the student's recipe
    train: dict = {}
    # keys of this method set per pair where its references tune them (mdistiller's DKD configs, WKD's, SDD's):
    # "teacher->student": {key: value}, any key but train (the recipe, chosen before the pair is known) and by_pair;
    # `for_pair` applies them, and they are validated as the method's own
    by_pair: dict[str, dict] = {}

    @field_validator("train")
    @classmethod
    def _train_keys(cls, v: dict) -> dict:
        unknown = sorted(set(v) - set(RECIPE_KEYS))
        if unknown:
            raise ValueError(f"{', '.join(map(str, unknown))}: not a recipe key (valid: {', '.join(RECIPE_KEYS)})")
        try:
            Train.model_validate(deep_merge(Train().model_dump(), v))
        except ValidationError as e:
            raise ValueError("; ".join(describe(err, Train) for err in e.errors())) from None
        return v

    @model_validator(mode="after")
    def _by_pair(self):
        for key, keys in self.by_pair.items():
            try:
                pair_key(key)
            except ValueError as e:
                raise ValueError(f"by_pair: {e}") from None
            wrong = sorted(k for k in keys if k in ("train", "by_pair") or k not in type(self).model_fields)
            if wrong:
                raise ValueError(f"by_pair.{key}: {', '.join(map(str, wrong))}: not a key this method sets per pair "
                                 f"(any of its keys but train and by_pair)")
            self._with(keys, f"by_pair.{key}")
        return self

    def _with(self, keys: dict, where: str):
        try:
            return type(self).model_validate({**self.model_dump(exclude={"by_pair"}), **keys})
        except ValidationError as e:
            raise ValueError("; ".join(f"{where}: {describe(err, type(self))}" for err in e.errors())) from None

    def for_pair(self, teacher: str, student: str):
        """This method's params for `teacher -> student`: its `by_pair` keys of that pair set, `by_pair` emptied
        (what the run records is what it used)."""
        return self._with(self.by_pair.get(f"{teacher}->{student}", {}), f"by_pair.{teacher}->{student}")


def epoch_count(default: int, **kw):
    """A key counted in epochs of the run (a warm-up, an init stage, a decay's epochs): set for the published
    recipe's 240 CIFAR epochs, scaled with the run where `kdpipe init` writes it (`epoch_keys`)."""
    return Field(default, json_schema_extra={"epoch_count": True}, **kw)


def epoch_keys(params: type[MethodParams]) -> list[str]:
    """The keys of a method's params counted in epochs."""
    return [n for n, f in params.model_fields.items() if (f.json_schema_extra or {}).get("epoch_count")]


def logit_std_field():
    return Field(False, description="Sun et al. 2024: standardise both logits, (z - mean) / (1e-7 + std) per row, "
                                    "before this method's loss")


class FeatureParams(MethodParams):
    gamma: float = Field(1.0, ge=0)
    alpha: float = Field(0.0, ge=0)
    temperature: float = Field(4.0, gt=0)
    beta: float = Field(1.0, ge=0)


class Sections(Strict):
    """What `Distill`, the `distill` section, has besides its fields: one per method."""

    def for_pair(self, teacher: str, student: str) -> "Distill":
        """These params with each method's `by_pair` keys of `teacher -> student` applied."""
        return self.model_copy(update={m: getattr(self, m).for_pair(teacher, student) for m in type(self).model_fields})


def _distill() -> type[Sections]:
    """The `distill` section's schema: a key per method of the registry, in its order, each the params schema the
    method's file registers beside its loss. So validating a params file imports every method's file (a stage's
    results still depend on its own methods' files alone: it reads the others to validate, as
    kdpipe.project.VALIDATION_ONLY says). Imported here, below the shared schemas the method files build on."""
    from ..distill.base import METHODS, get

    return create_model("Distill", __base__=Sections, __module__=__name__,
                        **{m: (get(m).params, get(m).params()) for m in METHODS})


Distill = _distill()
METHODS: tuple[str, ...] = tuple(Distill.model_fields)  # the registry's list, in its order


def parse_methods(spec: str) -> list[str]:
    """`kd+at` -> ["kd", "at"], with a clear error for unknown or repeated names."""
    names = [m.strip() for m in spec.split("+")]
    if "" in names:
        raise ParamsError([f"--method: {spec!r} has an empty term; valid: {', '.join(METHODS)} (combine with +, e.g. kd+at)"])
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ParamsError([f"--method: unknown method {', '.join(map(repr, unknown)) or repr(spec)}; "
                           f"valid: {', '.join(METHODS)} (combine with +, e.g. kd+at)"])
    if len(set(names)) != len(names):
        raise ParamsError([f"--method: {spec!r} names a method twice"])
    return names


def parse_run(spec: str, variants: dict) -> tuple[list[str], Optional[str]]:
    """`--method`: methods combined with +, the last term optionally a tag of `variants` (`kd+ls`, `dkd+ls`):
    the methods and the tag (None without one). The tag must define each of the methods."""
    *head, last = spec.split("+")
    if head and last in variants:
        methods = parse_methods("+".join(head))
        missing = [m for m in methods if m not in variants[last]]
        if missing:
            raise ParamsError([f"--method: {spec!r}: variants.{last} defines no {', '.join(missing)} "
                               f"(it has: {', '.join(variants[last]) or 'none'})"])
        return methods, last
    return parse_methods(spec), None
