"""KD: Hinton, Vinyals & Dean 2015, soft targets at temperature T (weight alpha); with `logit_std`, on
standardised logits (Sun et al. 2024)."""

from . import functional as Fd
from .base import Term, logits, register


@register("kd")
class KD(Term):
    def __init__(self, cfg, s_shapes=None, t_shapes=None, data=None):
        super().__init__()
        self.cfg, self.temperature = cfg, cfg.temperature

    def forward(self, b):
        s, t = logits(b, self.cfg)
        return Fd.kd(s, t, self.temperature)
