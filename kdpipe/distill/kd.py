"""KD: Hinton, Vinyals & Dean 2015, soft targets at temperature T (weight alpha)."""

from . import functional as Fd
from .base import Term, register


@register("kd")
class KD(Term):
    def __init__(self, cfg, s_shapes=None, t_shapes=None, data=None):
        super().__init__()
        self.temperature = cfg.temperature

    def forward(self, b):
        return Fd.kd(b.s_logits, b.t_logits, self.temperature)
