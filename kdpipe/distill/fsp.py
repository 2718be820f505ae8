"""FSP: Yim et al. 2017, flow-of-solution-procedure matrices of consecutive taps (f0,f1), (f1,f2), (f2,f3)."""

import torch
from pydantic import Field
from torch import Tensor

from ..config.distill import FeatureParams, epoch_count
from ..losses import fp32
from .base import Term, check_paired_stages, register
from .functional import match_spatial


# the loss and its helpers, pure functions (tensors in, tensors out)
@fp32
def fsp_matrix(bottom: Tensor, top: Tensor) -> Tensor:
    """Yim et al. 2017: G[b, i, j] = mean over positions of top[b, i] * bottom[b, j], (B, C_top, C_bottom)."""
    bottom, top = match_spatial(bottom, top)
    return torch.bmm(top.flatten(2), bottom.flatten(2).transpose(1, 2)) / (top.shape[2] * top.shape[3])


@fp32
def fsp(s_feats: list[Tensor], t_feats: list[Tensor]) -> Tensor:
    """Sum over the consecutive tap pairs (f0,f1), (f1,f2), (f2,f3) of mean (G_s - G_t)^2."""
    return sum((fsp_matrix(s_feats[i], s_feats[i + 1]) - fsp_matrix(t_feats[i], t_feats[i + 1])).pow(2).mean()
               for i in range(len(s_feats) - 1))


def check_channels(s_shapes, t_shapes) -> None:
    """FSP compares G matrices elementwise, so each tap needs equal teacher and student channels."""
    check_paired_stages("fsp", s_shapes, t_shapes)
    bad = [f"f{i}: student {s[0]} vs teacher {t[0]}"
           for i, (s, t) in enumerate(zip(s_shapes.stages, t_shapes.stages)) if s[0] != t[0]]
    if bad:
        raise ValueError(f"fsp needs equal channel counts per tap (RepDistiller: N/A for such pairs); {'; '.join(bad)}")


class FSPParams(FeatureParams):
    beta: float = Field(1.0, ge=0, description="weight of the FSP term in single-stage mode (init_epochs: 0)")
    init_epochs: int = epoch_count(30, ge=0, description="RepDistiller: 30 epochs of FSP pre-training, then CE alone; "
                                                   "0: kdpipe's single-stage variant, gamma*CE + beta*FSP")


@register("fsp", FSPParams)
class FSP(Term):
    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()
        check_channels(s_shapes, t_shapes)

    def forward(self, b):
        return fsp(b.s_feats, b.t_feats)
