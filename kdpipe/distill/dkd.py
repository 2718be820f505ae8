"""DKD: Zhao et al. 2022, decoupled KD (mdistiller): tckd * TCKD + beta * NCKD, times T^2, scaled by a
linear warm-up min(epoch / warmup_epochs, 1) with epochs counted from 1, as mdistiller does; with
`logit_std`, on standardised logits (Sun et al. 2024)."""

from . import functional as Fd
from .base import Term, logits, register, warmup


@register("dkd")
class DecoupledKD(Term):
    weight = 1.0  # alpha (tckd) and beta weigh the two parts inside the loss

    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()
        self.cfg = cfg

    def forward(self, b):
        c = self.cfg
        s, t = logits(b, c)
        return warmup(b.epoch, c.warmup_epochs) * Fd.dkd(s, t, b.y, c.tckd, c.beta, c.temperature)
