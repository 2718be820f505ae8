"""RKD: Park et al. 2019, relational KD (distance and angle) on the pooled embedding."""

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..config.distill import FeatureParams
from ..losses import fp32
from .base import Term, register


# the loss and its helpers, pure functions (tensors in, tensors out)
def _pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))  # exact zeros on the diagonal


def _angles(e: Tensor) -> Tensor:
    """cos of the angle at j between i and k, for all (j, i, k): <e_i - e_j, e_k - e_j> normalised."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


@fp32
def rkd(es: Tensor, et: Tensor, w_dist: float = 25.0, w_angle: float = 50.0) -> Tensor:
    """Park et al. 2019, relational KD: Huber (smooth L1) between the students' and teachers' pairwise
    distances (each divided by its mean non-zero distance) times w_dist, plus between their angle
    cosines of all triplets times w_angle. The teacher side carries no gradient."""
    es, et = es.flatten(1), et.flatten(1).detach()
    ds, dt = _pairwise_distances(es), _pairwise_distances(et)
    ds, dt = ds / ds[ds > 0].mean(), dt / dt[dt > 0].mean()
    return w_dist * F.smooth_l1_loss(ds, dt) + w_angle * F.smooth_l1_loss(_angles(es), _angles(et))


class RKDParams(FeatureParams):
    beta: float = Field(1.0, ge=0)
    w_dist: float = Field(25.0, ge=0)
    w_angle: float = Field(50.0, ge=0)


@register("rkd", RKDParams)
class RelationalKD(Term):
    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()
        self.w_dist, self.w_angle = cfg.w_dist, cfg.w_angle

    def forward(self, b):
        return rkd(b.s_embedding, b.t_embedding, self.w_dist, self.w_angle)
