"""SP: Tung & Mori 2019, similarity-preserving KD on the last stage's feature map."""

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..config.distill import FeatureParams
from ..losses import fp32
from .base import Term, register


# the loss, a pure function (tensors in, a scalar out)
@fp32
def sp(fs: Tensor, ft: Tensor) -> Tensor:
    """Tung & Mori 2019, similarity-preserving: the batch Gram matrices G = f f^T of the flattened maps,
    each row L2-normalised; sum of squared differences / B^2."""
    b = fs.shape[0]
    gs = F.normalize(fs.reshape(b, -1) @ fs.reshape(b, -1).t(), dim=1)
    gt = F.normalize(ft.reshape(b, -1) @ ft.reshape(b, -1).t(), dim=1)
    return (gt - gs).pow(2).sum() / (b * b)


class SPParams(FeatureParams):
    beta: float = Field(3000.0, ge=0)


@register("sp", SPParams)
class SimilarityPreserving(Term):
    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()

    def forward(self, b):
        return sp(b.s_feats[-1], b.t_feats[-1])
