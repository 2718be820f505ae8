"""AT: Zagoruyko & Komodakis 2017, attention transfer summed over the stage outputs (every tap but the stem's,
as RepDistiller's `feat[1:-1]`: f1, f2, f3 for the CIFAR ResNets)."""

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..config.distill import FeatureParams
from ..losses import fp32
from .base import Term, check_paired_stages, register
from .functional import match_spatial


# the loss and its helpers, pure functions (tensors in, tensors out)
@fp32
def attention_map(f: Tensor, p: float = 2) -> Tensor:
    """Zagoruyko & Komodakis 2017: mean over channels of f^p, flattened per sample, L2-normalised."""
    return F.normalize(f.pow(p).mean(1).flatten(1), dim=1)


@fp32
def attention(fs: Tensor, ft: Tensor, p: float = 2) -> Tensor:
    """Attention transfer between two feature maps: mean over batch and positions of (a_s - a_t)^2."""
    fs, ft = match_spatial(fs, ft)
    return (attention_map(fs, p) - attention_map(ft, p)).pow(2).mean()


class ATParams(FeatureParams):
    beta: float = Field(1000.0, ge=0)
    p: float = Field(2.0, gt=0)


@register("at", ATParams)
class AttentionTransfer(Term):
    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()
        check_paired_stages("at", s_shapes, t_shapes)
        self.p = cfg.p

    def forward(self, b):
        return sum(attention(fs, ft, self.p) for fs, ft in zip(b.s_feats[1:], b.t_feats[1:]))
