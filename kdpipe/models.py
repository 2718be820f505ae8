"""CIFAR ResNets of He et al. (2016), depth 6n+2, with option-B shortcuts and feature taps.

`create("resnet20", 10)` builds a model whose `forward(x)` returns logits and whose
`forward(x, features=True)` returns `(logits, [f0, f1, f2, f3])`: the stem output and the
outputs of the three stages, all after their ReLU. The distillation methods use these taps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEPTHS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
MODEL_NAMES = tuple(DEPTHS)
WIDTHS = (16, 32, 64)  # channels of the stem/stage 1, stage 2, stage 3


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:  # option B: projection only where the shape changes
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.depth, self.num_classes = depth, num_classes
        self.conv1 = nn.Conv2d(3, WIDTHS[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        stages, c_in = [], WIDTHS[0]
        for i, c_out in enumerate(WIDTHS):
            blocks = [BasicBlock(c_in if j == 0 else c_out, c_out, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stage1, self.stage2, self.stage3 = stages
        self.fc = nn.Linear(WIDTHS[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x, features: bool = False):
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1 = self.stage1(f0)
        f2 = self.stage2(f1)
        f3 = self.stage3(f2)
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(f3, 1), 1))
        return (logits, [f0, f1, f2, f3]) if features else logits


def create(name: str, num_classes: int) -> CifarResNet:
    """Build a CIFAR ResNet by name (`resnet8` … `resnet110`) for `num_classes` classes."""
    if name not in DEPTHS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")
    return CifarResNet(DEPTHS[name], num_classes)


def count_params_m(model: nn.Module) -> float:
    """Parameters in millions, rounded to 2 decimals as in the published table."""
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
