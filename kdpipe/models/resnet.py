"""CIFAR ResNets of He et al. (2016), depth 6n+2, with option-B shortcuts (RepDistiller's `models/resnet.py`).

`resnet8` … `resnet110` have widths 16/16/32/64 (stem, stage 1, 2, 3); `resnet8x4` and `resnet32x4`
are four times as wide (32/64/128/256). Stages: the stem's output and the three stages' outputs, all
after their ReLU (`preact`: the stages' last blocks before it); embedding: the globally pooled last stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Features, init_weights, register, run_stage

DEPTHS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
WIDTHS = (16, 16, 32, 64)  # stem, stage 1, stage 2, stage 3
WIDE = {"resnet8x4": 8, "resnet32x4": 32}
WIDTHS_X4 = (32, 64, 128, 256)
# RepDistiller's names -> kdpipe's (kdpipe keeps its own names, which its checkpoints use)
REFERENCE_KEYS = {"layer1": "stage1", "layer2": "stage2", "layer3": "stage3", "downsample": "shortcut"}


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

    def preact(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out)) + self.shortcut(x)

    def forward(self, x):
        return F.relu(self.preact(x))


class CifarResNet(nn.Module):
    CLASSIFIER = "fc"  # the linear layer on the embedding (models.classifier)

    def __init__(self, depth: int, num_classes: int, widths: tuple[int, int, int, int] = WIDTHS):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.depth, self.num_classes = depth, num_classes
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, c_in = [], widths[0]
        for i, c_out in enumerate(widths[1:]):
            blocks = [BasicBlock(c_in if j == 0 else c_out, c_out, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stage1, self.stage2, self.stage3 = stages
        self.fc = nn.Linear(widths[-1], num_classes)
        init_weights(self)

    def forward(self, x, features: bool = False):
        f0 = F.relu(self.bn1(self.conv1(x)))
        if not features:
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.stage3(self.stage2(self.stage1(f0))), 1), 1))
        f1, p1 = run_stage(self.stage1, f0)
        f2, p2 = run_stage(self.stage2, f1)
        f3, p3 = run_stage(self.stage3, f2)
        embedding = torch.flatten(F.adaptive_avg_pool2d(f3, 1), 1)
        return Features(self.fc(embedding), [f0, f1, f2, f3], embedding, [f0, p1, p2, p3], final=f3)

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The BN whose output (plus the shortcut) is each preact tap after the stem (OFD's margins)."""
        return [stage[-1].bn2 for stage in (self.stage1, self.stage2, self.stage3)]


for _name, _depth in DEPTHS.items():
    register(_name, lambda num_classes, d=_depth: CifarResNet(d, num_classes))
for _name, _depth in WIDE.items():
    register(_name, lambda num_classes, d=_depth: CifarResNet(d, num_classes, WIDTHS_X4))
