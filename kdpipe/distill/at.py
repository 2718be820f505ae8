"""AT: Zagoruyko & Komodakis 2017, attention transfer summed over the stage outputs (every tap but the stem's,
as RepDistiller's `feat[1:-1]`: f1, f2, f3 for the CIFAR ResNets)."""

from . import functional as Fd
from .base import Term, check_paired_stages, register


@register("at")
class AttentionTransfer(Term):
    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()
        check_paired_stages("at", s_shapes, t_shapes)
        self.p = cfg.p

    def forward(self, b):
        return sum(Fd.attention(fs, ft, self.p) for fs, ft in zip(b.s_feats[1:], b.t_feats[1:]))
