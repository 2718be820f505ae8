"""NST: Huang & Wang 2017, MMD with a polynomial kernel, summed over the stage outputs f1, f2, f3."""

from torch import nn

from . import functional as Fd
from . import register

TAPS = (1, 2, 3)


@register("nst")
class NeuralSelectivityTransfer(nn.Module):
    def __init__(self, cfg, s_shapes, t_shapes):
        super().__init__()

    def forward(self, s_logits, s_feats, t_logits, t_feats):
        return sum(Fd.nst(s_feats[i], t_feats[i]) for i in TAPS)
