"""ResNet-50 at CIFAR scale (RepDistiller's `models/resnetv2.py` `ResNet50`, after Kuang Liu's pytorch-cifar):
a 3x3 stride-1 stem of 64 channels, no max-pool, bottleneck stages of 3/4/6/3 blocks at 64/128/256/512
(x4 expansion) with projection shortcuts where the shape changes. Stages: the stem's output and the four
stages' outputs, after ReLU; embedding: the globally pooled last stage (2048).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Features, init_weights, register, run_stage


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def preact(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out)) + self.shortcut(x)

    def forward(self, x):
        return F.relu(self.preact(x))


class BottleneckResNet(nn.Module):
    CLASSIFIER = "linear"

    def __init__(self, blocks: tuple[int, ...], num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        c_in, layers = 64, []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            stage = []
            for j in range(n):
                stage.append(Bottleneck(c_in, planes, 2 if (i > 0 and j == 0) else 1))
                c_in = planes * Bottleneck.expansion
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(c_in, num_classes)
        init_weights(self)

    def forward(self, x, features: bool = False):
        f0 = F.relu(self.bn1(self.conv1(x)))
        if not features:
            f4 = self.layer4(self.layer3(self.layer2(self.layer1(f0))))
            return self.linear(torch.flatten(F.adaptive_avg_pool2d(f4, 1), 1))
        stages, preact, out = [f0], [f0], f0
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            out, pre = run_stage(layer, out)
            stages.append(out)
            preact.append(pre)
        embedding = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return Features(self.linear(embedding), stages, embedding, preact, final=out)

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The BN whose output (plus the shortcut) is each preact tap after the stem (OFD's margins)."""
        return [layer[-1].bn3 for layer in (self.layer1, self.layer2, self.layer3, self.layer4)]


register("resnet50", lambda num_classes: BottleneckResNet((3, 4, 6, 3), num_classes))
