"""RKD: Park et al. 2019, relational KD (distance and angle) on the pooled embedding."""

from . import functional as Fd
from .base import Term, register


@register("rkd")
class RelationalKD(Term):
    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()
        self.w_dist, self.w_angle = cfg.w_dist, cfg.w_angle

    def forward(self, b):
        return Fd.rkd(b.s_embedding, b.t_embedding, self.w_dist, self.w_angle)
