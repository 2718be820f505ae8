"""The published figures kdpipe compares with (kdpipe/published.yaml), each table with its source and metric
convention, read into lookups by model and by (teacher, student) pair."""

from __future__ import annotations

from pathlib import Path

import yaml

PUBLISHED_FILE = Path(__file__).with_name("published.yaml")
_REFERENCE = yaml.safe_load(PUBLISHED_FILE.read_text())


def _pairs(table: dict) -> dict[tuple[str, str], object]:
    return {tuple(k.split("->")): v for k, v in table.items()}


PUBLISHED = {m: tuple(row) for m, row in _REFERENCE["he2016"]["models"].items()}
RESNET_TABLE_METRIC = _REFERENCE["he2016"]["metric"]  # the Top-1 the ResNet table reports: the best epoch's


def published(model: str, dataset: str):
    """(top1, top5) published for `model` on `dataset`, or None."""
    row = PUBLISHED.get(model)
    if row is None or dataset not in ("cifar10", "cifar100"):
        return None
    return row[2:4] if dataset == "cifar10" else row[4:6]


# CRD's CIFAR-100 figures are the last epoch's accuracy, so our side of the comparison is `top1_last` too.
DISTILL_METRIC = _REFERENCE["crd"]["metric"]
CRD = {pair: {k: v for k, v in zip(_REFERENCE["crd"]["rows"], col) if v is not None}
       for pair, col in _pairs(_REFERENCE["crd"]["pairs"]).items()}


def _per_model(table: dict) -> dict:
    """A table's teacher and student rows, per model (one figure each: equal across the pairs they appear in)."""
    return {m: table[pair][role] for pair in table for m, role in zip(pair, ("teacher", "student"))}


CRD_MODELS = _per_model(CRD)
# the tables of methods published after CRD (DKD, DIST): method -> its table (source, convention, metric, note)
METHOD_TABLES = {t["method"]: t for t in _REFERENCE.values() if "method" in t}
METHOD_FIGURES = {m: _pairs(t["pairs"]) for m, t in METHOD_TABLES.items()}  # method -> {(teacher, student): Top-1}
IMAGENET = _pairs(_REFERENCE["imagenet"]["pairs"])  # (teacher, student) -> {row: [Top-1, Top-5 or None]}
IMAGENET_CONVENTION = _REFERENCE["imagenet"]["convention"]
IMAGENET_MODELS = _per_model(IMAGENET)
