"""The model registry's base: `Features` (what `model(x, features=True)` returns), `register`, and the
building blocks the family files share. The families register themselves on import (`kdpipe/models/__init__.py`)."""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Callable

import torch
from torch import nn


class Features(tuple):
    """What `model(x, features=True)` returns: a pair `(logits, stages)` with the embedding attached.
    A tuple subclass (not a 3-field NamedTuple) so that `logits, feats = model(x, features=True)` keeps working.
    `final`: the map `(B, C, H, W)` whose global average is `embedding` (the last stage, or the layers after it
    such as WRN's BN-ReLU or MobileNetV2's 1x1 conv), where the model gives it; None otherwise (SDD reads it)."""

    def __new__(cls, logits: torch.Tensor, stages: list[torch.Tensor], embedding: torch.Tensor,
                preact: list[torch.Tensor] | None = None, final: torch.Tensor | None = None):
        self = super().__new__(cls, (logits, stages))
        self.embedding = embedding
        self.preact = stages if preact is None else preact
        self.final = final
        return self

    @property
    def logits(self) -> torch.Tensor:
        return self[0]

    @property
    def stages(self) -> list[torch.Tensor]:
        return self[1]


def classifier(model: nn.Module) -> nn.Module | None:
    """The linear layer that maps `model`'s `embedding` to its logits, where the model names it (`CLASSIFIER`, the
    layer's dotted name: kdpipe's families, torchvision's ResNets), through the DDP and torch.compile wrappers the
    training loop may call; None for a model that does not name one."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    name = getattr(model, "CLASSIFIER", None)
    return model.get_submodule(name) if name else None


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


WEIGHTS_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin")


def is_weights_file(weights: str) -> bool:
    """A `weights` value that is a file (a state-dict suffix or a folder part), not a library's weights name."""
    return weights.endswith(WEIGHTS_SUFFIXES) or "/" in weights or os.sep in weights


REGISTRY: dict[str, Callable[[int], nn.Module]] = {}
FAMILY: dict[str, ModuleType] = {}  # model name -> the family file (module) that registered it


def register(name: str, build: Callable[[int], nn.Module]) -> None:
    """Make model `name` buildable as `build(num_classes)`; its family is the module `build` is defined in."""
    REGISTRY[name] = build
    FAMILY[name] = sys.modules[build.__module__]


def reference_keys(name: str) -> dict[str, str]:
    """The key segments model `name`'s family renames from the reference's state dicts (`REFERENCE_KEYS`)."""
    return getattr(FAMILY[name], "REFERENCE_KEYS", {})
