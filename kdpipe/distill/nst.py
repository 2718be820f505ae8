"""NST: Huang & Wang 2017, MMD with a polynomial kernel, summed over the stage outputs f1, f2, f3."""

from torch import nn

from . import functional as Fd
from . import register

TAPS = (1, 2, 3)


@register("nst")
class NeuralSelectivityTransfer(nn.Module):
    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()

    def forward(self, b):
        return sum(Fd.nst(b.s_feats[i], b.t_feats[i]) for i in TAPS)
