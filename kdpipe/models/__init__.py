"""Models behind one registry, one file per family (like timm's `create_model`).

`create(name, num_classes)` builds any model below. Every model's `forward(x)` returns logits and
`forward(x, features=True)` returns `Features`, which unpacks as `(logits, stages)` (the seed's contract)
and also carries `.embedding`:

- `stages`: the stem's output and each stage's output, as RepDistiller's `is_feat=True, preact=False`
  returns them (its feature list without the last entry); spatial maps `(B, C, H, W)`.
- `embedding`: the pooled pre-classifier vector `(B, D)` the classifier reads (RepDistiller's last
  feature); CRD, RKD, PKT and CC use it.
- `preact`: the same taps before their last ReLU (RepDistiller's `preact=True`; AB uses them); the stem's
  tap is post-ReLU as there, and a family without a pre-activation tap repeats `stages`.

The architectures and state-dict layouts are RepDistiller's (`models/*.py`; mdistiller's
`mdistiller/models/cifar/` are the same). Each family file names the reference's keys it renames
(`REFERENCE_KEYS`: renamed key segments), so `kdpipe import-teacher` maps a published checkpoint onto kdpipe's model.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class Features(tuple):
    """What `model(x, features=True)` returns: a pair `(logits, stages)` with the embedding attached.
    A tuple subclass (not a 3-field NamedTuple) so that `logits, feats = model(x, features=True)` keeps working."""

    def __new__(cls, logits: torch.Tensor, stages: list[torch.Tensor], embedding: torch.Tensor,
                preact: list[torch.Tensor] | None = None):
        self = super().__new__(cls, (logits, stages))
        self.embedding = embedding
        self.preact = stages if preact is None else preact
        return self

    @property
    def logits(self) -> torch.Tensor:
        return self[0]

    @property
    def stages(self) -> list[torch.Tensor]:
        return self[1]


def run_stage(stage: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A stage of blocks that end in a ReLU, returning its output and its last block's input to that ReLU
    (each such block has `preact(x)`; `forward(x) = relu(preact(x))`): the pre-activation tap at no cost."""
    for block in stage[:-1]:
        x = block(x)
    pre = stage[-1].preact(x)
    return torch.relu(pre), pre


def init_weights(model: nn.Module, linear_std: float | None = None, linear_bias_zero: bool = False) -> None:
    """RepDistiller's initialisations: convolutions He-normal over fan-out (its `normal_(0, sqrt(2 / n))`,
    n = k * k * out_channels), their biases 0; BN weight 1, bias 0; linear layers: weights N(0, linear_std)
    where given (VGG, MobileNetV2), biases 0 where asked (those and WRN), else PyTorch's default (ResNets)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0, linear_std)
            if linear_bias_zero:
                nn.init.zeros_(m.bias)


REGISTRY: dict[str, Callable[[int], nn.Module]] = {}
FAMILY: dict[str, str] = {}  # model name -> family module name


def register(name: str, family: str, build: Callable[[int], nn.Module]) -> None:
    REGISTRY[name] = build
    FAMILY[name] = family


# fill the registry, in the order `MODEL_NAMES` lists them
from . import resnet, resnet50, wrn, vgg, mobilenetv2, shufflenetv1, shufflenetv2  # noqa: E402,F401,I001

MODEL_NAMES = tuple(REGISTRY)
FAMILIES = {"resnet": resnet, "resnet50": resnet50, "wrn": wrn, "vgg": vgg, "mobilenetv2": mobilenetv2,
            "shufflenetv1": shufflenetv1, "shufflenetv2": shufflenetv2}


def create(name: str, num_classes: int) -> nn.Module:
    """Build a model by name for `num_classes` classes (weights initialised as in the reference)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")
    return REGISTRY[name](num_classes)


def from_reference_key(name: str, key: str) -> str:
    """A reference state-dict key as kdpipe's model `name` spells it (renamed dotted segments)."""
    renames = getattr(FAMILIES[FAMILY[name]], "REFERENCE_KEYS", {})
    return ".".join(renames.get(part, part) for part in key.split("."))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_params_m(model: nn.Module) -> float:
    """Parameters in millions, rounded to 2 decimals as in the published table."""
    return round(count_params(model) / 1e6, 2)
