"""The whole params file (`Params`): its sections, the named recipes merged into the training sections, the
full pipelines' grid (models, pairs, seeds, methods, variants)."""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ValidationError, field_validator, model_validator

from .base import ModelName, Strict, deep_merge, flat, nest
from .data import Data
from .deploy import Measure, Qat, Quantize
from .distill import METHODS, Distill
from .errors import ParamsError, describe
from .train import Evaluate, Recipe, Train


class Pair(Strict):
    teacher: ModelName
    student: ModelName


TRAIN_SECTIONS = ("teacher", "student", "table")  # the sections that train a model (a recipe each)
DEPLOY_SECTIONS = ("quantize", "qat", "measure")  # read by `kdpipe quantize`, `qat`, `measure` alone (init projects)


class Params(Strict):
    data: Data = Data()
    recipes: dict[str, Recipe] = {}
    teacher: Train = Train(model="resnet56")
    student: Train = Train(model="resnet20")
    table: Train = Train()  # the full pipelines' `table@` stages: the ResNet table (He et al.'s recipe)
    distill: Distill = Distill()
    evaluate: Evaluate = Evaluate()
    quantize: Quantize = Quantize()  # `kdpipe quantize` (optional: these defaults)
    qat: Qat = Qat()  # `kdpipe qat` (optional: these defaults)
    measure: Measure = Measure()  # `kdpipe measure` (optional: these defaults)
    # the grid of the full pipelines (pipelines/cifar10, cifar100, imagenet)
    # the command their training stages run: kdpipe, or kdpipe under torchrun for DDP on several GPUs
    # (`torchrun --nproc-per-node 8 -m kdpipe`); the global batch_size and lr stay the params' (runtime.py)
    launch: str = "kdpipe"
    table_models: list[ModelName] = []  # trained from scratch with `table`: the ResNet table's figures
    models: list[ModelName] = []  # trained from scratch with `teacher`: the benchmark's teachers and baselines
    published: list[ModelName] = []  # teachers imported from published/<model>.pth (RepDistiller/mdistiller)
    seeds: list[int] = [0]
    methods: list[Literal[METHODS]] = list(METHODS)  # type: ignore[valid-type]
    pairs: list[Pair] = []
    # the pairs' teachers, each named once, where the grid's WKD takes its CKA cost (`distill.wkd.cost: cka`): its
    # stage wkd-cost computes each one's once (DVC's matrix cannot derive the list from `pairs`)
    wkd_teachers: list[ModelName] = []
    # named variants of methods, each a row `<method>+<tag>` of its own in the grid (`--method kd+ls`):
    # tag -> method -> keys of distill.<method> it sets, and `by_pair: {"teacher->student": {key: value}}`
    # where the variant's references tune a key per pair (logit-standardization-KD's "+LS" rows)
    variants: dict[str, dict[str, dict]] = {}
    # the grid's distillations per pair and seed: one stage per student (false), or one stage training every student
    # of the pair and seed together, one teacher forward per batch (`kdpipe distill -m kd -m dkd ...`); render the
    # folder's dvc.yaml again (`make pipelines`) after changing it
    group_students: bool = False

    @model_validator(mode="before")
    @classmethod
    def _apply_recipes(cls, raw):
        if not isinstance(raw, dict):
            return raw
        recipes = raw.get("recipes") or {}
        out = dict(raw)
        for role in TRAIN_SECTIONS:
            section = raw.get(role)
            if isinstance(section, dict) and section.get("recipe") is not None:
                name = section["recipe"]
                if not isinstance(recipes, dict) or name not in recipes:
                    defined = ", ".join(recipes) if isinstance(recipes, dict) and recipes else "none"
                    raise ValueError(f"{role}.recipe: unknown recipe {name!r} (defined in recipes: {defined})")
                if isinstance(recipes[name], dict):
                    out[role] = deep_merge(recipes[name], section)
        return out

    def student_for(self, methods: list[str]) -> Train:
        """The `student` section with the `train` overrides of `methods` merged in: the recipe a distillation
        with these methods runs (its `recipe` names the student's, + the methods whose own recipe it is)."""
        over: dict = {}
        for m in methods:
            for key, value in flat(getattr(self.distill, m).train).items():
                if key in over and over[key] != value:
                    raise ParamsError([f"distill.{m}.train.{'.'.join(key)}: {value!r}, but another method of the combination "
                                       f"sets {over[key]!r}"])
                over[key] = value
        if not over:
            return self.student
        own = [m for m in methods if getattr(self.distill, m).train]
        merged = deep_merge(self.student.model_dump(), nest(over))
        merged["recipe"] = f"{self.student.recipe or 'custom'}+{'+'.join(own)}"
        return Train.model_validate(merged)

    @model_validator(mode="after")
    def _check_variants(self):
        for tag, entries in self.variants.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]*", tag) or tag in METHODS:
                raise ValueError(f"variants.{tag}: a tag is a lower-case word that is not a method's name")
            for m, over in entries.items():
                if m not in METHODS:
                    raise ValueError(f"variants.{tag}.{m}: unknown method (valid: {', '.join(METHODS)})")
                self._method_params(tag, m)
        return self

    def _method_params(self, tag: str, method: str) -> BaseModel:
        """distill.<method> with variant `tag`'s keys set: keys replace the method's own, mappings included (a
        variant's `by_pair` replaces the method's: DKD+LS's `by_pair: {}` drops DKD's per-pair betas)."""
        base = getattr(self.distill, method)
        over = self.variants[tag][method]
        try:
            return type(base).model_validate({**base.model_dump(), **over})
        except ValidationError as e:
            raise ValueError("; ".join(f"variants.{tag}.{method}: {describe(err, type(base))}" for err in e.errors())) from None

    def varied(self, tag: Optional[str], methods: list[str]) -> "Params":
        """These params with variant `tag` applied to the sections of `methods` it names (its `by_pair`, where it
        sets one, replacing the method's); `tag` None: these params."""
        if tag is None:
            return self
        update = {m: self._method_params(tag, m) for m in methods if m in self.variants[tag]}
        return self.model_copy(update={"distill": self.distill.model_copy(update=update)})

    def rows(self) -> list[str]:
        """The grid's distillation rows: each of `methods`, then each variant `<method>+<tag>`."""
        return list(self.methods) + [f"{m}+{tag}" for tag, entries in self.variants.items() for m in entries]

    @model_validator(mode="after")
    def _check_wkd_teachers(self):
        teachers = list(dict.fromkeys(p.teacher for p in self.pairs))
        if (self.pairs and "wkd" in self.methods and self.distill.wkd.cost == "cka"
                and sorted(self.wkd_teachers) != sorted(teachers)):
            raise ValueError(f"wkd_teachers: {self.wkd_teachers}, but the pairs' teachers are {teachers} (distill.wkd.cost "
                             "cka: the stage wkd-cost computes each one's class cost once; name each once)")
        return self

    @field_validator("launch")
    @classmethod
    def _launch(cls, v: str) -> str:
        if v != "kdpipe" and not (v.startswith("torchrun ") and v.endswith(" -m kdpipe")):
            raise ValueError("must be kdpipe, or torchrun with its options followed by -m kdpipe")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v) or min(v) < 0:
            raise ValueError("must be a non-empty list of distinct seeds >= 0")
        return v
