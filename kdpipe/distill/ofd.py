"""OFD: Heo et al. 2019, "A Comprehensive Overhaul of Feature Distillation", as mdistiller's OFD runs it.

The student's pre-ReLU taps after the stem, each through a connector (1x1 conv + BN to the teacher's channels),
against the teacher's pre-ReLU taps by the margin-based partial L2 (`functional.ofd`); the margins come from the
teacher's BN before each of those ReLUs (its `bn_before_relu()`: ResNets, WRN, VGG, torchvision's ResNets). The
taps are paired from the deepest (mdistiller's `_align_list`). The teacher runs its BN on each batch's statistics
(its running statistics untouched), as OFD's authors and mdistiller do (their Table 8: better than eval mode)."""

import math

from torch import nn

from . import functional as Fd
from .base import Term, register


def connector(c_s: int, c_t: int) -> nn.Sequential:
    """mdistiller's ConnectorConvBN (kernel 1): conv ~ N(0, sqrt(2 / c_t)) without bias, BN(1, 0)."""
    conv = nn.Conv2d(c_s, c_t, 1, bias=False)
    nn.init.normal_(conv.weight, 0, math.sqrt(2.0 / c_t))
    return nn.Sequential(conv, nn.BatchNorm2d(c_t))


@register("ofd")
class OFD(Term):
    label = "OFD"
    uses_preact = True
    teacher_batch_stats = True

    def __init__(self, cfg, s_shapes, t_shapes, data=None):
        super().__init__()
        self.levels = min(len(s_shapes.stages), len(t_shapes.stages)) - 1
        if self.levels < 1:
            raise ValueError("ofd needs stage taps after the stem in both models; one has a single tap or none")
        pairs = list(zip(s_shapes.stages[len(s_shapes.stages) - self.levels:], t_shapes.stages[len(t_shapes.stages) - self.levels:]))
        self.connectors = nn.ModuleList(connector(s[0], t[0]) for s, t in pairs)

    def from_teacher(self, teacher: nn.Module) -> None:
        try:
            bns = teacher.bn_before_relu()
            bns = bns[len(bns) - self.levels:]
        except AttributeError:
            raise ValueError(f"ofd takes its margins from the teacher's BN before each ReLU; {type(teacher).__name__} "
                             "has none known (ResNets, WRN, VGG have)") from None
        for i, bn in enumerate(bns):
            self.register_buffer(f"margin{i}", Fd.ofd_margin(bn.weight.detach(), bn.bias.detach()), persistent=False)

    def forward(self, b):
        s = [c(f) for c, f in zip(self.connectors, b.s_preact[len(b.s_preact) - self.levels:])]
        margins = [getattr(self, f"margin{i}") for i in range(self.levels)]
        return Fd.ofd(s, b.t_preact[len(b.t_preact) - self.levels:], margins)
