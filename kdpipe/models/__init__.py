"""Models behind one registry, one file per family (like timm's `create_model`).

`create(name, num_classes, weights)` builds any model below, and any of torchvision's (`tv/<name>`,
kdpipe/models/tv.py) and timm's (`timm/<name>`, kdpipe/models/timm_models.py), with their pretrained weights. Every model's `forward(x)` returns logits and
`forward(x, features=True)` returns `Features`, which unpacks as `(logits, stages)` (so code that unpacks two values keeps working)
and also carries `.embedding`:

- `stages`: the stem's output and each stage's output, as RepDistiller's `is_feat=True, preact=False`
  returns them (its feature list without the last entry); spatial maps `(B, C, H, W)`.
- `embedding`: the pooled pre-classifier vector `(B, D)` the classifier reads (RepDistiller's last
  feature); CRD, RKD, PKT and CC use it.
- `preact`: the same taps before their last ReLU (RepDistiller's `preact=True`; AB uses them); the stem's
  tap is post-ReLU as there, and a family without a pre-activation tap repeats `stages`.
- `final`: the map whose global average is `embedding` (kdpipe's families and torchvision's ResNets; None
  elsewhere); `classifier(model)` is the linear layer that reads `embedding` (each family's `CLASSIFIER`).

The architectures and state-dict layouts are RepDistiller's (`models/*.py`; mdistiller's
`mdistiller/models/cifar/` are the same). Each family file names the reference's keys it renames
(`REFERENCE_KEYS`: renamed key segments), so `kdpipe import-teacher` maps a published checkpoint onto kdpipe's model.
"""

from __future__ import annotations

from torch import nn

from .base import FAMILY, REGISTRY, Features, classifier, init_weights, is_weights_file, reference_keys, register, run_stage  # noqa: F401

# fill the registry, in the order `MODEL_NAMES` lists them
from . import resnet, resnet50, wrn, vgg, mobilenetv2, shufflenetv1, shufflenetv2, mobilenetv1  # noqa: E402,F401,I001

MODEL_NAMES = tuple(REGISTRY)
LIBRARIES = {"tv/": "tv", "timm/": "timm_models"}  # name prefix -> the family file of a library's models


def _library(name: str):
    """The family module of a `tv/` or `timm/` name (imported on use: a CIFAR run never imports them), or None."""
    import importlib

    prefix = next((p for p in LIBRARIES if name.startswith(p)), None)
    return prefix and importlib.import_module(f"{__package__}.{LIBRARIES[prefix]}")


def check_name(name: str) -> str:
    """`name` if it names a model (kdpipe's, or an existing torchvision/timm one), else a one-line ValueError."""
    library = _library(name)
    if library is None and name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}, "
                         "tv/<torchvision model>, timm/<timm model>")
    if library is not None:
        library.check_name(name[len(library.PREFIX):])
    return name


def weights_classes(name: str, weights: str) -> int:
    """The class count of a `tv/`/`timm/` model's named weights (e.g. 1000 for IMAGENET1K_V1)."""
    library = _library(check_name(name))
    if library is None:
        raise ValueError(f"{name}: named weights are for tv/ and timm/ models")
    return library.weights_classes(name[len(library.PREFIX):], weights)


def create(name: str, num_classes: int, weights: str | None = None) -> nn.Module:
    """Build a model by name for `num_classes` classes: kdpipe's own (initialised as in the reference), or a
    library's `tv/<name>` / `timm/<name>` with optional `weights` (a weights name or a state-dict file)."""
    library = _library(check_name(name))
    if library is not None:
        return library.create(name[len(library.PREFIX):], num_classes, weights)
    if weights is not None:
        raise ValueError(f"{name}: weights are for tv/ and timm/ models (kdpipe's own start from their init; "
                         "a published CIFAR teacher is imported with `kdpipe import-teacher`)")
    return REGISTRY[name](num_classes)


def from_reference_key(name: str, key: str) -> str:
    """A reference state-dict key as kdpipe's model `name` spells it (renamed dotted segments)."""
    renames = reference_keys(name)
    return ".".join(renames.get(part, part) for part in key.split("."))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_params_m(model: nn.Module) -> float:
    """Parameters in millions, rounded to 2 decimals as in the published table."""
    return round(count_params(model) / 1e6, 2)
