"""OFD: Heo et al. 2019, "A Comprehensive Overhaul of Feature Distillation", as mdistiller's OFD runs it.

The student's pre-ReLU taps after the stem, each through a connector (1x1 conv + BN to the teacher's channels),
against the teacher's pre-ReLU taps by the margin-based partial L2 (`ofd` below); the margins come from the
teacher's BN before each of those ReLUs (its `bn_before_relu()`: ResNets, WRN, VGG, torchvision's ResNets). The
taps are paired from the deepest (mdistiller's `_align_list`). The teacher runs its BN on each batch's statistics
(its running statistics untouched), as OFD's authors and mdistiller do (their Table 8: better than eval mode)."""

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config.distill import FeatureParams
from ..losses import fp32
from .base import Term, register


# the loss and its helpers, pure functions (tensors in, tensors out)
def ofd_margin(gamma: Tensor, beta: Tensor) -> Tensor:
    """Heo et al. 2019 (OFD): per channel, E[x | x < 0] for x ~ N(beta, gamma^2), the teacher's BN before its ReLU;
    -3 |gamma| where P(x < 0) <= 0.001 (mdistiller's `init_ofd_modules`, computed in float64)."""
    s, m = gamma.double().abs(), beta.double()
    cdf = 0.5 * (1 + torch.erf(-m / s / math.sqrt(2)))
    margin = -s * torch.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / cdf + m
    return torch.where(cdf > 0.001, margin, -3 * s).float()


@fp32
def ofd(s_feats: list[Tensor], t_feats: list[Tensor], margins: list[Tensor]) -> Tensor:
    """Heo et al. 2019 (OFD), mdistiller's `feat_loss` summed over levels: the connected student pre-ReLU map s and
    the teacher's t (average-pooled to s's size), squared error where t > 0, or where s > t > margin and t <= 0,
    and (s - margin)^2 where s > margin >= t; summed over C, H, W, mean over the batch; level i of n weighted
    1 / 2^(n - 1 - i) (the last 1)."""
    n, total = len(s_feats), 0.0
    for i, (s, t, m) in enumerate(zip(s_feats, t_feats, margins)):
        t = F.adaptive_avg_pool2d(t, s.shape[-2:])
        m = m.view(1, -1, 1, 1)
        loss = ((s - m) ** 2 * ((s > m) & (t <= m)) + (s - t) ** 2 * ((s > t) & (t > m) & (t <= 0))
                + (s - t) ** 2 * (t > 0))
        total = total + loss.abs().mean(0).sum() / 2 ** (n - 1 - i)
    return total


def connector(c_s: int, c_t: int) -> nn.Sequential:
    """mdistiller's ConnectorConvBN (kernel 1): conv ~ N(0, sqrt(2 / c_t)) without bias, BN(1, 0)."""
    conv = nn.Conv2d(c_s, c_t, 1, bias=False)
    nn.init.normal_(conv.weight, 0, math.sqrt(2.0 / c_t))
    return nn.Sequential(conv, nn.BatchNorm2d(c_t))


class OFDParams(FeatureParams):
    beta: float = Field(0.001, ge=0, description="weight of the OFD term (mdistiller's FEAT_WEIGHT; OFD's loss / 1000 "
                                                 "on CIFAR, / 10000 on ImageNet)")


@register("ofd", OFDParams)
class OFD(Term):
    label = "OFD"
    uses_preact = True
    teacher_batch_stats = True
    runs_alone = ("runs the teacher's BN on batch statistics (as OFD does), which would change what the other terms "
                  "read from the teacher")

    def __init__(self, cfg, s_shapes, t_shapes, data=None):
        super().__init__()
        self.levels = min(len(s_shapes.stages), len(t_shapes.stages)) - 1
        if self.levels < 1:
            raise ValueError("ofd needs stage taps after the stem in both models; one has a single tap or none")
        pairs = list(zip(s_shapes.stages[len(s_shapes.stages) - self.levels:], t_shapes.stages[len(t_shapes.stages) - self.levels:]))
        self.connectors = nn.ModuleList(connector(s[0], t[0]) for s, t in pairs)

    def from_teacher(self, teacher: nn.Module, teacher_file=None) -> None:
        try:
            bns = teacher.bn_before_relu()
            bns = bns[len(bns) - self.levels:]
        except AttributeError:
            raise ValueError(f"ofd takes its margins from the teacher's BN before each ReLU; {type(teacher).__name__} "
                             "has none known (ResNets, WRN, VGG have)") from None
        for i, bn in enumerate(bns):
            self.register_buffer(f"margin{i}", ofd_margin(bn.weight.detach(), bn.bias.detach()), persistent=False)

    def forward(self, b):
        s = [c(f) for c, f in zip(self.connectors, b.s_preact[len(b.s_preact) - self.levels:])]
        margins = [getattr(self, f"margin{i}") for i in range(self.levels)]
        return ofd(s, b.t_preact[len(b.t_preact) - self.levels:], margins)
