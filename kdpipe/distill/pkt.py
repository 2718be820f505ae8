"""PKT: Passalis & Tefas 2018, probabilistic knowledge transfer on the pooled embedding."""

from . import functional as Fd
from .base import Term, register


@register("pkt")
class ProbabilisticTransfer(Term):
    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()

    def forward(self, b):
        return Fd.pkt(b.s_embedding, b.t_embedding)
