"""KD: Hinton, Vinyals & Dean 2015, soft targets at temperature T (weight alpha)."""

from torch import nn

from . import functional as Fd
from . import register


@register("kd")
class KD(nn.Module):
    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(self, s_logits, s_feats, t_logits, t_feats):
        return Fd.kd(s_logits, t_logits, self.temperature)
