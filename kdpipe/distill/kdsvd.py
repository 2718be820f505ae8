"""KD-SVD: Lee et al. 2018, "Self-supervised Knowledge Distillation Using Singular Value Decomposition", as
mdistiller's KDSVD runs it: the stage outputs after the stem (f1, f2, f3 on the CIFAR ResNets), compressed by
SVD to their leading right singular vectors, whose RBF relations between consecutive stages the student
matches. No trainable parts. Needs the paired taps to have equal widths (mdistiller's (C*H, W) matrices)."""

from . import functional as Fd
from .base import Term, register


@register("kdsvd")
class KDSVD(Term):
    label = "KD-SVD"

    def __init__(self, cfg, s_shapes, t_shapes, data=None):
        super().__init__()
        self.k = cfg.k
        widths = [(s[2], t[2]) for s, t in zip(s_shapes.stages[1:], t_shapes.stages[1:])]
        if len(widths) < 2:
            raise ValueError("kdsvd relates consecutive stage taps after the stem: both models need two or more")
        if any(ws != wt for ws, wt in widths):
            raise ValueError(f"kdsvd needs equal widths of the paired feature maps; student vs teacher: {widths}")

    def forward(self, b):
        return Fd.kdsvd(b.s_feats[1:], b.t_feats[1:], self.k)
