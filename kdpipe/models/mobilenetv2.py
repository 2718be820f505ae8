"""MobileNetV2 at CIFAR scale, width 0.5 (RepDistiller's `models/mobilenetv2.py` `mobile_half`, from
"Knowledge Distillation via Route Constrained Optimization"): a stride-2 3x3 stem, seven groups of inverted
residuals (expansion 6, except 1 in the first), a 1x1 conv to 1280 channels, pooled, one linear classifier.
Stages: the stem's output and the outputs of groups 2, 3, 5 and 7 (RepDistiller's f0..f4); embedding:
the pooled 1280-channel conv output. No `preact` taps (the groups end in a linear projection; RepDistiller
returns the same list for `preact=True`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Features, init_weights, register

SETTING = (  # expansion t, channels c, blocks n, first stride s
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
TAPPED_GROUPS = (1, 2, 4, 6)  # the group after which each stage tap is taken


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),  # expand
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),  # depthwise
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out),  # linear projection
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    CLASSIFIER = "classifier.0"

    def __init__(self, num_classes: int, width: float = 0.5):
        super().__init__()
        c_in = int(32 * width)
        self.conv1 = conv_bn_relu(3, c_in, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in SETTING:
            c_out, group = int(c * width), []
            for i in range(n):
                group.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
            self.blocks.append(nn.Sequential(*group))
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = conv_bn_relu(c_in, last, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        init_weights(self, linear_std=0.01, linear_bias_zero=True)

    def forward(self, x, features: bool = False):
        out = self.conv1(x)
        stages = [out]
        for i, group in enumerate(self.blocks):
            out = group(out)
            if i in TAPPED_GROUPS:
                stages.append(out)
        # the reference pools with AvgPool2d(2, ceil_mode=True) over the 2x2 map of a 32x32 input: global mean
        final = self.conv2(out)
        embedding = torch.flatten(F.adaptive_avg_pool2d(final, 1), 1)
        logits = self.classifier(embedding)
        return Features(logits, stages, embedding, final=final) if features else logits


register("mobilenetv2", lambda num_classes: MobileNetV2(num_classes))
