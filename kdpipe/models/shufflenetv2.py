"""ShuffleNet V2 at CIFAR scale, width 1 (RepDistiller's `models/ShuffleNetv2.py` `ShuffleV2`): a 1x1 stem of 24
channels, three stages (a stride-2 down-sampling unit, then 3/7/3 split-transform-concat-shuffle units) to
116/232/464 channels, a 1x1 conv to 1024, pooled, one linear classifier.
Stages: the stem's output and each stage's output (`preact`: RepDistiller's, see BasicBlock); embedding:
the pooled 1024-channel conv output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Features, register
from .shufflenetv1 import channel_shuffle


class BasicBlock(nn.Module):
    """Half the channels pass through; the other half goes 1x1 - depthwise 3x3 - 1x1; concat, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels // 2
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x, with_preact: bool = False):
        c = x.shape[1] // 2
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        pre = self.bn3(self.conv3(self.bn2(self.conv2(out))))
        out = channel_shuffle(torch.cat([x1, F.relu(pre)], 1), 2)
        # RepDistiller's preact tap: the branch before its ReLU next to the passed-through half, not shuffled
        return (out, torch.cat([x1, pre], 1)) if with_preact else out


class DownBlock(nn.Module):
    """Two stride-2 branches (depthwise-1x1 and 1x1-depthwise-1x1), each to half the output channels."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        mid = c_out // 2
        self.conv1 = nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv2 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    CLASSIFIER = "linear"

    def __init__(self, num_classes: int, widths=(116, 232, 464, 1024), blocks=(3, 7, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        c_in, layers = 24, []
        for c_out, n in zip(widths[:3], blocks):
            layers.append(nn.Sequential(DownBlock(c_in, c_out), *[BasicBlock(c_out) for _ in range(n)]))
            c_in = c_out
        self.layer1, self.layer2, self.layer3 = layers
        self.conv2 = nn.Conv2d(c_in, widths[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)

    def forward(self, x, features: bool = False):
        f0 = F.relu(self.bn1(self.conv1(x)))
        if not features:
            f3 = self.layer3(self.layer2(self.layer1(f0)))
            return self.linear(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.bn2(self.conv2(f3))), 1), 1))
        stages, preact, out = [f0], [f0], f0
        for layer in (self.layer1, self.layer2, self.layer3):
            out, pre = layer[-1](layer[:-1](out), with_preact=True)
            stages.append(out)
            preact.append(pre)
        final = F.relu(self.bn2(self.conv2(out)))
        embedding = torch.flatten(F.adaptive_avg_pool2d(final, 1), 1)
        return Features(self.linear(embedding), stages, embedding, preact, final=final)


register("shufflev2", lambda num_classes: ShuffleNetV2(num_classes))
