"""NST: Huang & Wang 2017, MMD with a polynomial kernel, summed over the stage outputs (every tap but the
stem's, as RepDistiller's `feat[1:-1]`)."""

from . import functional as Fd
from .base import Term, check_paired_stages, register


@register("nst")
class NeuralSelectivityTransfer(Term):
    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()
        check_paired_stages("nst", s_shapes, t_shapes)

    def forward(self, b):
        return sum(Fd.nst(fs, ft) for fs, ft in zip(b.s_feats[1:], b.t_feats[1:]))
