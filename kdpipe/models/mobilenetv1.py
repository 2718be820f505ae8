"""MobileNetV1 at ImageNet scale, the student of the ImageNet benchmark's ResNet-50 -> MobileNetV1 pair (DKD,
CRD, OFD, ReviewKD): mdistiller's `mdistiller/models/imagenet/mobilenetv1.py` (after OFD's), 4,231,976
parameters for 1,000 classes. A stride-2 3x3 stem of 32 channels, 13 depthwise-separable blocks (3x3 depthwise
+ BN + ReLU, 1x1 pointwise + BN + ReLU), global average pooling, one linear classifier; PyTorch's default
initialisation, as there. Its state-dict layout (`model.<i>`, `fc`) is the reference's, so mdistiller's
checkpoints load as they are.

Stages: the stem's output, then the outputs of blocks 3, 5, 11 and 13 (strides 4, 8, 16, 32: the four taps
mdistiller returns, post-ReLU); `preact`: the same four before their last ReLU (mdistiller's `preact_feats`,
what OFD and ReviewKD read); embedding: the pooled 1024-channel map. Differences from the reference, both
without effect at 224 px: the pool is global (the reference's AvgPool2d(7) needs a 224-px input) and the
class count is a parameter (the reference fixes 1,000). mdistiller's feature list has no stem entry; kdpipe's
has one, like every family here, so a method reading `stages[1:]` pairs the four strides with a ResNet's four
stages (mdistiller's AT zips MobileNetV1's last three taps with ResNet-50's first three: docs/pipelines.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Features, register

BLOCKS = ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
          (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 1024, 2),
          (1024, 1024, 1))  # (in, out, stride) of model[1] ... model[13]
TAPS = (3, 5, 11, 13)  # the block (index in `model`) after which each stage tap is taken


def conv_bn(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def conv_dw(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(inplace=True),
        nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class MobileNetV1(nn.Module):
    CLASSIFIER = "fc"

    def __init__(self, num_classes: int):
        super().__init__()
        self.model = nn.Sequential(conv_bn(3, 32, 2), *(conv_dw(*b) for b in BLOCKS), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x, features: bool = False):
        out = self.model[0](x)
        stages, preact, first = [out], [out], 1
        for tap in TAPS:
            pre = self.model[tap][:-1](self.model[first:tap](out))  # the tapped block without its last ReLU
            out, first = F.relu(pre), tap + 1
            stages.append(out)
            preact.append(pre)
        embedding = torch.flatten(self.model[14](out), 1)
        logits = self.fc(embedding)
        return Features(logits, stages, embedding, preact, final=out) if features else logits


register("mobilenetv1", lambda num_classes: MobileNetV1(num_classes))
