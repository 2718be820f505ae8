"""VGG with batch norm at CIFAR scale (RepDistiller's `models/vgg.py`, the `vggN_bn` variants it names `vggN`):
five conv blocks (3x3 conv, BN, ReLU; the block's last ReLU applied outside it), max-pools between blocks
(none before the last block on 32x32 inputs), global average pooling and one linear classifier (no FC stack).
Stages: the five blocks' outputs after ReLU (`preact`: before it, except the first); embedding: the pooled
last block (512).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Features, init_weights, register

CONFIGS = {  # channels of each conv in each of the five blocks
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def conv_block(channels: tuple[int, ...], c_in: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        c_in = c
    return nn.Sequential(*layers[:-1])  # the last ReLU is the forward's, so the stage before it is reachable


class VGG(nn.Module):
    CLASSIFIER = "classifier"

    def __init__(self, config: tuple[tuple[int, ...], ...], num_classes: int):
        super().__init__()
        c_ins = (3,) + tuple(block[-1] for block in config[:-1])
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            conv_block(block, c_in) for block, c_in in zip(config, c_ins))
        self.classifier = nn.Linear(config[-1][-1], num_classes)
        init_weights(self, linear_std=0.01, linear_bias_zero=True)

    def forward(self, x, features: bool = False):
        h = x.shape[2]
        f0 = F.relu(self.block0(x))
        p1 = self.block1(F.max_pool2d(f0, 2))
        f1 = F.relu(p1)
        p2 = self.block2(F.max_pool2d(f1, 2))
        f2 = F.relu(p2)
        p3 = self.block3(F.max_pool2d(f2, 2))
        f3 = F.relu(p3)
        p4 = self.block4(F.max_pool2d(f3, 2) if h == 64 else f3)  # the reference pools here only for 64x64
        f4 = F.relu(p4)
        embedding = torch.flatten(F.adaptive_avg_pool2d(f4, 1), 1)
        logits = self.classifier(embedding)
        return Features(logits, [f0, f1, f2, f3, f4], embedding, [f0, p1, p2, p3, p4], final=f4) if features else logits

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The BN that ends each block, i.e. makes each preact tap after the stem (OFD's margins)."""
        return [block[-1] for block in (self.block1, self.block2, self.block3, self.block4)]


for _name, _config in CONFIGS.items():
    register(_name, lambda num_classes, c=_config: VGG(c, num_classes))
