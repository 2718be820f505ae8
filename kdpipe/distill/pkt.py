"""PKT: Passalis & Tefas 2018, probabilistic knowledge transfer on the pooled embedding."""

import torch
from pydantic import Field
from torch import Tensor

from ..config.distill import FeatureParams
from ..losses import fp32
from .base import Term, register


# the loss, a pure function (tensors in, a scalar out)
@fp32
def pkt(es: Tensor, et: Tensor, eps: float = 1e-7) -> Tensor:
    """Passalis & Tefas 2018, probabilistic knowledge transfer: cosine similarities mapped to [0, 1] and
    row-normalised into conditional probabilities; mean over all B^2 entries of p_t log(p_t / p_s)."""
    def probabilities(e):
        e = e / (e.norm(dim=1, keepdim=True) + eps)
        e = torch.nan_to_num(e, nan=0.0)
        sim = (e @ e.t() + 1.0) / 2.0
        return sim / sim.sum(dim=1, keepdim=True)

    ps, pt = probabilities(es), probabilities(et)
    return (pt * torch.log((pt + eps) / (ps + eps))).mean()


class PKTParams(FeatureParams):
    beta: float = Field(30000.0, ge=0)


@register("pkt", PKTParams)
class ProbabilisticTransfer(Term):
    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()

    def forward(self, b):
        return pkt(b.s_embedding, b.t_embedding)
