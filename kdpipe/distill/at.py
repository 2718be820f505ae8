"""AT: Zagoruyko & Komodakis 2017, attention transfer summed over the stage outputs f1, f2, f3."""

from torch import nn

from . import functional as Fd
from . import register

TAPS = (1, 2, 3)


@register("at")
class AttentionTransfer(nn.Module):
    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()
        self.p = cfg.p

    def forward(self, b):
        return sum(Fd.attention(b.s_feats[i], b.t_feats[i], self.p) for i in TAPS)
