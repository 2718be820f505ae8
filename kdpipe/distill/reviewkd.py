"""ReviewKD: Chen et al. 2021, "Distilling Knowledge via Knowledge Review", as mdistiller's ReviewKD runs it.

The student's taps after the stem (post-ReLU; pre-ReLU with `stu_preact`, mdistiller's ImageNet setting) and
its pooled embedding, from the deepest up, pass through attention-based fusion (ABF) modules: each maps its tap
to `mid` channels (1x1 conv + BN), fuses it with the deeper level's fused map (nearest-upsampled; a per-pixel
sigmoid attention of two channels weighs the two), upsamples to the teacher's size and maps to the teacher's
channels (3x3 conv + BN). Each level is compared with the teacher's pre-ReLU tap (its embedding for the
pooled level) by the hierarchical context loss, `hcl` below. The weight ramps up linearly over
`warmup_epochs` (mdistiller: epoch / 20, epochs counted from 1). mdistiller's per-pair IN/OUT_CHANNELS and
SHAPES are the two models' feature shapes, read here; mid = min(512, the student's embedding width).
The student's taps are paired with the teacher's from the deepest (the stem's is left out, as there)."""

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config.distill import FeatureParams, epoch_count
from ..losses import fp32
from .base import Term, register, warmup


# the loss, a pure function (tensors in, a scalar out)
@fp32
def hcl(fs_list: list[Tensor], ft_list: list[Tensor]) -> Tensor:
    """Chen et al. 2021 (ReviewKD), the hierarchical context loss as mdistiller's `hcl_loss`: per level, the MSE of
    the full maps (weight 1) plus the MSEs of both maps average-pooled to 4x4, 2x2 and 1x1 where that is smaller than
    the map's height (weights 1/2, 1/4, ... over the levels used), divided by the sum of the weights; summed."""
    total = 0.0
    for fs, ft in zip(fs_list, ft_list):
        h = fs.shape[2]
        loss, weight, weights = F.mse_loss(fs, ft), 1.0, 1.0
        for size in (4, 2, 1):
            if size < h:
                weight /= 2
                loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
                weights += weight
        total = total + loss / weights
    return total


class ABF(nn.Module):
    """mdistiller's attention-based fusion module (the authors' `ABF`)."""

    def __init__(self, in_channels: int, mid: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.conv2 = nn.Sequential(nn.Conv2d(mid, out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, residual, out_size):
        """(output compared with the teacher, fused map handed to the next shallower level)."""
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, x.shape[-2:], mode="nearest")
            z = self.att_conv(torch.cat([x, residual], 1))
            x = x * z[:, :1] + residual * z[:, 1:]
        if x.shape[-2:] != out_size:
            x = F.interpolate(x, out_size, mode="nearest")
        return self.conv2(x), x


class ReviewKDParams(FeatureParams):
    beta: float = Field(5.0, ge=0, description="weight of the HCL term (mdistiller's REVIEWKD_WEIGHT for "
                                               "resnet32x4 -> resnet8x4; the authors' script per pair)")
    warmup_epochs: int = epoch_count(20, ge=0, description="the weight ramps up linearly over these epochs")
    stu_preact: bool = Field(False, description="the student's taps before their last ReLU (mdistiller's "
                                                "ImageNet STU_PREACT); false: after it")


@register("reviewkd", ReviewKDParams)
class ReviewKD(Term):
    label = "ReviewKD"
    uses_preact = True  # the teacher's taps are always pre-ReLU

    def __init__(self, cfg, s_shapes, t_shapes, data=None):
        super().__init__()
        self.cfg = cfg
        self.levels = len(t_shapes.stages) - 1  # the teacher's taps after its stem
        if self.levels < 1:
            raise ValueError(f"reviewkd needs the teacher's stage taps after its stem; it has {len(t_shapes.stages)} tap(s)")
        if len(s_shapes.stages) - 1 < self.levels:
            raise ValueError(f"reviewkd pairs the teacher's {self.levels} taps after its stem with the student's "
                             f"deepest ones, but the student has {len(s_shapes.stages) - 1}")
        s_in = [s[0] for s in s_shapes.stages[len(s_shapes.stages) - self.levels:]] + [s_shapes.embedding]
        t_out = [t[0] for t in t_shapes.stages[1:]] + [t_shapes.embedding]
        self.out_sizes = [tuple(t[1:]) for t in t_shapes.stages[1:]] + [(1, 1)]
        mid = min(512, s_shapes.embedding)
        self.abfs = nn.ModuleList(ABF(c_in, mid, c_out, i < self.levels)  # shallow to deep; the pooled one: no fusion
                                  for i, (c_in, c_out) in enumerate(zip(s_in, t_out)))

    def forward(self, b):
        taps = b.s_preact if self.cfg.stu_preact else b.s_feats
        xs = list(taps[len(taps) - self.levels:]) + [b.s_embedding[:, :, None, None]]
        targets = list(b.t_preact[1:]) + [b.t_embedding[:, :, None, None]]
        outs, residual = [], None
        for i in reversed(range(len(xs))):  # the review: from the deepest level up
            out, residual = self.abfs[i](xs[i], residual, self.out_sizes[i])
            outs.insert(0, out)
        return warmup(b.epoch, self.cfg.warmup_epochs) * hcl(outs, targets)
