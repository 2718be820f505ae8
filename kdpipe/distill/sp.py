"""SP: Tung & Mori 2019, similarity-preserving KD on the last stage's feature map."""

from . import functional as Fd
from .base import Term, register


@register("sp")
class SimilarityPreserving(Term):
    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()

    def forward(self, b):
        return Fd.sp(b.s_feats[-1], b.t_feats[-1])
