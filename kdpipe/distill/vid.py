"""VID: Ahn et al. 2019, variational information distillation of the stage outputs
(every tap but the stem's; f1, f2, f3 for the CIFAR ResNets) (RepDistiller's VIDLoss):
per tap a 1x1-conv regressor predicts the teacher's map as a Gaussian mean with a learned per-channel
variance (softplus, initialised to 5); loss = mean of 0.5 (log var + (mu - t)^2 / var)."""

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config.distill import FeatureParams
from ..losses import fp32
from .base import Term, check_paired_stages, register
from .functional import match_spatial


# the loss, a pure function (tensors in, a scalar out)
@fp32
def vid(mean: Tensor, target: Tensor, log_scale: Tensor, eps: float = 1e-5) -> Tensor:
    """Ahn et al. 2019: Gaussian negative log-likelihood (without the constant) of the teacher's map under
    the predicted mean and per-channel variance softplus(log_scale) + eps, mean over all elements."""
    var = (F.softplus(log_scale) + eps).view(1, -1, 1, 1)
    return (0.5 * ((mean - target).pow(2) / var + var.log())).mean()


class VIDTap(nn.Module):
    def __init__(self, c_s: int, c_t: int, init_var: float = 5.0, eps: float = 1e-5):
        super().__init__()
        self.regressor = nn.Sequential(nn.Conv2d(c_s, c_t, 1, bias=False), nn.ReLU(),
                                       nn.Conv2d(c_t, c_t, 1, bias=False), nn.ReLU(),
                                       nn.Conv2d(c_t, c_t, 1, bias=False))
        # softplus(log_scale) + eps = init_var at the start
        self.log_scale = nn.Parameter(torch.full((c_t,), math.log(math.expm1(init_var - eps))))
        self.eps = eps

    def forward(self, fs, ft):
        fs, ft = match_spatial(fs, ft)
        return vid(self.regressor(fs), ft, self.log_scale, self.eps)


class VIDParams(FeatureParams):
    beta: float = Field(1.0, ge=0)


@register("vid", VIDParams)
class VariationalInformation(Term):
    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()
        check_paired_stages("vid", s_shapes, t_shapes)
        self.taps = nn.ModuleList(VIDTap(s[0], t[0]) for s, t in zip(s_shapes.stages[1:], t_shapes.stages[1:]))

    def forward(self, b):
        return sum(tap(fs, ft) for tap, fs, ft in zip(self.taps, b.s_feats[1:], b.t_feats[1:]))
