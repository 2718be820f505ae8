"""Wide ResNets of Zagoruyko & Komodakis (2016), `wrn_<depth>_<widen>` with depth 6n+4 (RepDistiller's
`models/wrn.py`): pre-activation blocks (BN-ReLU-conv), widths 16 / 16k / 32k / 64k, a 1x1 projection where
the channels change, a final BN-ReLU before the pooled classifier, no dropout.
Stages (as RepDistiller's): the stem conv's output and each group's output, before any BN-ReLU (the
network is pre-activation); embedding: the pooled final BN-ReLU output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Features, init_weights, register


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.equal_in_out = c_in == c_out
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x, bn_x=None):  # bn_x: bn1(x) when the caller has it already (the preact taps)
        a = F.relu(self.bn1(x) if bn_x is None else bn_x)
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        # where the channels change, the shortcut also sees the pre-activated input (as the reference)
        return out + (x if self.equal_in_out else self.convShortcut(a))


class NetworkBlock(nn.Module):
    """One group of blocks (kept as a wrapper for the reference's `blockN.layer.M` key layout)."""

    def __init__(self, n: int, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[BasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    CLASSIFIER = "fc"

    def __init__(self, depth: int, widen: int, num_classes: int):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self, linear_bias_zero=True)

    def forward(self, x, features: bool = False):
        f0 = self.conv1(x)
        if not features:
            f3 = self.block3(self.block2(self.block1(f0)))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.bn1(f3)), 1), 1))
        # preact taps as RepDistiller's: each group's output through the BN that opens the next group (its
        # first block's bn1, the final bn1), computed once and used by that block (RepDistiller runs those
        # BNs a second time, which in training mode updates their running statistics twice per step)
        f1 = self.block1(f0)
        p1 = self.block2.layer[0].bn1(f1)
        f2 = self.block2.layer[1:](self.block2.layer[0](f1, p1))
        p2 = self.block3.layer[0].bn1(f2)
        f3 = self.block3.layer[1:](self.block3.layer[0](f2, p2))
        p3 = self.bn1(f3)
        final = F.relu(p3)
        embedding = torch.flatten(F.adaptive_avg_pool2d(final, 1), 1)
        return Features(self.fc(embedding), [f0, f1, f2, f3], embedding, [f0, p1, p2, p3], final=final)

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The BN that makes each preact tap after the stem (OFD's margins)."""
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    register(f"wrn_{_depth}_{_widen}", lambda num_classes, d=_depth, w=_widen: WideResNet(d, w, num_classes))
