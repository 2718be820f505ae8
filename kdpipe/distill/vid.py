"""VID: Ahn et al. 2019, variational information distillation of f1, f2, f3 (RepDistiller's VIDLoss):
per tap a 1x1-conv regressor predicts the teacher's map as a Gaussian mean with a learned per-channel
variance (softplus, initialised to 5); loss = mean of 0.5 (log var + (mu - t)^2 / var)."""

import math

import torch
from torch import nn

from . import functional as Fd
from . import register

TAPS = (1, 2, 3)


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
        fs, ft = Fd.match_spatial(fs, ft)
        return Fd.vid(self.regressor(fs), ft, self.log_scale, self.eps)


@register("vid")
class VariationalInformation(nn.Module):
    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()
        self.taps = nn.ModuleList(VIDTap(s_shapes[i][0], t_shapes[i][0]) for i in TAPS)

    def forward(self, b):
        return sum(tap(b.s_feats[i], b.t_feats[i]) for tap, i in zip(self.taps, TAPS))
