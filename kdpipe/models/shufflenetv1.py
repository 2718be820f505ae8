"""ShuffleNet V1 at CIFAR scale, groups 3 (RepDistiller's `models/ShuffleNetv1.py` `ShuffleV1`): a 1x1 stem of 24
channels, three stages of 4/8/4 bottlenecks (grouped 1x1, channel shuffle, depthwise 3x3, grouped 1x1) to
240/480/960 channels, each stage opened by a stride-2 unit that concatenates an average-pooled shortcut.
Stages: the stem's output and each stage's output, after ReLU; embedding: the pooled last stage (960).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Features, register, run_stage


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = c_out // 4
        self.g1 = 1 if c_in == 24 else groups  # the first unit's input (the stem) is too thin to group
        self.conv1 = nn.Conv2d(c_in, mid, 1, groups=self.g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)

    def preact(self, x):
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.g1)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1) if self.stride == 2 else out + x

    def forward(self, x):
        return F.relu(self.preact(x))


class ShuffleNetV1(nn.Module):
    CLASSIFIER = "linear"

    def __init__(self, num_classes: int, widths=(240, 480, 960), blocks=(4, 8, 4), groups: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        c_in, layers = 24, []
        for c_out, n in zip(widths, blocks):
            # the stride-2 unit's branch makes c_out - c_in channels; the pooled shortcut adds c_in
            layers.append(nn.Sequential(*[Bottleneck(c_in if i == 0 else c_out, c_out - c_in if i == 0 else c_out,
                                                     2 if i == 0 else 1, groups) for i in range(n)]))
            c_in = c_out
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x, features: bool = False):
        f0 = F.relu(self.bn1(self.conv1(x)))
        if not features:
            return self.linear(torch.flatten(F.adaptive_avg_pool2d(self.layer3(self.layer2(self.layer1(f0))), 1), 1))
        f1, p1 = run_stage(self.layer1, f0)
        f2, p2 = run_stage(self.layer2, f1)
        f3, p3 = run_stage(self.layer3, f2)
        embedding = torch.flatten(F.adaptive_avg_pool2d(f3, 1), 1)
        return Features(self.linear(embedding), [f0, f1, f2, f3], embedding, [f0, p1, p2, p3], final=f3)


register("shufflev1", lambda num_classes: ShuffleNetV1(num_classes))
